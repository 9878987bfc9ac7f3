"""The aiohttp application: one factory, routes bound from contracts.api.

Each route is wrapped with the same steps in the same order: authenticate,
authorise (role table + patient rule), read and validate the body, run the
handler.  Errors of every kind leave as RFC 9457 problems.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import asyncpg
import msgspec
import numpy as np
import structlog
from aiohttp import web

from contracts import api, bodies, merkle, note
from contracts import cohort as cohorts
from contracts.codes import Purpose, ReadKind, values
from contracts.cohort import EncodedCohort, encode_cohort
from contracts.decision import Terms
from contracts.entry import decode_entry, format_recorded_at
from contracts.nhs_number import InvalidNhsNumber, NhsNumber, decode_hook
from contracts.values import Actor
from projections import reads as projection_reads
from projections.choices import ChoicesProjection
from projections.optout_filter import FilterResult, OptOutFilter
from projections.runner import Runner
from projections.uses import UsesProjection

from . import __version__
from . import numbers_body
from .access import (
    READ_HEADER,
    SESSION_HEADER,
    SESSION_KIND,
    ReadSessions,
    current_request_id,
    record_filter_call,
    record_read,
    session_expiry,
    submitted_sha256,
)
from .auth import Forbidden, Unauthenticated, Verifier, authorise
from .checkpoints import CheckpointLog
from .commands import Caller, Contended, Ledger, Outcome, ProjectedOptOutAssessor, idempotency_key
from .database import Database, unavailable
from .domain import AlreadyExists, NotFound, NotPermitted, RuleBroken
from .limits import request_timeout
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .problems import ProblemError, decode_json, invalid
from .schema import migrate
from .store import EventStore, IdempotencyConflict, StoreBusy, StoreUnavailable, StoredEvent
from .supervisor import Supervisor
from .worker_threads import WorkerThreads
from .tiles import TileReader
from .verified_tokens import VerifiedTokens

log = structlog.get_logger("consent_ledger.http")

DATABASE = web.AppKey("database", Database)
STORE = web.AppKey("store", EventStore)
LEDGER = web.AppKey("ledger", Ledger)
VERIFIER = web.AppKey("verifier", Verifier)
TOKENS = web.AppKey("tokens", VerifiedTokens)
METRICS = web.AppKey("metrics", Metrics)
SETTINGS = web.AppKey("settings", dict)
OPENAPI = web.AppKey("openapi", bytes)
CHECKPOINTS = web.AppKey("checkpoints", CheckpointLog)
TILES = web.AppKey("tiles", TileReader)
RUNNER = web.AppKey("projection_runner", Runner)
OPT_OUT_FILTER = web.AppKey("opt_out_filter", OptOutFilter)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
WORKERS = web.AppKey("worker_threads", WorkerThreads)
READ_SESSIONS = web.AppKey("read_sessions", ReadSessions)

_encode = msgspec.json.Encoder().encode
_decoders = {
    op.id: msgspec.json.Decoder(op.request, dec_hook=decode_hook)
    for op in api.OPERATIONS
    if op.request is not None
}
Handler = Callable[[web.Request, Caller | None], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json", headers=headers)


def receipt_response(outcome: Outcome) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return json_response(outcome.receipt, 201 if outcome.created else 200, headers)


# --- request parts --------------------------------------------------------------


async def read_body(request: web.Request, limit: int) -> bytearray:
    """The body, in one buffer sized from Content-Length when given (a 60 MB
    body costs 60 MB, not a list of chunks plus their join)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    body = bytearray(request.content_length or 0)
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        if size + len(chunk) > limit:
            raise _too_large(limit)
        body[size:size + len(chunk)] = chunk
        size += len(chunk)
    del body[size:]  # a body shorter than its Content-Length
    return body


def _too_large(limit: int) -> ProblemError:
    return ProblemError(413, "body-too-large", "Request body too large",
                        f"this endpoint accepts bodies of at most {limit} bytes")


def _require_json(request: web.Request) -> None:
    if request.content_type != "application/json":
        raise ProblemError(415, "unsupported-media-type", "Unsupported media type",
                           f"send the body as application/json, not {request.content_type or 'nothing'}")


def path_nhs(request: web.Request) -> NhsNumber:
    try:
        return NhsNumber(request.match_info["nhs"])
    except InvalidNhsNumber as exc:
        raise invalid(str(exc), "path.nhs") from None


def _idempotency_header(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200 or not key.isascii() or not key.isprintable():
        raise ProblemError(400, "bad-idempotency-key", "Bad Idempotency-Key",
                           "Idempotency-Key must be 1-200 printable ASCII characters")
    return key


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = _plain_int(raw)
    if value is None:
        raise invalid(f"`{name}` must be an integer", f"query.{name}", status=400)
    if not low <= value <= high:
        raise invalid(f"`{name}` must be between {low} and {high}", f"query.{name}", status=400)
    return value


def _plain_int(raw: str) -> int | None:
    # int() also accepts "١", "1_0", "+1" and spaces: one number, one spelling.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        return None
    return int(raw)


class Body:
    """A validated request body with what idempotency needs."""

    def __init__(self, request: web.Request, caller: Caller, raw: bytes, value: Any):
        self.value = value
        self.idempotency = idempotency_key(
            caller, _idempotency_header(request), request.method, request.path, raw
        )


async def body_of(request: web.Request, caller: Caller, op: api.Operation) -> Body:
    _require_json(request)
    raw = await read_body(request, op.body_limit)
    return Body(request, caller, raw, decode_json(raw, _decoders[op.id]))


# --- handlers ---------------------------------------------------------------------


def _caller(caller: Caller | None) -> Caller:
    assert caller is not None, "authenticated route without a caller"
    return caller


async def opt_out(request: web.Request, caller: Caller | None) -> web.Response:
    return await _choose(request, _caller(caller), True, api.BY_ID["opt_out"])


async def opt_in(request: web.Request, caller: Caller | None) -> web.Response:
    return await _choose(request, _caller(caller), False, api.BY_ID["opt_in"])


async def _choose(request: web.Request, caller: Caller, opting_out: bool, op: api.Operation) -> web.Response:
    body = await body_of(request, caller, op)
    outcome = await request.app[LEDGER].choose(caller, path_nhs(request), opting_out, body.value, body.idempotency)
    return receipt_response(outcome)


async def give_consent(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _caller(caller)
    body = await body_of(request, caller, api.BY_ID["give_consent"])
    outcome = await request.app[LEDGER].give_consent(caller, path_nhs(request), body.value, body.idempotency)
    return receipt_response(outcome)


async def withdraw_consent(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _caller(caller)
    op = api.BY_ID["withdraw_consent"]
    grant_id = request.match_info["grant_id"]
    raw = await read_body(request, op.body_limit)
    actor = Actor(kind="patient")
    if raw:
        _require_json(request)
        actor = decode_json(raw, _decoders[op.id]).actor
    idem = idempotency_key(caller, _idempotency_header(request), request.method, request.path, raw)
    outcome = await request.app[LEDGER].withdraw_consent(caller, path_nhs(request), grant_id, actor, idem)
    return receipt_response(outcome)


async def get_choices(request: web.Request, caller: Caller | None) -> web.Response:
    nhs = path_nhs(request)
    choices = await request.app[LEDGER].choices(nhs)
    read = await record_read(request.app[STORE], _caller(caller), "choices", api.PATIENT_APP, nhs_number=nhs)
    return json_response(choices, headers={READ_HEADER: str(read.position)})


async def create_grant(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _caller(caller)
    body = await body_of(request, caller, api.BY_ID["create_grant"])
    return receipt_response(await request.app[LEDGER].create_grant(caller, body.value, body.idempotency))


async def revoke_grant(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _caller(caller)
    body = await body_of(request, caller, api.BY_ID["revoke_grant"])
    outcome = await request.app[LEDGER].revoke_grant(
        caller, request.match_info["grant_id"], body.value.reason, body.idempotency
    )
    return receipt_response(outcome)


async def get_grant(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _caller(caller)
    view = await request.app[LEDGER].grant_view(request.match_info["grant_id"])
    # Each role keeps its own rule: a token that reads as `sde` (no dac or auditor
    # role beside it) reads only its own organisation's grants.
    if not caller.roles & (api.DAC | api.AUDITOR) and view.grant.organisation.code != caller.org:
        raise Forbidden("SDE callers may only read their own organisation's grants")
    return json_response(view)


async def record_data_use(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _caller(caller)
    _require_json(request)
    raw = await read_body(request, api.BY_ID["record_data_use"].body_limit)
    key = _idempotency_header(request)
    # Millions of inline numbers: parsed, checked and encoded as a cohort off the event loop.
    workers = request.app[WORKERS]
    (value, cohort), idem = await asyncio.gather(
        workers.run(numbers_body.data_use, raw),
        workers.run(idempotency_key, caller, key, request.method, request.path, raw),
    )
    return receipt_response(await request.app[LEDGER].record_data_use(caller, value, idem, cohort))


def event_view(stored: StoredEvent) -> bodies.EventView:
    e = stored.entry
    return bodies.EventView(
        position=e.position,
        event_id=e.event_id,
        event_type=e.event_type,
        aggregate_id=e.aggregate_id,
        aggregate_version=e.aggregate_version,
        recorded_at=e.recorded_at,
        payload=e.payload,
        leaf_hash=stored.leaf_hash.hex(),
        chain_hash=stored.chain_hash.hex(),
    )


async def _entries_read(request: web.Request, caller: Caller | None, what: ReadKind, first: int, last: int) -> str:
    """Record an auditor's read of entries ``first``..``last``, unless the read
    session the request names covers them; the value for READ_HEADER."""
    session = request.headers.get(SESSION_HEADER)
    if session is not None:
        return str(await request.app[READ_SESSIONS].covering(_caller(caller), session, first, last))
    read = await record_read(request.app[STORE], _caller(caller), what, api.AUDITOR,
                             first_position=first, last_position=last, entries=last - first + 1)
    return str(read.position)


async def open_read_session(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _caller(caller)
    _require_json(request)
    raw = await read_body(request, api.BY_ID["open_read_session"].body_limit)
    wanted = decode_json(raw, _decoders["open_read_session"])
    head, _ = await request.app[STORE].head()
    if wanted.last_position > head:
        raise invalid(f"`last_position` {wanted.last_position} is beyond the log's head ({head})",
                      "$.last_position")
    read = await record_read(request.app[STORE], caller, SESSION_KIND, api.AUDITOR,
                             first_position=wanted.first_position, last_position=wanted.last_position,
                             entries=wanted.last_position - wanted.first_position + 1)
    expires = session_expiry(datetime.fromisoformat(read.recorded_at))
    return json_response(bodies.ReadSession(
        session=read.position, first_position=wanted.first_position, last_position=wanted.last_position,
        expires_at=format_recorded_at(expires),
    ), 201, headers={READ_HEADER: str(read.position)})


async def list_events(request: web.Request, caller: Caller | None) -> web.Response:
    after = _int_query(request, "after", 0, 0, 2**62)
    limit = _int_query(request, "limit", 100, 1, 1000)
    stored = await request.app[STORE].read_after(after, limit)
    next_after = stored[-1].position if len(stored) == limit else None
    headers = None
    if stored:
        headers = {READ_HEADER: await _entries_read(request, caller, "entries",
                                                     stored[0].position, stored[-1].position)}
    return json_response(bodies.EventsPage(events=[event_view(s) for s in stored], next_after=next_after),
                         headers=headers)


async def get_event(request: web.Request, caller: Caller | None) -> web.Response:
    position = _plain_int(request.match_info["position"])
    if position is None:
        raise invalid("position must be an integer", "path.position", status=400)
    found = await request.app[STORE].read_positions([position]) if 1 <= position <= 2**62 else []
    if not found:
        raise NotFound(f"no ledger entry at position {position}")
    recorded = await _entries_read(request, caller, "entries", position, position)
    return json_response(event_view(found[0]), headers={READ_HEADER: recorded})


async def whoami(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _caller(caller)
    return json_response(bodies.TokenInfo(subject=caller.subject, roles=sorted(caller.roles), org=caller.org,
                                          patient_scoped=caller.nhs_number is not None))


# --- projections: opt-out filter, cohorts, history, register ----------------------


async def create_cohort(request: web.Request, caller: Caller | None) -> web.Response:
    raw = await read_body(request, api.BY_ID["create_cohort"].body_limit)
    cohort = await request.app[WORKERS].run(_cohort_of, request.content_type, raw)
    await request.app[LEDGER].store_cohort(_caller(caller), cohort, current_request_id())
    return json_response(bodies.Cohort(cohort_id=cohort.cohort_id, size=len(cohort.stems)), 201)


def _cohort_of(content_type: str, raw: bytearray) -> EncodedCohort:
    parsed = numbers_body.parse(content_type, raw, json_list=True)
    if len(parsed.stems) == 0:
        raise invalid("a cohort needs at least one NHS number", "$")
    return encode_cohort(parsed.stems)


async def get_cohort(request: web.Request, caller: Caller | None) -> web.Response:
    cohort_id = request.match_info["cohort_id"]
    if len(cohort_id) != 64 or not all(c in "0123456789abcdef" for c in cohort_id):
        raise invalid("a cohort_id is 64 lowercase hex digits", "path.cohort_id", status=400)
    async with request.app[STORE].pool.acquire() as conn:
        row = await conn.fetchrow("SELECT encoding, members FROM cohorts WHERE cohort_id = $1", bytes.fromhex(cohort_id))
    if row is None:
        raise NotFound(f"no cohort {cohort_id} is stored")
    body = await request.app[WORKERS].run(_canonical_cohort, row["encoding"], row["members"])
    read = await record_read(request.app[STORE], _caller(caller), "cohort", api.AUDITOR, cohort_id=cohort_id)
    return web.Response(body=body, content_type="text/plain", headers={READ_HEADER: str(read.position)})


def _canonical_cohort(encoding: str, members: bytes) -> bytes:
    return cohorts.canonical_bytes(cohorts.decode_members(encoding, members))


async def opt_out_filter(request: web.Request, caller: Caller | None) -> web.Response:
    app = request.app
    caller = _caller(caller)
    purpose = request.query.get("purpose")
    if purpose is not None and purpose not in values(Purpose):
        raise invalid(f"`purpose` must be one of {', '.join(values(Purpose))}", "query.purpose", status=400)
    grant_id = request.query.get("grant_id") or None
    if purpose is not None and grant_id is None:
        raise invalid("`purpose` is checked against a grant's purpose: give `grant_id` too (opt-outs alone "
                      "apply whatever the purpose)", "query.purpose", slug="purpose-without-grant")
    min_position = _int_query(request, "min_position", 0, 0, 2**62)
    raw = await read_body(request, api.BY_ID["opt_out_filter"].body_limit)
    parsed = await app[WORKERS].run(numbers_body.parse, request.content_type, raw)
    optouts = app[OPT_OUT_FILTER]
    wait = app[SETTINGS]["filter_wait"]
    if optouts.position < min_position and not await app[RUNNER].wait_for(
        min_position, wait, lambda: optouts.position
    ):
        raise ProblemError(503, "not-yet-reflected", "Opt-out state not yet reflected",
                           f"the filter reflects position {optouts.position}, not yet {min_position}, after "
                           f"waiting {wait:g} s; retry", headers={"Retry-After": "1"})
    terms = optouts.terms(grant_id, datetime.now(timezone.utc))
    if grant_id is not None:
        record = optouts.grants.get(grant_id)
        if record is None:
            raise invalid(f"no grant {grant_id!r} is recorded (as of position {optouts.position})", "query.grant_id")
        if record.granted.organisation.code != caller.org:
            raise Forbidden("the grant belongs to another organisation: an SDE may only filter under its own grants")
        if terms.status != "active":
            raise invalid(f"the grant is {terms.status}: the filter applies only grants in force",
                          "query.grant_id", slug=f"grant-{terms.status}")
        if purpose is not None and purpose != record.granted.purpose.code:
            raise invalid(f"the grant covers purpose {record.granted.purpose.code!r}, not {purpose!r}",
                          "query.purpose", slug="purpose-outside-grant")
    checkpoint = (await app[CHECKPOINTS].latest()).size
    result, digest = await app[WORKERS].run(_filtered, optouts.snapshot(), parsed.stems, grant_id, terms)
    # The answer is rendered while the call is being recorded; it leaves only once recorded.
    recorded, body = await asyncio.gather(
        record_filter_call(app[STORE], caller, len(parsed.stems), digest, grant_id=grant_id, purpose=purpose,
                           removed=result.removed, as_of=result.as_of),
        app[WORKERS].run(_rendered, parsed, result, checkpoint),
    )
    if parsed.media_type == numbers_body.JSON:
        return web.Response(body=body, content_type="application/json", headers={READ_HEADER: str(recorded.position)})
    headers = {
        "Ledger-As-Of": str(result.as_of),
        "Ledger-Removed": str(result.removed),
        "Ledger-Checkpoint": str(checkpoint),
        "Ledger-Consented-Kept": str(result.consented_kept),
        READ_HEADER: str(recorded.position),
    }
    if result.exemption is not None:
        # New grants cannot carry control characters; one recorded before that rule must not break the answer.
        reference = "".join(c if c.isprintable() else " " for c in result.exemption.reference)
        headers["Ledger-Exemption"] = f"{result.exemption.basis}; reference={reference}"
    return web.Response(body=body, content_type=parsed.media_type, headers=headers)


def _filtered(
    optouts: OptOutFilter, stems: np.ndarray, grant_id: str | None, terms: Terms
) -> tuple[FilterResult, str]:
    """Filter (in a worker thread, from a snapshot of the filter), and the hash that records what was filtered."""
    return optouts.filter(stems, grant_id, terms), submitted_sha256(stems)


def _rendered(parsed: numbers_body.NumbersBody, result: FilterResult, checkpoint: int) -> bytes | memoryview:
    """The answer in the caller's media type (in a worker thread)."""
    if parsed.media_type != numbers_body.JSON:
        return numbers_body.render_lines(parsed, result.keep)
    return numbers_body.render_json(parsed.stems[result.keep], {
        "as_of": result.as_of, "removed": result.removed, "checkpoint": checkpoint,
        "consented_kept": result.consented_kept, "exemption": result.exemption,
    })


async def get_history(request: web.Request, caller: Caller | None) -> web.Response:
    nhs = path_nhs(request)
    cursor = request.query.get("cursor")
    if cursor is not None and not (cursor.isdigit() and 0 < len(cursor) <= 19):
        raise invalid("`cursor` must be the next_cursor of an earlier page", "query.cursor", status=400)
    limit = _int_query(request, "limit", 50, 1, 1000)
    async with request.app[STORE].pool.acquire() as conn:
        page = await projection_reads.history(conn, str(nhs), int(cursor) if cursor else None, limit)
    read = await record_read(request.app[STORE], _caller(caller), "history", api.PATIENT_APP, nhs_number=nhs)
    return json_response(page, headers={READ_HEADER: str(read.position)})


async def get_register(request: web.Request, caller: Caller | None) -> web.Response:
    async with request.app[STORE].pool.acquire() as conn:
        reg = await projection_reads.register(conn)
    fmt = request.query.get("format")
    if fmt is not None and fmt not in ("json", "csv"):
        raise invalid("`format` must be json or csv", "query.format", status=400)
    wants_csv = fmt == "csv" or (
        "format" not in request.query and "text/csv" in request.headers.get("Accept", "")
    )
    if not wants_csv:
        return json_response(reg)
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(projection_reads.register_rows(reg))
    return web.Response(text=out.getvalue(), content_type="text/csv", headers={"Ledger-As-Of": str(reg.as_of)})


async def healthz(request: web.Request, caller: Caller | None) -> web.Response:
    return json_response(bodies.Health(status="ok"))


def _not_ready(detail: str) -> web.Response:
    return json_response(bodies.Health(status="unavailable", detail=detail), 503, headers={"Retry-After": "1"})


async def readyz(request: web.Request, caller: Caller | None) -> web.Response:
    """Ready: the database answers, the writer runs, and no background task is stalled."""
    store = request.app[STORE]
    try:
        async with asyncio.timeout(2):
            position, _ = await store.head()
    except TimeoutError:
        return _not_ready("database: no answer within 2 s")
    except Exception as exc:
        if not unavailable(exc):
            raise
        return _not_ready(f"database: {type(exc).__name__}")
    if not store.running:
        return _not_ready("ledger writer stopped")
    stalls = request.app[SUPERVISOR].stalls()
    if stalls:
        return _not_ready("; ".join(str(s) for s in stalls))
    return json_response(bodies.Health(status="ok", position=position))


async def get_metrics(request: web.Request, caller: Caller | None) -> web.Response:
    """Answers while the database is down too: then `consent_ledger_database_up` is 0
    and the figures read from it keep their last values."""
    app = request.app
    metrics = app[METRICS]
    try:
        async with asyncio.timeout(2):
            metrics.head.set((await app[STORE].head())[0])
            metrics.checkpoint.set((await app[CHECKPOINTS].latest()).size)
        metrics.database_up.set(1)
    except Exception as exc:
        if not (isinstance(exc, TimeoutError) or unavailable(exc)):
            raise
        metrics.database_up.set(0)
    metrics.queued.set(app[STORE].queued)
    for name, position in app[RUNNER].positions.items():
        metrics.projection.labels(name).set(position)
    metrics.filter.set(app[OPT_OUT_FILTER].position)
    metrics.tasks(app[SUPERVISOR])
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(request: web.Request, caller: Caller | None) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# --- transparency: checkpoints, tiles, proofs ---------------------------------------


_MAX_TILE_INDEX = 2**62 // merkle.TILE_WIDTH


def _tile_request(request: web.Request) -> tuple[int, int]:
    """(tile index N, width W) from <N>[.p/<W>], refusing non-canonical spellings."""
    raw = request.match_info["tile_path"]
    index_part, partial, width_part = raw.partition(".p/")
    try:
        n = merkle.parse_tile_index(index_part)
        if n >= _MAX_TILE_INDEX:
            raise ValueError  # beyond any log this ledger can hold (positions are below 2**62)
        width = int(width_part) if partial else merkle.TILE_WIDTH
        if partial and (not 1 <= width < merkle.TILE_WIDTH or str(width) != width_part):
            raise ValueError
    except ValueError:
        raise NotFound("not a tlog-tiles path: use <N> as x###/.../### and .p/<W> with W in 1..255") from None
    return n, width


def _binary(data: bytes, immutable: bool) -> web.Response:
    cache = "public, max-age=31536000, immutable" if immutable else "public, max-age=1"
    return web.Response(body=data, content_type="application/octet-stream", headers={"Cache-Control": cache})


async def get_checkpoint(request: web.Request, caller: Caller | None) -> web.Response:
    latest = await request.app[CHECKPOINTS].latest()
    return web.Response(text=latest.note, content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-cache, max-age=1"})


async def get_tile(request: web.Request, caller: Caller | None) -> web.Response:
    level_text = request.match_info["level"]
    level = int(level_text)
    if level > 63 or str(level) != level_text:
        raise NotFound("tile level must be 0..63 without leading zeroes")
    n, width = _tile_request(request)
    async with request.app[STORE].pool.acquire() as conn:
        data = await request.app[TILES].tile(conn, level, n, width)
    if data is None:
        raise NotFound(f"the tree has no tile {merkle.tile_path(level, n, width)} (yet)")
    return _binary(data, width == merkle.TILE_WIDTH)


async def get_entry_bundle(request: web.Request, caller: Caller | None) -> web.Response:
    n, width = _tile_request(request)
    start = n * merkle.TILE_WIDTH
    async with request.app[STORE].pool.acquire() as conn:
        head = await conn.fetchval("SELECT position FROM ledger_head")
        if start + width > head:
            raise NotFound(f"the log has no bundle {merkle.tile_path('entries', n, width)} (yet)")
        rows = await conn.fetch(
            "SELECT entry FROM ledger_events WHERE position > $1 AND position <= $2 ORDER BY position",
            start, start + width,
        )
    out = bytearray()
    for r in rows:
        entry = bytes(r[0])
        out += len(entry).to_bytes(2, "big") + entry
    recorded = await _entries_read(request, caller, "entry-tiles", start + 1, start + width)
    response = _binary(bytes(out), width == merkle.TILE_WIDTH)
    response.headers[READ_HEADER] = recorded
    return response


def _required_int(request: web.Request, name: str) -> int:
    if name not in request.query:
        raise invalid(f"`{name}` is required", f"query.{name}", status=400)
    return _int_query(request, name, 0, 1, 2**62)


async def _head(request: web.Request, conn: asyncpg.Pool | asyncpg.Connection, at_least: int) -> int:
    return await request.app[TILES].head(conn, at_least)


async def inclusion_proof(request: web.Request, caller: Caller | None) -> web.Response:
    position = _required_int(request, "position")
    if "tree_size" in request.query:
        size = _required_int(request, "tree_size")
    else:
        size = (await request.app[CHECKPOINTS].latest()).size
    if position > size:
        raise invalid(f"position {position} is not in a tree of size {size}", "query.position", status=400)
    pool = request.app[STORE].pool  # the reader takes a connection only for what it has not cached
    if size > await _head(request, pool, size):
        raise NotFound(f"the log is not yet {size} entries long")
    hashes = await request.app[TILES].inclusion(pool, position - 1, size)
    return json_response(bodies.InclusionProof(leaf_index=position - 1, tree_size=size, hashes=[h.hex() for h in hashes]))


async def consistency_proof(request: web.Request, caller: Caller | None) -> web.Response:
    old, new = _required_int(request, "from"), _required_int(request, "to")
    if old > new:
        raise invalid("`from` must not exceed `to`", "query.from", status=400)
    pool = request.app[STORE].pool
    if new > await _head(request, pool, new):
        raise NotFound(f"the log is not yet {new} entries long")
    hashes = await request.app[TILES].consistency(pool, old, new)
    return json_response(bodies.ConsistencyProof(from_size=old, to_size=new, hashes=[h.hex() for h in hashes]))


async def log_key(request: web.Request, caller: Caller | None) -> web.Response:
    checkpoints = request.app[CHECKPOINTS]
    return json_response(bodies.LogKeys(origin=checkpoints.origin, keys=[v.vkey for v in checkpoints.verifiers]))


async def get_receipt_proof(request: web.Request, caller: Caller | None) -> web.Response:
    nhs = path_nhs(request)
    position = _plain_int(request.match_info["position"])
    if position is None:
        raise invalid("position must be an integer", "path.position", status=400)
    checkpoints = request.app[CHECKPOINTS]
    latest = await checkpoints.latest()
    if position > latest.size:
        latest = await checkpoints.sign()  # on demand: a fresh receipt is provable at once
    async with request.app[STORE].pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT entry, leaf_hash, chain_hash FROM ledger_events WHERE position = $1", position
        ) if 1 <= position <= latest.size else None
        stored = StoredEvent(decode_entry(row["entry"]), bytes(row["leaf_hash"]), bytes(row["chain_hash"])) \
            if row is not None else None
        # Another patient's entry is reported exactly like a missing one.
        if stored is None or getattr(stored.entry.payload, "nhs_number", None) != nhs:
            raise NotFound(f"no entry of this patient at position {position}")
        hashes = await request.app[TILES].inclusion(conn, position - 1, latest.size)
    read = await record_read(request.app[STORE], _caller(caller), "receipt", api.PATIENT_APP, nhs_number=nhs)
    return json_response(bodies.ReceiptProof(
        event=event_view(stored),
        entry=bytes(row["entry"]).decode(),
        leaf_hash=stored.leaf_hash.hex(),
        proof=bodies.InclusionProof(leaf_index=position - 1, tree_size=latest.size, hashes=[h.hex() for h in hashes]),
        checkpoint=latest.note,
    ), headers={READ_HEADER: str(read.position)})


HANDLERS: dict[str, Handler] = {
    "opt_out": opt_out,
    "opt_in": opt_in,
    "give_consent": give_consent,
    "withdraw_consent": withdraw_consent,
    "get_choices": get_choices,
    "create_grant": create_grant,
    "revoke_grant": revoke_grant,
    "get_grant": get_grant,
    "record_data_use": record_data_use,
    "create_cohort": create_cohort,
    "get_cohort": get_cohort,
    "opt_out_filter": opt_out_filter,
    "get_history": get_history,
    "get_register": get_register,
    "list_events": list_events,
    "get_event": get_event,
    "open_read_session": open_read_session,
    "whoami": whoami,
    "healthz": healthz,
    "readyz": readyz,
    "metrics": get_metrics,
    "openapi": openapi,
    "get_checkpoint": get_checkpoint,
    "get_tile": get_tile,
    "get_entry_bundle": get_entry_bundle,
    "inclusion_proof": inclusion_proof,
    "consistency_proof": consistency_proof,
    "log_key": log_key,
    "get_receipt_proof": get_receipt_proof,
}


def _bind(op: api.Operation, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        caller = None
        if op.roles:
            caller = await request.app[TOKENS].authenticate(request.headers.get("Authorization"))
            structlog.contextvars.bind_contextvars(caller=caller.subject)
            nhs = path_nhs(request) if "nhs" in request.match_info else None
            authorise(caller, op.roles, nhs)
            if op.org_scoped and not caller.org:
                raise Forbidden("this acts for an organisation: the token needs an `org` claim (organisation code)")
        return await handler(request, caller)

    endpoint.__name__ = op.id
    return endpoint


# --- middleware -------------------------------------------------------------------


def _problem_for(exc: BaseException) -> ProblemError | None:
    match exc:
        case ProblemError():
            return exc
        case Unauthenticated():
            return ProblemError(401, "unauthenticated", "Authentication required", str(exc),
                                headers={"WWW-Authenticate": exc.challenge()})
        case Forbidden() | NotPermitted():
            return ProblemError(403, "forbidden", "Not allowed", str(exc),
                                headers={"WWW-Authenticate": 'Bearer realm="consent-ledger", error="insufficient_scope"'})
        case RuleBroken():
            errors = [bodies.ProblemDetail(path=exc.path, message=exc.detail)] if exc.path else None
            return ProblemError(422, exc.code, "Refused by a ledger rule", exc.detail, errors=errors)
        case NotFound():
            return ProblemError(404, "not-found", "Not found", str(exc))
        case AlreadyExists():
            return ProblemError(409, "already-exists", "Already exists", str(exc))
        case IdempotencyConflict():
            return ProblemError(409, "idempotency-key-reused", "Idempotency key reused", str(exc))
        case Contended():
            return ProblemError(409, "concurrent-change", "Concurrent change", str(exc))
        case StoreBusy():
            return ProblemError(503, "busy", "Ledger busy", "the write queue is full; retry shortly",
                                headers={"Retry-After": "1"})
        case StoreUnavailable() if exc.outcome_unknown:
            return ProblemError(503, "outcome-unknown", "Ledger unavailable; the write may have been recorded",
                                "the database connection was lost while this write was committing, so it may or "
                                "may not be recorded: retry with the same Idempotency-Key, which returns its "
                                "receipt if it was (without one, check before writing it again)",
                                headers={"Retry-After": "1"})
        case StoreUnavailable():
            return ProblemError(503, "unavailable", "Ledger unavailable",
                                "the write was not committed; retry with the same Idempotency-Key",
                                headers={"Retry-After": "1"})
        case _ if unavailable(exc):
            return ProblemError(503, "database-unavailable", "Database unavailable",
                                f"the database cannot be used just now ({type(exc).__name__}); this request wrote "
                                "nothing to the ledger: retry after Retry-After seconds",
                                headers={"Retry-After": "1"})
        case web.HTTPException() if exc.status >= 400:
            return ProblemError(exc.status, f"http-{exc.status}", exc.reason,
                                _HTTP_DETAILS.get(exc.status, exc.reason),
                                headers={k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")})
    return None


_HTTP_DETAILS = {
    404: "no such resource; see /openapi.json for the API",
    405: "this method is not allowed here; the Allow header lists those that are",
    413: "the request body is too large",
}


@web.middleware
async def request_context(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    supplied = request.headers.get("X-Request-Id", "")
    request_id = supplied if 0 < len(supplied) <= 64 and supplied.isascii() and supplied.isprintable() \
        else uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    route = request.match_info.route.resource
    # Log the route template, never the raw path: paths hold NHS numbers.
    template = route.canonical if route is not None else "(unmatched)"
    started = time.perf_counter()
    try:
        response = await handler(request)
    except Exception as exc:  # noqa: BLE001 - every error leaves as a problem
        problem = _problem_for(exc)
        if problem is None:
            log.error("unhandled error", route=template, error=type(exc).__name__, exc_info=True)
            problem = ProblemError(500, "internal-error", "Internal error",
                                   f"the server failed; quote request id {request_id} when reporting it")
        response = problem.response()
    response.headers["X-Request-Id"] = request_id
    elapsed = time.perf_counter() - started
    request.app[METRICS].observe(request.method, template, response.status, elapsed)
    log.info("request", method=request.method, route=template, status=response.status, ms=round(elapsed * 1000, 2))
    return response


# --- composition --------------------------------------------------------------------


async def _ledger_context(app: web.Application) -> AsyncIterator[None]:
    database = app[DATABASE]
    settings = app[SETTINGS]
    conn = await database.connect_owner()
    try:
        await migrate(conn)
    finally:
        await conn.close()
    pool = await database.create_pool(max_size=settings["pool_size"])
    store = EventStore(pool, queue_size=settings["queue_size"], max_batch=settings["max_batch"])
    store.start()
    app[STORE] = store
    app[LEDGER] = Ledger(store)
    app[READ_SESSIONS] = ReadSessions(store)
    app[TILES] = TileReader()
    checkpoints = CheckpointLog(pool, app[TILES], settings["log_signers"], settings["log_origin"],
                                settings["checkpoint_interval"])
    app[CHECKPOINTS] = checkpoints
    app[SUPERVISOR].start("checkpoint-signer", checkpoints.run, every=checkpoints.interval)
    try:
        yield
    finally:
        await app[SUPERVISOR].stop("checkpoint-signer")
        await store.stop()
        await pool.close()


async def _projections_context(app: web.Application) -> AsyncIterator[None]:
    """Compose the projections: runner, in-memory filter, projection-backed assessor."""
    store = app[STORE]
    started = time.perf_counter()
    optouts = await OptOutFilter.load(store.pool)
    settings = app[SETTINGS]
    log.info("decision state loaded from the ledger's entries", position=optouts.position,
             seconds=round(time.perf_counter() - started, 2), grants=len(optouts.grants),
             projection_poll_interval=settings["projection_poll_interval"], filter_wait=settings["filter_wait"])
    runner = Runner(
        store.pool,
        [ChoicesProjection(), UsesProjection()],
        followers=[optouts],
        listen=app[DATABASE].connect_app,
        poll_interval=app[SETTINGS]["projection_poll_interval"],
    )
    await runner.prepare()
    app[RUNNER] = runner
    app[OPT_OUT_FILTER] = optouts
    app[LEDGER].assessor = ProjectedOptOutAssessor(optouts, runner)
    # The runner also feeds the in-memory opt-out filter (its follower).
    app[SUPERVISOR].start("projection-runner", runner.run, every=runner.poll_interval)
    try:
        yield
    finally:
        await app[SUPERVISOR].stop("projection-runner")
        await runner.close()


def create_app(
    database: Database,
    verifier: Verifier,
    *,
    pool_size: int = 10,
    queue_size: int = 10_000,
    max_batch: int = 500,
    timeout: float = 60.0,
    log_signers: list[note.Signer] | None = None,
    log_origin: str = "consent-ledger.example/log",
    checkpoint_interval: float = 1.0,
    projection_poll_interval: float = 1.0,
    filter_wait: float = 5.0,
    task_stall: float = 30.0,
) -> web.Application:
    app = web.Application(client_max_size=api.BULK_BODY, middlewares=[request_context, request_timeout(timeout)])
    app[DATABASE] = database
    app[VERIFIER] = verifier
    app[TOKENS] = VerifiedTokens(verifier)
    app[METRICS] = Metrics()
    app[SUPERVISOR] = Supervisor(stall_after=task_stall)
    app[SETTINGS] = {
        "pool_size": pool_size, "queue_size": queue_size, "max_batch": max_batch,
        # Without configured keys (tests, embedding) the log signs with a key that lives as long as the app.
        "log_signers": log_signers or [note.Signer.generate(log_origin)],
        "log_origin": log_origin, "checkpoint_interval": checkpoint_interval,
        "projection_poll_interval": projection_poll_interval, "filter_wait": filter_wait,
    }
    app[OPENAPI] = msgspec.json.encode(api.openapi(__version__))
    missing = {op.id for op in api.OPERATIONS} - HANDLERS.keys()
    if missing:
        raise RuntimeError(f"operations without a handler: {sorted(missing)}")
    for op in api.OPERATIONS:
        app.router.add_route(op.method, op.path, _bind(op, HANDLERS[op.id]), name=op.id)
    app.cleanup_ctx.append(_worker_threads_context)
    app.cleanup_ctx.append(_ledger_context)
    app.cleanup_ctx.append(_verifier_context)
    app.cleanup_ctx.append(_projections_context)
    return app


async def _worker_threads_context(app: web.Application) -> AsyncIterator[None]:
    app[WORKERS] = WorkerThreads()
    try:
        yield
    finally:
        app[WORKERS].close()


async def _verifier_context(app: web.Application) -> AsyncIterator[None]:
    # A URL-published JWKS is fetched before the first request and kept fresh.
    verifier = app[VERIFIER]
    await verifier.start()
    if verifier.source is None:
        yield
        return
    app[SUPERVISOR].start("jwks-refresher", verifier.refresh_forever, every=verifier.source.interval)
    try:
        yield
    finally:
        await app[SUPERVISOR].stop("jwks-refresher")

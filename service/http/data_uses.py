"""Data uses, cohorts and the opt-out filter: what SDEs call."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import numpy as np
from aiohttp import web

from contracts import api, bodies
from contracts import cohort as cohorts
from contracts.codes import Purpose, values
from contracts.cohort import EncodedCohort, encode_cohort
from contracts.decision import Terms
from projections.optout_filter import FilterResult, OptOutFilter
from service.app.caller import Caller, idempotency_key
from service.app.read_records import (
    READ_HEADER,
    current_request_id,
    record_filter_call,
    record_read,
    submitted_sha256,
)
from service.app.transparency import filter_call_context
from service.auth.tokens import Forbidden
from service.domain.errors import NotFound
from service.http import numbers_body
from service.http.keys import (
    CHECKPOINTS,
    CONFIG,
    LEDGER,
    OPT_OUT_FILTER,
    RUNNER,
    STORE,
    WORKERS,
)
from service.http.problems import ProblemError, invalid
from service.http.requests import (
    Handler,
    idempotency_header,
    int_query,
    json_response,
    read_body,
    receipt_response,
    require_json,
    required_caller,
)


async def record_data_use(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    require_json(request)
    raw = await read_body(request, api.BY_ID["record_data_use"].body_limit)
    key = idempotency_header(request)
    # Millions of inline numbers: parsed, checked and encoded as a cohort off the event loop.
    workers = request.app[WORKERS]
    (value, cohort), idem = await asyncio.gather(
        workers.run(numbers_body.data_use, raw),
        workers.run(idempotency_key, caller, key, request.method, request.path, raw),
    )
    return receipt_response(await request.app[LEDGER].record_data_use(caller, value, idem, cohort))


async def create_cohort(request: web.Request, caller: Caller | None) -> web.Response:
    raw = await read_body(request, api.BY_ID["create_cohort"].body_limit)
    cohort = await request.app[WORKERS].run(_cohort_of, request.content_type, raw)
    await request.app[LEDGER].store_cohort(required_caller(caller), cohort, current_request_id())
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
    found = await request.app[STORE].cohort_members(cohort_id)
    if found is None:
        raise NotFound(f"no cohort {cohort_id} is stored")
    body = await request.app[WORKERS].run(_canonical_cohort, *found)
    read = await record_read(request.app[STORE], required_caller(caller), "cohort", api.AUDITOR, cohort_id=cohort_id)
    return web.Response(body=body, content_type="text/plain", headers={READ_HEADER: str(read.position)})


def _canonical_cohort(encoding: str, members: bytes) -> bytes:
    return cohorts.canonical_bytes(cohorts.decode_members(encoding, members))


async def opt_out_filter(request: web.Request, caller: Caller | None) -> web.Response:
    app = request.app
    caller = required_caller(caller)
    purpose = request.query.get("purpose")
    if purpose is not None and purpose not in values(Purpose):
        raise invalid(f"`purpose` must be one of {', '.join(values(Purpose))}", "query.purpose", status=400)
    grant_id = request.query.get("grant_id") or None
    if purpose is not None and grant_id is None:
        raise invalid("`purpose` is checked against a grant's purpose: give `grant_id` too (opt-outs alone "
                      "apply whatever the purpose)", "query.purpose", slug="purpose-without-grant")
    min_position = int_query(request, "min_position", 0, 0, 2**62)
    raw = await read_body(request, api.BY_ID["opt_out_filter"].body_limit)
    parsed = await app[WORKERS].run(numbers_body.parse, request.content_type, raw)
    optouts = app[OPT_OUT_FILTER]
    wait = app[CONFIG].filter_wait
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
    # Who was taken out is committed in the entry (named by no one), so each can prove it to themselves.
    call_id = uuid.uuid4().hex
    removed = cohorts.sorted_unique(parsed.stems[~result.keep]) if result.removed else None
    commitment = None
    if removed is not None:
        commitment = await app[LEDGER].transparency.commit(removed, filter_call_context(call_id))
        await app[STORE].store_removed(call_id, removed)
    # The answer is rendered while the call is being recorded; it leaves only once recorded.
    recorded, body = await asyncio.gather(
        record_filter_call(app[STORE], caller, len(parsed.stems), digest, grant_id=grant_id, purpose=purpose,
                           removed=result.removed, as_of=result.as_of, call_id=call_id,
                           removed_commitment=commitment),
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


HANDLERS: dict[str, Handler] = {
    "record_data_use": record_data_use,
    "create_cohort": create_cohort,
    "get_cohort": get_cohort,
    "opt_out_filter": opt_out_filter,
}

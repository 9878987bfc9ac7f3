"""The log in the open: events, read sessions, checkpoints, tiles, proofs and the log key."""

from __future__ import annotations

from datetime import datetime

import asyncpg
import msgspec
from aiohttp import web

from contracts import api, bodies, disclosure, merkle
from contracts.codes import ReadKind
from contracts.entry import format_recorded_at
from service.app.caller import Caller
from service.app.read_records import (
    READ_HEADER,
    SESSION_HEADER,
    SESSION_KIND,
    record_read,
    session_expiry,
)
from service.domain.errors import NotFound
from service.http.keys import CHECKPOINTS, CONFIG, READ_SESSIONS, STORE, TILES
from service.http.problems import decode_json, invalid
from service.http.requests import (
    DECODERS,
    Handler,
    int_query,
    json_response,
    plain_int,
    read_body,
    reads,
    require_json,
    required_caller,
)
from service.store.event_log import StoredEvent


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
        return str(await request.app[READ_SESSIONS].covering(required_caller(caller), session, first, last))
    read = await record_read(request.app[STORE], required_caller(caller), what, api.AUDITOR,
                             first_position=first, last_position=last, entries=last - first + 1)
    return str(read.position)


async def open_read_session(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    require_json(request)
    raw = await read_body(request, api.BY_ID["open_read_session"].body_limit)
    wanted = decode_json(raw, DECODERS["open_read_session"])
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
    after = int_query(request, "after", 0, 0, 2**62)
    limit = int_query(request, "limit", 100, 1, 1000)
    stored = await request.app[STORE].read_after(after, limit)
    next_after = stored[-1].position if len(stored) == limit else None
    headers = None
    if stored:
        headers = {READ_HEADER: await _entries_read(request, caller, "entries",
                                                     stored[0].position, stored[-1].position)}
    return json_response(bodies.EventsPage(events=[event_view(s) for s in stored], next_after=next_after),
                         headers=headers)


async def get_event(request: web.Request, caller: Caller | None) -> web.Response:
    position = plain_int(request.match_info["position"])
    if position is None:
        raise invalid("position must be an integer", "path.position", status=400)
    found = await request.app[STORE].read_positions([position]) if 1 <= position <= 2**62 else []
    if not found:
        raise NotFound(f"no ledger entry at position {position}")
    recorded = await _entries_read(request, caller, "entries", position, position)
    return json_response(event_view(found[0]), headers={READ_HEADER: recorded})


async def list_public_entries(request: web.Request, caller: Caller | None) -> web.Response:
    after = int_query(request, "after", 0, 0, 2**62)
    limit = int_query(request, "limit", 100, 1, 1000)
    if "tree_size" in request.query:
        size = _required_int(request, "tree_size")
        if size > await _head(request, reads(request, size), size):
            raise NotFound(f"the log is not yet {size} entries long")
    else:
        size = (await request.app[CHECKPOINTS].latest()).size
    pool = reads(request, size)
    found = await request.app[STORE].entries_of_types(disclosure.PUBLIC_EVENT_TYPES, after, size, limit)
    entries, withheld = [], 0
    for position, event_type, entry, leaf in found:
        cohort_size = msgspec.json.decode(entry, type=_Sized).payload.cohort_size
        if not disclosure.publishable(event_type, cohort_size):
            withheld += 1
            continue
        proof = await request.app[TILES].inclusion(pool, position - 1, size)
        entries.append(bodies.PublicEntry(position=position, event_type=event_type, entry=entry.decode(),
                                          leaf_hash=leaf.hex(), proof=[h.hex() for h in proof]))
    return json_response(bodies.PublicEntries(tree_size=size, entries=entries, withheld=withheld,
                                              next_after=found[-1][0] if len(found) == limit else None))


class _Payload(msgspec.Struct):
    cohort_size: int | None = None


class _Sized(msgspec.Struct):
    payload: _Payload


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


def _note(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-cache, max-age=1"})


async def get_checkpoint(request: web.Request, caller: Caller | None) -> web.Response:
    checkpoints = request.app[CHECKPOINTS]
    return _note(await checkpoints.with_cosignatures(await checkpoints.latest()))


async def get_witnessed_checkpoint(request: web.Request, caller: Caller | None) -> web.Response:
    config, checkpoints = request.app[CONFIG], request.app[CHECKPOINTS]
    if not config.witnesses:
        raise NotFound("this log is configured with no witnesses (CONSENT_LEDGER_WITNESSES), so no checkpoint "
                       "is witnessed; /checkpoint has the log's own signature")
    witnessed = await checkpoints.witnessed([vkey for _, vkey in config.witnesses], config.witness_quorum)
    if witnessed is None:
        raise NotFound(f"no checkpoint has been cosigned by {config.witness_quorum} of the "
                       f"{len(config.witnesses)} witnesses yet; try again after the next submission")
    return _note(await checkpoints.with_cosignatures(witnessed))


async def get_tile(request: web.Request, caller: Caller | None) -> web.Response:
    level_text = request.match_info["level"]
    level = int(level_text)
    if level > 63 or str(level) != level_text:
        raise NotFound("tile level must be 0..63 without leading zeroes")
    n, width = _tile_request(request)
    # A replica serves it only once it holds every leaf the tile covers.
    async with reads(request, (n * merkle.TILE_WIDTH + width) * merkle.TILE_WIDTH ** level).acquire() as conn:
        data = await request.app[TILES].tile(conn, level, n, width)
    if data is None:
        raise NotFound(f"the tree has no tile {merkle.tile_path(level, n, width)} (yet)")
    return _binary(data, width == merkle.TILE_WIDTH)


async def get_entry_bundle(request: web.Request, caller: Caller | None) -> web.Response:
    n, width = _tile_request(request)
    start = n * merkle.TILE_WIDTH
    entries = await request.app[STORE].entry_bytes(start, start + width)
    if entries is None:
        raise NotFound(f"the log has no bundle {merkle.tile_path('entries', n, width)} (yet)")
    out = bytearray()
    for entry in entries:
        out += len(entry).to_bytes(2, "big") + entry
    recorded = await _entries_read(request, caller, "entry-tiles", start + 1, start + width)
    response = _binary(bytes(out), width == merkle.TILE_WIDTH)
    response.headers[READ_HEADER] = recorded
    return response


def _required_int(request: web.Request, name: str) -> int:
    if name not in request.query:
        raise invalid(f"`{name}` is required", f"query.{name}", status=400)
    return int_query(request, name, 0, 1, 2**62)


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
    pool = reads(request, size)  # the reader takes a connection only for what it has not cached
    if size > await _head(request, pool, size):
        raise NotFound(f"the log is not yet {size} entries long")
    hashes = await request.app[TILES].inclusion(pool, position - 1, size)
    return json_response(bodies.InclusionProof(leaf_index=position - 1, tree_size=size, hashes=[h.hex() for h in hashes]))


async def consistency_proof(request: web.Request, caller: Caller | None) -> web.Response:
    old, new = _required_int(request, "from"), _required_int(request, "to")
    if old > new:
        raise invalid("`from` must not exceed `to`", "query.from", status=400)
    pool = reads(request, new)
    if new > await _head(request, pool, new):
        raise NotFound(f"the log is not yet {new} entries long")
    hashes = await request.app[TILES].consistency(pool, old, new)
    return json_response(bodies.ConsistencyProof(from_size=old, to_size=new, hashes=[h.hex() for h in hashes]))


async def log_key(request: web.Request, caller: Caller | None) -> web.Response:
    checkpoints = request.app[CHECKPOINTS]
    return json_response(bodies.LogKeys(origin=checkpoints.origin, keys=[v.vkey for v in checkpoints.verifiers]))


HANDLERS: dict[str, Handler] = {
    "open_read_session": open_read_session,
    "list_events": list_events,
    "get_event": get_event,
    "list_public_entries": list_public_entries,
    "get_checkpoint": get_checkpoint,
    "get_witnessed_checkpoint": get_witnessed_checkpoint,
    "get_tile": get_tile,
    "get_entry_bundle": get_entry_bundle,
    "inclusion_proof": inclusion_proof,
    "consistency_proof": consistency_proof,
    "log_key": log_key,
}

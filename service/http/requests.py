"""Reading requests and writing responses: bodies, path and query values, JSON and receipts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from contracts import api
from contracts.nhs_number import InvalidNhsNumber, NhsNumber, decode_hook
from service.app.caller import Caller, idempotency_key
from service.app.ledger import Outcome
from service.http.keys import POOL
from service.http.problems import ProblemError, decode_json, invalid

_encode = msgspec.json.Encoder().encode
DECODERS = {
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
        raise too_large(limit)
    body = bytearray(request.content_length or 0)
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        if size + len(chunk) > limit:
            raise too_large(limit)
        body[size:size + len(chunk)] = chunk
        size += len(chunk)
    del body[size:]  # a body shorter than its Content-Length
    return body


def too_large(limit: int) -> ProblemError:
    return ProblemError(413, "body-too-large", "Request body too large",
                        f"this endpoint accepts bodies of at most {limit} bytes")


def require_json(request: web.Request) -> None:
    if request.content_type != "application/json":
        raise ProblemError(415, "unsupported-media-type", "Unsupported media type",
                           f"send the body as application/json, not {request.content_type or 'nothing'}")


def path_nhs(request: web.Request) -> NhsNumber:
    try:
        return NhsNumber(request.match_info["nhs"])
    except InvalidNhsNumber as exc:
        raise invalid(str(exc), "path.nhs") from None


def idempotency_header(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200 or not key.isascii() or not key.isprintable():
        raise ProblemError(400, "bad-idempotency-key", "Bad Idempotency-Key",
                           "Idempotency-Key must be 1-200 printable ASCII characters")
    return key


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = plain_int(raw)
    if value is None:
        raise invalid(f"`{name}` must be an integer", f"query.{name}", status=400)
    if not low <= value <= high:
        raise invalid(f"`{name}` must be between {low} and {high}", f"query.{name}", status=400)
    return value


def plain_int(raw: str) -> int | None:
    # int() also accepts "١", "1_0", "+1" and spaces: one number, one spelling.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        return None
    return int(raw)


class Body:
    """A validated request body with what idempotency needs."""

    def __init__(self, request: web.Request, caller: Caller, raw: bytes, value: Any):
        self.value = value
        self.idempotency = idempotency_key(
            caller, idempotency_header(request), request.method, request.path, raw
        )


async def body_of(request: web.Request, caller: Caller, op: api.Operation) -> Body:
    require_json(request)
    raw = await read_body(request, op.body_limit)
    return Body(request, caller, raw, decode_json(raw, DECODERS[op.id]))

def required_caller(caller: Caller | None) -> Caller:
    assert caller is not None, "authenticated route without a caller"
    return caller


MIN_POSITION_HEADER = "Ledger-Min-Position"


def reads(request: web.Request, position: int = 0) -> Any:
    """Where this request reads projections and tiles: a replica that has replayed at least ``position``
    and the position the caller names (``Ledger-Min-Position``: its last receipt's), else the primary."""
    named = request.headers.get(MIN_POSITION_HEADER, "")
    if named and not (named.isdigit() and len(named) <= 19):
        raise invalid(f"`{MIN_POSITION_HEADER}` must be a ledger position (a receipt's `position`)",
                      f"header.{MIN_POSITION_HEADER}", status=400)
    return request.app[POOL].at_least(max(position, int(named or 0)))

"""Access grants and the public register."""

from __future__ import annotations

import csv
import io

from aiohttp import web

from contracts import api
from projections import reads as projection_reads
from service.app.caller import Caller
from service.auth.tokens import Forbidden
from service.http.keys import LEDGER, POOL
from service.http.problems import invalid
from service.http.requests import (
    Handler,
    body_of,
    json_response,
    receipt_response,
    required_caller,
)


async def create_grant(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    body = await body_of(request, caller, api.BY_ID["create_grant"])
    return receipt_response(await request.app[LEDGER].create_grant(caller, body.value, body.idempotency))


async def revoke_grant(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    body = await body_of(request, caller, api.BY_ID["revoke_grant"])
    outcome = await request.app[LEDGER].revoke_grant(
        caller, request.match_info["grant_id"], body.value.reason, body.idempotency
    )
    return receipt_response(outcome)


async def get_grant(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    view = await request.app[LEDGER].grant_view(request.match_info["grant_id"])
    # Each role keeps its own rule: a token that reads as `sde` (no dac or auditor
    # role beside it) reads only its own organisation's grants.
    if not caller.roles & (api.DAC | api.AUDITOR) and view.grant.organisation.code != caller.org:
        raise Forbidden("SDE callers may only read their own organisation's grants")
    return json_response(view)


async def get_register(request: web.Request, caller: Caller | None) -> web.Response:
    async with request.app[POOL].acquire() as conn:
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


HANDLERS: dict[str, Handler] = {
    "create_grant": create_grant,
    "revoke_grant": revoke_grant,
    "get_grant": get_grant,
    "get_register": get_register,
}

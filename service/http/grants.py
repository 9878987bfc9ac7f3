"""Access grants and the public register."""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable

from aiohttp import web

from contracts import api, bodies
from projections import reads as projection_reads
from projections.statistics import statistics
from service.app.caller import Caller
from service.app.ledger import Ledger, Outcome
from service.auth.tokens import Forbidden
from service.http.keys import LEDGER, STATISTICS
from service.http.problems import invalid
from service.http.requests import (
    Handler,
    body_of,
    json_response,
    reads,
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


def _grant_write(op_id: str, command: Callable[[Ledger], Callable[..., Awaitable[Outcome]]]) -> Handler:
    """A write about one grant: the body of operation ``op_id``, then the ledger's ``command``."""
    async def handler(request: web.Request, caller: Caller | None) -> web.Response:
        caller = required_caller(caller)
        body = await body_of(request, caller, api.BY_ID[op_id])
        run = command(request.app[LEDGER])
        return receipt_response(await run(caller, request.match_info["grant_id"], body.value, body.idempotency))

    return handler


async def get_grant(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    view = await request.app[LEDGER].grant_view(request.match_info["grant_id"])
    # Each role keeps its own rule: a token that reads as `sde` (no dac or auditor
    # role beside it) reads only its own organisation's grants.
    if not caller.roles & (api.DAC | api.AUDITOR) and view.grant.organisation.code != caller.org:
        raise Forbidden("SDE callers may only read their own organisation's grants")
    return json_response(view)


async def get_register(request: web.Request, caller: Caller | None) -> web.Response:
    async with reads(request).acquire() as conn:
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


async def published_statistics(request: web.Request) -> bodies.Statistics:
    """The statistics, computed at most once a minute (they scan whole projection tables)."""
    async def compute() -> bodies.Statistics:
        async with reads(request).acquire() as conn:
            return await statistics(conn)

    return await request.app[STATISTICS].get(compute)


def _count(value: int | None) -> str:
    return "<10" if value is None else str(value)


def _statistics_rows(stats: bodies.Statistics, table: str) -> list[list[str]]:
    if table == "uses-by-grant":
        return [["grant_id", "organisation_code", "organisation_name", "purpose", "commercial", "uses"]] + [
            [g.grant_id, g.organisation.code, g.organisation.name, g.purpose.code, str(g.commercial).lower(),
             str(g.uses)] for g in stats.uses_by_grant]
    if table == "uses-by-purpose":
        return [["purpose", "grants", "uses"]] + [[p.purpose.code, str(p.grants), str(p.uses)]
                                                   for p in stats.uses_by_purpose]
    if table == "datasets":
        return [["dataset", "organisations", "grants", "uses", "largest_organisation", "largest_organisation_uses"]] + [
            [d.dataset, str(d.organisations), str(d.grants), str(d.uses), d.largest_organisation or "",
             str(d.largest_organisation_uses)] for d in stats.datasets]
    if table == "value":
        return [["currency", "received", "allocated"]] + [[v.currency, str(v.received), str(v.allocated)]
                                                         for v in stats.value]
    return [["month", "scope", "channel", "opt_outs", "opt_ins"]] + [
        [c.month, c.scope, c.channel, _count(c.opt_outs), _count(c.opt_ins)] for c in stats.choices_by_month]


async def get_statistics(request: web.Request, caller: Caller | None) -> web.Response:
    fmt, table = request.query.get("format"), request.query.get("table", "choices")
    if fmt is not None and fmt not in ("json", "csv"):
        raise invalid("`format` must be json or csv", "query.format", status=400)
    if table not in api.STATISTICS_TABLES:
        raise invalid(f"`table` must be one of {', '.join(api.STATISTICS_TABLES)}", "query.table", status=400)
    stats = await published_statistics(request)
    if not (fmt == "csv" or ("format" not in request.query and "text/csv" in request.headers.get("Accept", ""))):
        return json_response(stats)
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(_statistics_rows(stats, table))
    return web.Response(text=out.getvalue(), content_type="text/csv", headers={"Ledger-As-Of": str(stats.as_of)})


HANDLERS: dict[str, Handler] = {
    "get_statistics": get_statistics,
    "create_grant": create_grant,
    "revoke_grant": revoke_grant,
    "approve_grant": _grant_write("approve_grant", lambda ledger: ledger.approve_grant),
    "record_output": _grant_write("record_output", lambda ledger: ledger.record_output),
    "receive_value": _grant_write("receive_value", lambda ledger: ledger.receive_value),
    "allocate_value": _grant_write("allocate_value", lambda ledger: ledger.allocate_value),
    "get_grant": get_grant,
    "get_register": get_register,
}

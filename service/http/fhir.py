"""FHIR R4 reads: a patient's choices as Consent, their history as IHE BALP
AuditEvents, and the server's CapabilityStatement. Errors on these routes
leave as OperationOutcome (the middleware renders them)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from contracts import api
from contracts.bodies import ProblemDetail
from contracts.nhs_number import InvalidNhsNumber, NhsNumber
from projections import reads as projection_reads
from service import __version__
from service.app.caller import Caller
from service.app.read_records import READ_HEADER, record_read
from service.auth.tokens import authorise
from service.fhir import importing, resources
from service.http.keys import LEDGER, STORE, WORKERS
from service.http.problems import ProblemError, invalid
from service.http.requests import Handler, int_query, read_body, reads, required_caller

_STARTED = datetime.now(timezone.utc).isoformat(timespec="seconds")


def fhir_response(resource: dict, headers: dict[str, str] | None = None, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(resource), status=status, content_type=resources.MEDIA_TYPE,
                        headers=headers)


def _patient(request: web.Request, caller: Caller, op: api.Operation) -> NhsNumber:
    """The `patient` search parameter: an NHS number, bare or as the NHS
    number identifier (`https://fhir.nhs.uk/Id/nhs-number|9434765919`);
    a patient's own token may name only that patient."""
    raw = request.query.get("patient")
    if raw is None or raw == "":
        raise invalid("the `patient` search parameter is required: the patient's NHS number",
                      "query.patient", status=400)
    system, bar, value = raw.rpartition("|")
    if bar and system not in ("", resources.NHS_NUMBER):
        raise invalid(f"`patient` identifiers use the system {resources.NHS_NUMBER}", "query.patient", status=400)
    try:
        nhs = NhsNumber(value)
    except InvalidNhsNumber as exc:
        raise invalid(str(exc), "query.patient") from None
    authorise(caller, op.roles, nhs)
    return nhs


async def metadata(request: web.Request, caller: Caller | None) -> web.Response:
    return fhir_response(resources.capability_statement(__version__, _STARTED))


async def consents(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    nhs = _patient(request, caller, api.BY_ID["fhir_consents"])
    choices = await request.app[LEDGER].choices(nhs)
    positions = [c.position for c in choices.scopes.values() if c.position is not None]
    positions += [c.position for c in choices.consents]
    leaf_hashes = {s.position: s.leaf_hash for s in await request.app[STORE].read_positions(positions)}
    found = await request.app[WORKERS].run(resources.consents, choices, leaf_hashes)
    read = await record_read(request.app[STORE], caller, "choices", api.PATIENT_APP, nhs_number=nhs)
    bundle = resources.searchset(found, f"/fhir/Consent?{urlencode({'patient': str(nhs)})}")
    return fhir_response(bundle, headers={READ_HEADER: str(read.position)})


async def audit_events(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    nhs = _patient(request, caller, api.BY_ID["fhir_audit_events"])
    count = int_query(request, "_count", 50, 1, 1000)
    cursor = request.query.get("_cursor")
    if cursor is not None and not (cursor.isdigit() and 0 < len(cursor) <= 19):
        raise invalid("`_cursor` must be taken from the Bundle's `next` link", "query._cursor", status=400)
    async with reads(request).acquire() as conn:
        page = await projection_reads.history(conn, str(nhs), int(cursor) if cursor else None, count)
    events = await asyncio.to_thread(resources.audit_events, page)
    read = await record_read(request.app[STORE], caller, "history", api.PATIENT_APP, nhs_number=nhs)
    query = {"patient": str(nhs), "_count": count}
    here = f"/fhir/AuditEvent?{urlencode({**query, **({'_cursor': cursor} if cursor else {})})}"
    following = f"/fhir/AuditEvent?{urlencode({**query, '_cursor': page.next_cursor})}" if page.next_cursor else None
    return fhir_response(resources.searchset(events, here, following), headers={READ_HEADER: str(read.position)})


async def import_bundle(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    if request.content_type not in (resources.MEDIA_TYPE, "application/json"):
        raise ProblemError(415, "unsupported-media-type", "Unsupported media type",
                           f"send the Bundle as {resources.MEDIA_TYPE}, not {request.content_type or 'nothing'}")
    body = await read_body(request, api.BY_ID["fhir_import_bundle"].body_limit)
    try:
        choices = await request.app[WORKERS].run(importing.bundle, bytes(body))
    except importing.ImportRefused as exc:
        raise ProblemError(422, "import-refused", "Nothing imported",
                           f"{len(exc.mistakes)} mistake(s) in the bundle; nothing from it was written",
                           errors=[ProblemDetail(path=m.path, message=m.message) for m in exc.mistakes]) from None
    receipts = await request.app[LEDGER].import_choices(caller, choices)
    return fhir_response(resources.import_response(receipts))


def outcome_response(problem: ProblemError) -> web.Response:
    """A problem on a /fhir/ route, as the OperationOutcome FHIR clients parse."""
    issues = [(e.path, e.message) for e in problem.errors or []]
    return fhir_response(resources.operation_outcome(problem.status, problem.detail, issues),
                         headers=problem.headers, status=problem.status)


HANDLERS: dict[str, Handler] = {
    "fhir_metadata": metadata,
    "fhir_consents": consents,
    "fhir_audit_events": audit_events,
    "fhir_import_bundle": import_bundle,
}

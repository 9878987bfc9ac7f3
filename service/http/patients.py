"""Patients' choices, consents, history and receipts."""

from __future__ import annotations

import numpy as np
from aiohttp import web

from contracts import api, bodies
from contracts import cohort as cohorts
from contracts import cohort_commitment as cc
from contracts.events import DataUseRecorded, OptOutFilterApplied
from contracts.nhs_number import NhsNumber
from contracts.values import Actor
from projections import reads as projection_reads
from service.app.caller import Caller, idempotency_key
from service.app.read_records import (
    READ_HEADER,
    record_read,
)
from service.app.transparency import data_use_context, filter_call_context
from service.domain.errors import NotFound
from service.http.keys import CHECKPOINTS, LEDGER, STORE, TILES, WORKERS
from service.http.problems import decode_json, invalid
from service.http.requests import (
    DECODERS,
    Handler,
    body_of,
    idempotency_header,
    int_query,
    json_response,
    path_nhs,
    plain_int,
    read_body,
    reads,
    receipt_response,
    require_json,
    required_caller,
)
from service.http.transparency import event_view


async def opt_out(request: web.Request, caller: Caller | None) -> web.Response:
    return await _choose(request, required_caller(caller), True, api.BY_ID["opt_out"])


async def opt_in(request: web.Request, caller: Caller | None) -> web.Response:
    return await _choose(request, required_caller(caller), False, api.BY_ID["opt_in"])


async def _choose(request: web.Request, caller: Caller, opting_out: bool, op: api.Operation) -> web.Response:
    body = await body_of(request, caller, op)
    outcome = await request.app[LEDGER].choose(caller, path_nhs(request), opting_out, body.value, body.idempotency)
    return receipt_response(outcome)


async def give_consent(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    body = await body_of(request, caller, api.BY_ID["give_consent"])
    outcome = await request.app[LEDGER].give_consent(caller, path_nhs(request), body.value, body.idempotency)
    return receipt_response(outcome)


async def withdraw_consent(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    op = api.BY_ID["withdraw_consent"]
    grant_id = request.match_info["grant_id"]
    raw = await read_body(request, op.body_limit)
    actor = Actor(kind="patient")
    if raw:
        require_json(request)
        actor = decode_json(raw, DECODERS[op.id]).actor
    idem = idempotency_key(caller, idempotency_header(request), request.method, request.path, raw)
    outcome = await request.app[LEDGER].withdraw_consent(caller, path_nhs(request), grant_id, actor, idem)
    return receipt_response(outcome)


async def get_choices(request: web.Request, caller: Caller | None) -> web.Response:
    nhs = path_nhs(request)
    choices = await request.app[LEDGER].choices(nhs)
    read = await record_read(request.app[STORE], required_caller(caller), "choices", api.PATIENT_APP, nhs_number=nhs)
    return json_response(choices, headers={READ_HEADER: str(read.position)})


async def get_history(request: web.Request, caller: Caller | None) -> web.Response:
    nhs = path_nhs(request)
    cursor = request.query.get("cursor")
    if cursor is not None and not (cursor.isdigit() and 0 < len(cursor) <= 19):
        raise invalid("`cursor` must be the next_cursor of an earlier page", "query.cursor", status=400)
    limit = int_query(request, "limit", 50, 1, 1000)
    async with reads(request).acquire() as conn:
        page = await projection_reads.history(conn, str(nhs), int(cursor) if cursor else None, limit)
    read = await record_read(request.app[STORE], required_caller(caller), "history", api.PATIENT_APP, nhs_number=nhs)
    return json_response(page, headers={READ_HEADER: str(read.position)})


async def get_receipt_proof(request: web.Request, caller: Caller | None) -> web.Response:
    nhs = path_nhs(request)
    position = plain_int(request.match_info["position"])
    if position is None:
        raise invalid("position must be an integer", "path.position", status=400)
    checkpoints = request.app[CHECKPOINTS]
    latest = await checkpoints.latest()
    if position > latest.size:
        latest = await checkpoints.sign()  # on demand: a fresh receipt is provable at once
    found = await request.app[STORE].read_positions([position]) if 1 <= position <= latest.size else []
    payload = found[0].entry.payload if found else None
    use = (isinstance(payload, DataUseRecorded) and payload.cohort_commitment is not None
           or isinstance(payload, OptOutFilterApplied) and payload.removed_commitment is not None)
    # Another patient's entry is reported exactly like a missing one; any data use has an answer for
    # every patient (in it or not), and names no one.
    if not found or not use and getattr(payload, "nhs_number", None) != nhs:
        raise NotFound(f"no entry of this patient at position {position}")
    stored = found[0]
    cohort = await _cohort_receipt(request, required_caller(caller), nhs, position, payload) if use else None
    hashes = await request.app[TILES].inclusion(reads(request, latest.size), position - 1, latest.size)
    read = await record_read(request.app[STORE], required_caller(caller), "receipt", api.PATIENT_APP, nhs_number=nhs)
    return json_response(bodies.ReceiptProof(
        event=event_view(stored),
        entry=(await request.app[STORE].entry_bytes(position - 1, position) or [b""])[0].decode(),
        leaf_hash=stored.leaf_hash.hex(),
        proof=bodies.InclusionProof(leaf_index=position - 1, tree_size=latest.size, hashes=[h.hex() for h in hashes]),
        checkpoint=latest.note,
        cohort=cohort,
    ), headers={READ_HEADER: str(read.position)})


async def _cohort_receipt(request: web.Request, caller: Caller, nhs: NhsNumber, position: int,
                          use: DataUseRecorded | OptOutFilterApplied) -> bodies.CohortReceipt:
    """The patient's proof against a data use's cohort, or against the patients a filter call removed."""
    ledger, store = request.app[LEDGER], request.app[STORE]
    if isinstance(use, DataUseRecorded):
        context, commitment = data_use_context(use.organisation_code, use.use_id), use.cohort_commitment
        load = lambda: store.cohort_members(use.cohort_id)  # noqa: E731
    else:
        assert use.call_id is not None
        context, commitment = filter_call_context(use.call_id), use.removed_commitment
        load = lambda: store.removed_members(use.call_id)  # noqa: E731

    async def members() -> np.ndarray:
        stored = await load()
        if stored is None:
            raise NotFound(f"the patients the entry at position {position} commits to are not stored here")
        return await request.app[WORKERS].run(cohorts.decode_members, *stored)

    secret, committed = await ledger.transparency_secret(caller, nhs)
    tag, proof = await ledger.transparency.proof(members, context, nhs.stem)
    assert commitment is not None
    return bodies.CohortReceipt(
        context=context, size=commitment.size, root=commitment.root, tag=tag.hex(),
        member=tag.hex() in proof.tags, proof=proof, secret=secret.hex(), secret_hash=cc.secret_hash(secret),
        secret_position=committed.position, provable=committed.position < position)


HANDLERS: dict[str, Handler] = {
    "opt_out": opt_out,
    "opt_in": opt_in,
    "give_consent": give_consent,
    "withdraw_consent": withdraw_consent,
    "get_choices": get_choices,
    "get_history": get_history,
    "get_receipt_proof": get_receipt_proof,
}

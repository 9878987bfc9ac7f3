"""The witness's HTTP interface: ``POST /add-checkpoint`` of C2SP tlog-witness.

Checks, in the order the spec gives its answers: a malformed body is 400; an
origin the witness is not configured for, 404; no good signature by a key it
trusts for that origin, 403; an old size above the checkpoint's, 400; an old
size other than the one it last cosigned, 409 with that size (the client
resyncs); a consistency proof that does not verify, 422; the same size with
another root, 409.  Only then is the checkpoint stored and cosigned.  A
refused request that the log did sign is kept as evidence against the log.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import structlog
from aiohttp import web

from contracts import cosignature, merkle, note
from contracts.note import NoteError
from service.witness.state import Cosigned, WitnessState

log = structlog.get_logger("consent_ledger.witness")

MAX_REQUEST = 64 * 1024  # an old size, at most 63 hashes and a checkpoint with its signatures
COSIGNER = web.AppKey("cosigner", cosignature.Cosigner)
LOGS = web.AppKey("logs", Mapping)
STATE = web.AppKey("state", WitnessState)


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


def _conflict(size: int) -> web.Response:
    return web.Response(status=409, body=cosignature.size_body(size), content_type=cosignature.SIZE_MEDIA_TYPE)


async def add_checkpoint(request: web.Request) -> web.Response:
    body = await request.read()
    # From here on nothing awaits: reading the stored size, checking the
    # proof and storing the new checkpoint run as one step of the event loop
    # (and the state's transaction guards against other processes).
    try:
        submitted = cosignature.parse_add_checkpoint(body)
        text, _ = note.split(submitted.checkpoint)
        checkpoint = note.parse_checkpoint(text)
    except NoteError as exc:
        return _text(400, f"malformed add-checkpoint request: {exc}")
    verifiers = request.app[LOGS].get(checkpoint.origin)
    if verifiers is None:
        return _text(404, f"unknown log origin {checkpoint.origin!r}")
    try:
        note.open_note(submitted.checkpoint, verifiers)
    except NoteError as exc:
        return _text(403, f"checkpoint signature: {exc}")
    if submitted.old_size > checkpoint.size:
        return _text(400, f"old size {submitted.old_size} is larger than the checkpoint's size {checkpoint.size}")

    state = request.app[STATE]
    held = state.latest(checkpoint.origin)
    if submitted.old_size != held.size:
        return _conflict(held.size)
    refusal = _refusal(held, checkpoint, submitted.proof)
    if refusal is not None:
        status, reason = refusal
        state.keep_evidence(checkpoint.origin, reason, body)
        log.warning("checkpoint refused", origin=checkpoint.origin, held=held.size, size=checkpoint.size,
                    status=status, reason=reason)
        return _conflict(held.size) if status == 409 else _text(status, reason)
    now = state.advance(checkpoint.origin, held, checkpoint.size, checkpoint.root, submitted.checkpoint)
    if now is not None:  # another process advanced this log in between
        return _conflict(now.size)
    log.info("checkpoint cosigned", origin=checkpoint.origin, old=held.size, size=checkpoint.size)
    return web.Response(text=request.app[COSIGNER].cosign(text, int(time.time())), content_type="text/plain")


def _refusal(held: Cosigned, checkpoint: note.Checkpoint, proof: tuple[bytes, ...]) -> tuple[int, str] | None:
    """Why a correctly signed checkpoint that extends the held size must not be cosigned."""
    if held.root is None:  # the first checkpoint of this log: nothing to be consistent with
        if proof:
            return 422, "a consistency proof from size 0 must be empty"
        if checkpoint.size == 0 and checkpoint.root != merkle.EMPTY_ROOT:
            return 422, "a tree of size 0 has the empty root"
        return None
    if checkpoint.size == held.size:
        if proof:
            return 422, "a consistency proof between equal sizes must be empty"
        if checkpoint.root != held.root:
            return 409, f"a different root for size {held.size}: the log has forked"
        return None
    try:
        merkle.verify_consistency(held.size, checkpoint.size, held.root, checkpoint.root, proof)
    except merkle.ProofError as exc:
        return 422, f"consistency proof from size {held.size} to {checkpoint.size}: {exc}"
    return None


def create_app(cosigner: cosignature.Cosigner, logs: Mapping[str, list[note.Verifier]],
               state: WitnessState) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST)
    app[COSIGNER], app[LOGS], app[STATE] = cosigner, logs, state
    app.router.add_post("/add-checkpoint", add_checkpoint)
    return app

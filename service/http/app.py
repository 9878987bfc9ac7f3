"""The aiohttp application: one factory, routes bound from contracts.api.

Each route is wrapped with the same steps in the same order: authenticate,
authorise (role table + patient rule), read and validate the body, run the
handler.  Errors of every kind leave as RFC 9457 problems."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import structlog
from aiohttp import web

from contracts import api, bodies, note
from projections.choices import ChoicesProjection
from projections.optout_filter import OptOutFilter
from projections.runner import Runner
from projections.uses import UsesProjection
from service import __version__
from service.app.assessors import ProjectedOptOutAssessor
from service.app.ledger import Contended, Ledger
from service.app.read_records import ReadSessions
from service.auth.token_cache import VerifiedTokens
from service.auth.tokens import Forbidden, Unauthenticated, Verifier, authorise
from service.domain.errors import AlreadyExists, NotFound, NotPermitted, RuleBroken
from service.http import data_uses, grants, operations, patients, transparency
from service.http.keys import (
    CHECKPOINTS,
    DATABASE,
    LEDGER,
    METRICS,
    OPENAPI,
    OPT_OUT_FILTER,
    READ_SESSIONS,
    RUNNER,
    SETTINGS,
    STORE,
    SUPERVISOR,
    TILES,
    TOKENS,
    VERIFIER,
    WORKERS,
)
from service.http.problems import ProblemError
from service.http.requests import Handler, path_nhs
from service.http.timeouts import request_timeout
from service.runtime.metrics import Metrics
from service.runtime.supervisor import Supervisor
from service.runtime.worker_threads import WorkerThreads
from service.store.checkpoints import CheckpointLog
from service.store.database import Database, unavailable
from service.store.event_store import (
    EventStore,
    IdempotencyConflict,
    StoreBusy,
    StoreUnavailable,
)
from service.store.migrations import migrate
from service.store.tiles import TileReader

log = structlog.get_logger('consent_ledger.http')


# Each API area registers its own handlers; an operation without one fails at start-up.
HANDLERS: dict[str, Handler] = {
    **patients.HANDLERS, **grants.HANDLERS, **data_uses.HANDLERS, **transparency.HANDLERS, **operations.HANDLERS,
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

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
from service import __version__
from service.app.ledger import Contended
from service.auth.token_cache import VerifiedTokens
from service.auth.tokens import Forbidden, Unauthenticated, Verifier, authorise
from service.composition import running
from service.config import Config
from service.domain.errors import AlreadyExists, NotFound, NotPermitted, RuleBroken
from service.http import (
    data_uses,
    fhir,
    grants,
    operations,
    pages,
    patients,
    subscriptions,
    transparency,
)
from service.http.keys import (
    CHECKPOINTS,
    CONFIG,
    DATABASE,
    LEASE,
    LEDGER,
    METRICS,
    OPENAPI,
    OPT_OUT_FILTER,
    OUTBOX,
    POOL,
    READ_SESSIONS,
    RUNNER,
    STATISTICS,
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
from service.pages.cache import Expiring
from service.pages.rendering import API_POLICY, PAGE_POLICY, render
from service.runtime.metrics import Metrics
from service.runtime.supervisor import Supervisor
from service.runtime.worker_threads import WorkerThreads
from service.store.database import Database, unavailable
from service.store.event_log import IdempotencyConflict, StoreBusy, StoreUnavailable

log = structlog.get_logger('consent_ledger.http')


# Each API area registers its own handlers; an operation without one fails at start-up.
HANDLERS: dict[str, Handler] = {
    **patients.HANDLERS, **grants.HANDLERS, **data_uses.HANDLERS, **transparency.HANDLERS, **operations.HANDLERS,
    **fhir.HANDLERS, **pages.HANDLERS, **subscriptions.HANDLERS,
}


def _bind(op: api.Operation, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        caller = None
        if op.roles:
            caller = await request.app[TOKENS].authenticate(request.headers.get("Authorization"))
            structlog.contextvars.bind_contextvars(caller=caller.subject)
            nhs = path_nhs(request) if "nhs" in request.match_info else None
            authorise(caller, op.roles, nhs)
            if op.backend_only and caller.nhs_number is not None:
                raise Forbidden("this is for a patient app's backend: use a token without an `nhs_number` claim")
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
        # FHIR clients expect an OperationOutcome, people a page; everyone else an RFC 9457 problem.
        if request.path.startswith("/fhir/"):
            response = fhir.outcome_response(problem)
        elif _for_people(request):
            response = render("error.html", http_status=problem.status, problem=problem, nav=None)
            response.headers.update({k: v for k, v in problem.headers.items() if k in ("Allow", "Retry-After")})
        else:
            response = problem.response()
    response.headers["X-Request-Id"] = request_id
    _security_headers(response)
    elapsed = time.perf_counter() - started
    request.app[METRICS].observe(request.method, template, response.status, elapsed)
    log.info("request", method=request.method, route=template, status=response.status, ms=round(elapsed * 1000, 2))
    return response


def _for_people(request: web.Request) -> bool:
    """A page's own route, or an unknown address a browser asked for."""
    route = request.match_info.route
    op = api.BY_ID.get(route.name) if route.name else None
    if op is not None:
        return op.page
    return "text/html" in request.headers.get("Accept", "")


def _security_headers(response: web.StreamResponse) -> None:
    page = response.content_type == "text/html"
    response.headers.setdefault("Content-Security-Policy", PAGE_POLICY if page else API_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")


# --- composition --------------------------------------------------------------------


def create_app(
    config: Config, database: Database, verifier: Verifier, *, signers: list[note.Signer] | None = None,
    transparency_key: bytes | None = None,
) -> web.Application:
    """The HTTP application over a ledger built by the composition root.

    ``signers``: the checkpoint keys (``load_signers(config)``); without them
    the log signs with a key that lives as long as the app (tests, embedding)."""
    app = web.Application(client_max_size=api.BULK_BODY,
                          middlewares=[request_context, request_timeout(config.request_timeout_seconds)])
    app[CONFIG] = config
    app[DATABASE] = database
    app[VERIFIER] = verifier
    app[TOKENS] = VerifiedTokens(verifier)
    app[METRICS] = Metrics()
    app[SUPERVISOR] = Supervisor(stall_after=config.task_stall_seconds)
    app[OPENAPI] = msgspec.json.encode(api.openapi(__version__))
    app[STATISTICS] = Expiring(config.statistics_seconds)
    missing = {op.id for op in api.OPERATIONS} - HANDLERS.keys()
    if missing:
        raise RuntimeError(f"operations without a handler: {sorted(missing)}")
    for op in api.OPERATIONS:
        app.router.add_route(op.method, op.path, _bind(op, HANDLERS[op.id]), name=op.id)
    app.cleanup_ctx.append(_worker_threads_context)
    app.cleanup_ctx.append(_ledger_context(signers, transparency_key))
    app.cleanup_ctx.append(_verifier_context)
    return app


def _ledger_context(signers: list[note.Signer] | None,
                    transparency_key: bytes | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        async with running(app[CONFIG], app[DATABASE], supervisor=app[SUPERVISOR], signers=signers,
                           transparency_key=transparency_key) as parts:
            app[POOL] = parts.reads
            app[STORE] = parts.store
            app[LEDGER] = parts.ledger
            app[READ_SESSIONS] = parts.read_sessions
            app[TILES] = parts.tiles
            app[CHECKPOINTS] = parts.checkpoints
            app[OUTBOX] = parts.outbox
            app[LEASE] = parts.lease
            assert parts.runner is not None and parts.opt_out_filter is not None  # built with decisions
            app[RUNNER] = parts.runner
            app[OPT_OUT_FILTER] = parts.opt_out_filter
            yield

    return context


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

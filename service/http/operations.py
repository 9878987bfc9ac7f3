"""Liveness, readiness, metrics, the OpenAPI document and whoami."""

from __future__ import annotations

import asyncio

from aiohttp import web

from contracts import bodies
from service.app.caller import Caller
from service.http.keys import (
    CHECKPOINTS,
    CONFIG,
    LEASE,
    METRICS,
    OPENAPI,
    OPT_OUT_FILTER,
    POOL,
    RUNNER,
    STORE,
    SUPERVISOR,
)
from service.http.requests import Handler, json_response, required_caller
from service.runtime.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.runtime.metrics import Metrics
from service.store.database import unavailable


async def whoami(request: web.Request, caller: Caller | None) -> web.Response:
    caller = required_caller(caller)
    return json_response(bodies.TokenInfo(subject=caller.subject, roles=sorted(caller.roles), org=caller.org,
                                          patient_scoped=caller.nhs_number is not None))


async def healthz(request: web.Request, caller: Caller | None) -> web.Response:
    return json_response(bodies.Health(status="ok"))


def _not_ready(detail: str) -> web.Response:
    return json_response(bodies.Health(status="unavailable", detail=detail), 503, headers={"Retry-After": "1"})


async def readyz(request: web.Request, caller: Caller | None) -> web.Response:
    """Ready: the database answers, the writer runs, and no background task is stalled."""
    store = request.app[STORE]
    try:
        async with asyncio.timeout(2):
            position, _ = await store.head()
    except TimeoutError:
        return _not_ready("database: no answer within 2 s")
    except Exception as exc:
        if not unavailable(exc):
            raise
        return _not_ready(f"database: {type(exc).__name__}")
    if not store.running:
        return _not_ready("ledger writer stopped")
    stalls = request.app[SUPERVISOR].stalls()
    if stalls:
        return _not_ready("; ".join(str(s) for s in stalls))
    # Replicas out of rotation do not make this instance unready: the primary serves their reads.
    replicas = [bodies.ReplicaHealth(name=r.name, in_rotation=r.healthy, lag=r.lag, problem=r.problem)
                for r in request.app[POOL].replicas]
    return json_response(bodies.Health(status="ok", position=position, replicas=replicas or None,
                                       writer=request.app[LEASE].held))


async def get_metrics(request: web.Request, caller: Caller | None) -> web.Response:
    """Answers while the database is down too: then `consent_ledger_database_up` is 0
    and the figures read from it keep their last values."""
    app = request.app
    metrics = app[METRICS]
    try:
        async with asyncio.timeout(2):
            metrics.head.set((await app[STORE].head())[0])
            metrics.checkpoint.set((await app[CHECKPOINTS].latest()).size)
            await _witness_metrics(app, metrics)
        metrics.database_up.set(1)
    except Exception as exc:
        if not (isinstance(exc, TimeoutError) or unavailable(exc)):
            raise
        metrics.database_up.set(0)
    metrics.queued.set(app[STORE].queued)
    for name, position in app[RUNNER].positions.items():
        metrics.projection.labels(name).set(position)
    metrics.filter.set(app[OPT_OUT_FILTER].position)
    for replica in app[POOL].replicas:
        metrics.replica_lag.labels(replica.name).set(replica.lag if replica.lag is not None else -1)
        metrics.replica_in_rotation.labels(replica.name).set(int(replica.healthy))
    for source, count in app[POOL].served.items():
        metrics.reads_served.labels(source).set(count)
    metrics.tasks(app[SUPERVISOR])
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _witness_metrics(app: web.Application, metrics: Metrics) -> None:
    """How far the witnesses lag the log: the witnessed size against consent_ledger_checkpoint_size."""
    witnesses = [vkey for _, vkey in app[CONFIG].witnesses]
    if not witnesses:
        return
    checkpoints = app[CHECKPOINTS]
    witnessed = await checkpoints.witnessed(witnesses, app[CONFIG].witness_quorum)
    metrics.witnessed.set(witnessed.size if witnessed else 0)
    cosigned = await checkpoints.cosigned_sizes()
    for vkey in witnesses:
        metrics.witness_cosigned.labels(vkey.split("+", 1)[0]).set(cosigned.get(vkey, 0))


async def openapi(request: web.Request, caller: Caller | None) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


HANDLERS: dict[str, Handler] = {
    "whoami": whoami,
    "healthz": healthz,
    "readyz": readyz,
    "metrics": get_metrics,
    "openapi": openapi,
}

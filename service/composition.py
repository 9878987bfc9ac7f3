"""The composition root: configuration in, the running parts out.

``serve`` (through the app factory), ``demo``, the tests and the benchmarks
build the ledger here, and only here: one place decides which store, which
projections, which assessor and which background tasks make a ledger, and
in which order they start and stop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import structlog

from contracts import note
from projections.choices import ChoicesProjection
from projections.optout_filter import OptOutFilter
from projections.runner import Projection, Runner
from projections.uses import UsesProjection
from service.app.assessors import ProjectedOptOutAssessor
from service.app.ledger import Ledger
from service.app.read_records import ReadSessions
from service.app.transparency import Transparency
from service.config import Config
from service.notify.addresses import networks
from service.notify.deliverer import Deliverer
from service.notify.notifier import Notifier
from service.notify.outbox import Outbox
from service.runtime.supervisor import Supervisor
from service.store.checkpoints import CheckpointLog
from service.store.database import Database, replica_pool
from service.store.event_store import EventStore
from service.store.leases import Lease
from service.store.migrations import migrate
from service.store.replicas import ReadRouter, Replica, replica_name
from service.store.tiles import TileReader
from service.witness.submitter import Submitter

log = structlog.get_logger("consent_ledger.composition")


@dataclass(frozen=True)
class Components:
    """A running ledger: what handlers, commands and benchmarks work with."""

    config: Config
    database: Database
    pool: asyncpg.Pool
    store: EventStore
    ledger: Ledger
    read_sessions: ReadSessions
    tiles: TileReader
    checkpoints: CheckpointLog
    opt_out_filter: OptOutFilter | None  # None when built with decisions=False
    runner: Runner | None
    supervisor: Supervisor
    outbox: Outbox
    reads: ReadRouter  # projections, tiles and proofs: from a replica where one may serve them
    lease: Lease  # held while this process does the single-writer work


async def migrated(database: Database) -> list[int]:
    """Bring the schema up to date on the owner's connection, then let it go;
    the migrations applied."""
    conn = await database.connect_owner()
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def default_projections() -> list[Projection]:
    return [ChoicesProjection(), UsesProjection()]


@asynccontextmanager
async def running(
    config: Config,
    database: Database,
    *,
    supervisor: Supervisor | None = None,
    signers: list[note.Signer] | None = None,
    projections: Sequence[Projection] | None = None,
    decisions: bool = True,
    transparency_key: bytes | None = None,
) -> AsyncIterator[Components]:
    """Migrate, then start the writer, the checkpoint signer and the
    projection runner (which also feeds the in-memory decision state);
    stop them in reverse order on leaving.

    ``signers``: the checkpoint keys (``load_signers(config)``); without them
    the log signs with a key that lives as long as this ledger (tests,
    embedding). ``projections``: the runner's tables (default: choices and
    uses; the demo passes none and leaves them to the next ``serve``).
    ``decisions=False``: no in-memory decision state and no runner at all,
    for commands that only write choices (an import): data uses are then
    judged from the ledger's entries."""
    supervisor = supervisor or Supervisor(stall_after=config.task_stall_seconds)
    await migrated(database)
    pool = await database.create_pool(max_size=config.pool_size)
    store = EventStore(pool, queue_size=config.writer_queue_size, max_batch=config.writer_max_batch)
    store.start()
    tiles = TileReader()
    checkpoints = CheckpointLog(pool, tiles, signers or [note.Signer.generate(config.log_origin)],
                                config.log_origin, config.checkpoint_interval)
    runner: Runner | None = None
    outbox = Outbox(pool)
    reads = ReadRouter(pool, [Replica(replica_name(url), await replica_pool(url, max_size=config.pool_size))
                              for url in config.read_database_urls],
                       wait=config.read_wait, max_lag=config.replica_max_lag)
    started: list[str] = []
    try:
        if reads.replicas:
            await reads.check()  # so that the decision state below can already load from a replica
            supervisor.start("replica-health", reads.run, every=reads.interval)
            started.append("replica-health")
        # One process at a time does the single-writer work; every process serves and follows the log.
        lease = Lease(database.connect_app, "writer", interval=config.lease_seconds)
        await lease.take()
        supervisor.start("writer-lease", lease.run, every=lease.interval)
        started.append("writer-lease")
        supervisor.start("checkpoint-signer", lease.guard(checkpoints.run), every=checkpoints.interval)
        started.append("checkpoint-signer")
        if config.witnesses:
            submitter = Submitter(checkpoints, tiles, pool, list(config.witnesses), config.witness_interval)
            supervisor.start("witness-submitter", lease.guard(submitter.run), every=config.witness_interval)
            started.append("witness-submitter")
        optouts: OptOutFilter | None = None
        transparency = Transparency(transparency_key)
        ledger = Ledger(store, approvals=config.approvals, transparency=transparency)
        if decisions:
            began = time.perf_counter()
            optouts = await OptOutFilter.load(reads)
            log.info("decision state loaded from the ledger's entries", position=optouts.position,
                     seconds=round(time.perf_counter() - began, 2), grants=len(optouts.grants),
                     projection_poll_interval=config.projection_poll_interval, filter_wait=config.filter_wait)
            runner = Runner(
                pool,
                default_projections() if projections is None else list(projections),
                leading=lambda: lease.held,
                read_pool=reads,
                followers=[optouts],
                listen=database.connect_app,
                poll_interval=config.projection_poll_interval,
            )
            await runner.prepare()
            supervisor.start("projection-runner", runner.run, every=runner.poll_interval)
            started.append("projection-runner")
            notifier = Notifier(outbox, store, optouts, runner)
            supervisor.start("notifier", lease.guard(notifier.run), every=notifier.poll)
            started.append("notifier")
            deliverer = Deliverer(outbox, networks(config.webhook_allow), timeout=config.webhook_timeout,
                                  retry_base=config.webhook_retry_base, retry_window=config.webhook_retry_window)
            supervisor.start("webhook-deliverer", lease.guard(deliverer.run), every=deliverer.poll)
            started.append("webhook-deliverer")
            ledger = Ledger(store, ProjectedOptOutAssessor(optouts, runner), approvals=config.approvals,
                            transparency=transparency)
        yield Components(
            config=config,
            database=database,
            pool=pool,
            store=store,
            ledger=ledger,
            read_sessions=ReadSessions(store),
            tiles=tiles,
            checkpoints=checkpoints,
            opt_out_filter=optouts,
            runner=runner,
            supervisor=supervisor,
            outbox=outbox,
            reads=reads,
            lease=lease,
        )
    finally:
        for name in reversed(started):
            await supervisor.stop(name)
        if runner is not None:
            await runner.close()
        await store.stop()
        await reads.close()
        await pool.close()

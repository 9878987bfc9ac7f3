"""The application's typed keys: what the app factory puts in and handlers take out."""

from __future__ import annotations

from aiohttp import web

from contracts.bodies import Statistics
from projections.optout_filter import OptOutFilter
from projections.runner import Runner
from service.app.ledger import Ledger
from service.app.read_records import ReadSessions
from service.auth.token_cache import VerifiedTokens
from service.auth.tokens import Verifier
from service.config import Config
from service.notify.outbox import Outbox
from service.pages.cache import Expiring
from service.runtime.metrics import Metrics
from service.runtime.supervisor import Supervisor
from service.runtime.worker_threads import WorkerThreads
from service.store.checkpoints import CheckpointLog
from service.store.database import Database
from service.store.event_store import EventStore
from service.store.leases import Lease
from service.store.replicas import ReadRouter
from service.store.tiles import TileReader

DATABASE = web.AppKey("database", Database)
STORE = web.AppKey("store", EventStore)
# Reads of projections and tiles (from a replica where one may serve them); ledger SQL goes through STORE.
POOL = web.AppKey("pool", ReadRouter)
LEDGER = web.AppKey("ledger", Ledger)
VERIFIER = web.AppKey("verifier", Verifier)
TOKENS = web.AppKey("tokens", VerifiedTokens)
METRICS = web.AppKey("metrics", Metrics)
CONFIG = web.AppKey("config", Config)
OPENAPI = web.AppKey("openapi", bytes)
CHECKPOINTS = web.AppKey("checkpoints", CheckpointLog)
TILES = web.AppKey("tiles", TileReader)
RUNNER = web.AppKey("projection_runner", Runner)
OPT_OUT_FILTER = web.AppKey("opt_out_filter", OptOutFilter)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
WORKERS = web.AppKey("worker_threads", WorkerThreads)
READ_SESSIONS = web.AppKey("read_sessions", ReadSessions)
STATISTICS = web.AppKey("statistics", Expiring[Statistics])
OUTBOX = web.AppKey("outbox", Outbox)
LEASE = web.AppKey("writer_lease", Lease)

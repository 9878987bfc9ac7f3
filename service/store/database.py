"""Where the database is, and connections to it.

With no DATABASE_URL the service runs a private PostgreSQL (pgserver) in the
data directory; with one it uses that server.  Either way migrations run as
the URL's user (the schema owner) and the service's own connections act as
the least-privileged ``consent_ledger_app`` role.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import structlog

from service.config import Config
from service.store.migrations import APP_ROLE

log = structlog.get_logger("consent_ledger.database")

EMBEDDED_DATABASE = "consent_ledger"

# What a database that is down, restarting, shutting down or in recovery, or
# a connection lost or killed under us (pg_terminate_backend), looks like to
# asyncpg.  All of them mean "try again shortly", never "the request is wrong".
_UNAVAILABLE = (
    OSError,  # refused, reset, unreachable (ConnectionRefusedError, ...)
    asyncpg.PostgresConnectionError,  # SQLSTATE 08xxx, ConnectionDoesNotExistError
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,  # 57P01: terminated by an administrator or a fast shutdown
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.InterfaceError,  # "the underlying connection is closed", "another operation is in progress"
    asyncpg.InternalClientError,  # the protocol's state after a lost connection ("cannot switch to state 15")
)


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be used just now."""
    # asyncpg's DataError (a bad query argument) is an InterfaceError, and a bug, not an outage.
    return isinstance(exc, _UNAVAILABLE) and not isinstance(exc, asyncpg.exceptions._base.DataError)


@dataclass(frozen=True)
class Database:
    owner_dsn: str
    embedded: bool
    # In production the service logs in as its own role (see deploy/POSTGRES-ROLES.md)
    # so that it cannot RESET ROLE back to the schema owner.
    service_dsn: str | None = None

    async def connect_owner(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.owner_dsn)

    async def connect_app(self) -> asyncpg.Connection:
        """A lone connection acting as the service role (for LISTEN), logged
        in as the pool is: the service's own login where there is one."""
        return await asyncpg.connect(self.service_dsn or self.owner_dsn, server_settings={"role": APP_ROLE})

    async def create_pool(self, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
        # The `role` startup setting survives asyncpg's RESET ALL on release,
        # so every pooled connection keeps acting as the service role.
        return await asyncpg.create_pool(
            self.service_dsn or self.owner_dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings={"role": APP_ROLE, "application_name": "consent-ledger"},
            reset=_keep_session,
        )


async def replica_pool(dsn: str, *, max_size: int) -> asyncpg.Pool:
    """A pool on a streaming replica, acting as the service role like the primary's. Made lazily
    (min_size 0), so a replica that is down when the service starts only stays out of rotation."""
    return await asyncpg.create_pool(dsn, min_size=0, max_size=max_size,
                                     server_settings={"role": APP_ROLE, "application_name": "consent-ledger-reads"},
                                     reset=_keep_session)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's default reset query.

    The pool still rolls back an open transaction before calling this.  The
    default reset (RESET ALL; CLOSE ALL; UNLISTEN *; advisory unlock) is one
    more round trip on every release — about 30 us of Python and 20 us of
    PostgreSQL CPU, more under load — and guards against session state this
    service never leaves on pooled connections: settings are per
    transaction, cursors live inside transactions, LISTEN uses a lone
    connection.  Keep it that way, or restore the default here.
    """


def pgserver() -> Any:
    """The pgserver package, imported quietly: at import it looks up a runtime
    directory and warns when XDG_RUNTIME_DIR is unset (it then uses /tmp),
    which is noise on every command of a server or container without a login
    session."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="platformdirs")
        import pgserver as package
        import pgserver.postgres_server  # noqa: F401 - the module whose class attributes warn

    return package


def pgdata_of(config: Config) -> Path:
    return config.data_dir / "pgdata"


@dataclass(frozen=True)
class Postmaster:
    """An embedded PostgreSQL running on a data directory, and the processes
    that hold it open (pgserver stops it when the last of them exits)."""

    pid: int
    pgdata: Path
    holders: tuple[int, ...]
    gone: tuple[int, ...]  # recorded holders that no longer run (killed: they never let go)
    managed: bool = True  # started by pgserver, which keeps a list of its holders

    @property
    def stray(self) -> bool:
        """Left running by processes that were killed: nothing will stop it."""
        return self.managed and not self.holders

    def how_to_stop(self) -> str:
        return f"kill -INT {self.pid}"


def running_postmaster(pgdata: Path) -> Postmaster | None:
    """The PostgreSQL running on ``pgdata``, from its ``postmaster.pid`` and pgserver's holder list."""
    import json

    import psutil

    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    try:
        recorded = [int(p) for p in json.loads((pgdata / ".handle_pids.json").read_text())]
    except FileNotFoundError:
        return Postmaster(pid, pgdata, (), (), managed=False)
    except (OSError, ValueError, TypeError):
        recorded = []
    alive = tuple(p for p in recorded if psutil.pid_exists(p))
    return Postmaster(pid, pgdata, alive, tuple(p for p in recorded if p not in alive))


def _forget_killed_holders(pgdata: Path) -> None:
    """pgserver stops the server when its last holder exits, but a holder
    that was killed (SIGKILL, a closed terminal) never says it left, so the
    server would run for ever.  Forget those before taking hold: this command
    then stops the server when it ends, as if the killed one had."""
    import json

    import psutil

    holders = pgdata / ".handle_pids.json"
    server_class = pgserver().postgres_server.PostgresServer
    with server_class._lock:  # the lock pgserver holds while it edits this list
        try:
            recorded = [int(p) for p in json.loads(holders.read_text())]
        except (OSError, ValueError, TypeError):
            return
        alive = [p for p in recorded if psutil.pid_exists(p)]
        if alive == recorded:
            return
        running = running_postmaster(pgdata)
        if running is not None:
            log.warning("an embedded PostgreSQL was left running by a process that was killed; this command "
                        "takes it over and stops it when it ends", pid=running.pid, pgdata=str(pgdata))
        holders.write_text(json.dumps(alive))


def _start_embedded(config: Config) -> str:
    pgdata = pgdata_of(config)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if pgdata.exists():
        _forget_killed_holders(pgdata)
    server = pgserver().get_server(pgdata, cleanup_mode="stop")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
    uri = server.get_uri()
    return uri.replace("/postgres?", f"/{EMBEDDED_DATABASE}?", 1)


async def locate(config: Config) -> Database:
    if config.database_url:
        return Database(owner_dsn=config.database_url, embedded=False, service_dsn=config.service_database_url)
    dsn = await asyncio.to_thread(_start_embedded, config)
    return Database(owner_dsn=dsn, embedded=True)


def describe(dsn: str) -> str:
    """A DSN without credentials, safe to log: ``postgresql://host:port/db``,
    or for a Unix socket ``postgresql:///db (socket in DIR)``."""
    parts = urlsplit(dsn)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    host = "" if socket_dir else parts.hostname or ""
    port = f":{parts.port}" if parts.port and host else ""
    where = f"{parts.scheme}://{host}{port}{parts.path}"
    return f"{where} (socket in {socket_dir})" if socket_dir else where

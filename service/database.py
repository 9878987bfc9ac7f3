"""Where the database is, and connections to it.

With no DATABASE_URL the service runs a private PostgreSQL (pgserver) in the
data directory; with one it uses that server.  Either way migrations run as
the URL's user (the schema owner) and the service's own connections act as
the least-privileged ``consent_ledger_app`` role.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg

from .config import Config
from .schema import APP_ROLE

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
        """A lone connection acting as the service role (for LISTEN)."""
        return await asyncpg.connect(self.owner_dsn, server_settings={"role": APP_ROLE})

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


def _start_embedded(config: Config) -> str:
    import pgserver  # imported lazily: only the embedded default needs it

    pgdata = config.data_dir / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
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
    """A DSN without credentials, safe to log."""
    parts = urlsplit(dsn)
    host = parts.hostname or parts.query
    return f"{parts.scheme}://{host}{parts.path}"

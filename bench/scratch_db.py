"""A fresh, migrated database for one benchmark run, dropped afterwards.

Benchmarks never write into a database someone uses: they create
``cl_bench_<random>`` on the server (the machine's PostgreSQL by default, or
an embedded pgserver with ``--embedded``) and drop it when done.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from service.store.database import Database
from service.store.migrations import migrate

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_dsn(embedded: bool) -> str:
    if embedded:
        import pgserver

        # The server outlives nothing: stopped when this process exits.
        server = pgserver.get_server(tempfile.mkdtemp(prefix="cl-bench-pg-"), cleanup_mode="delete")
        return server.get_uri()
    dsn = os.environ.get("DATABASE_URL") or DEFAULT_DSN
    host = urlsplit(dsn).hostname
    # Benchmarks only ever load this machine.
    if host not in (None, "", "127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to benchmark a non-loopback server ({host})")
    return dsn


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@asynccontextmanager
async def scratch_database(admin_dsn: str) -> AsyncIterator[Database]:
    name = f"cl_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(admin_dsn, name)
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        try:
            yield Database(owner_dsn=dsn, embedded=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()

"""Test fixtures: a real PostgreSQL (embedded pgserver unless DATABASE_URL is
set), a fresh migrated database per test, and the HTTP app on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey

from service.auth.tokens import Verifier
from service.store.database import Database
from service.http.keys import STORE
from service import config as config_module
from service.config import Config
from service.http.app import create_app
from service.store.migrations import migrate
from service.store.event_store import EventStore

ISSUER = "https://idp.test"
AUDIENCE = "consent-ledger"


def app_config(**changes: Any) -> Config:
    """The service's defaults (not this machine's environment), with ``changes``."""
    return dataclasses.replace(config_module.load({}), **changes)


def _dsn_with_database(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    # Not under pytest's basetemp: a concurrent pytest session prunes old
    # basetemp folders and would delete a running server's data directory.
    pgdata = tempfile.mkdtemp(prefix="consent-ledger-test-pg-")
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"cl_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(_dsn_with_database(admin_dsn, name))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield name
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture(scope="session")
async def drop_later(admin_dsn: str) -> AsyncIterator[Callable[[str], None]]:
    """Drop test databases in the background: each DROP DATABASE waits for a
    checkpoint (~0.3-2 s on a busy machine), which would otherwise dominate
    the suite's time; concurrent drops share checkpoints."""
    pending: list[asyncio.Task[None]] = []
    slots = asyncio.Semaphore(4)

    async def drop(name: str) -> None:
        async with slots:
            admin = await asyncpg.connect(admin_dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()

    yield lambda name: pending.append(asyncio.create_task(drop(name)))
    await asyncio.gather(*pending)


@pytest.fixture
async def new_database(
    admin_dsn: str, template_database: str, drop_later: Callable[[str], None]
) -> AsyncIterator[Callable[[], Awaitable[Database]]]:
    """Makes fresh migrated databases (dropped after the test): a second
    ledger for tests that move records from one to another."""
    made: list[str] = []

    async def make() -> Database:
        name = f"cl_test_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        finally:
            await admin.close()
        made.append(name)
        return Database(owner_dsn=_dsn_with_database(admin_dsn, name), embedded=False)

    yield make
    for name in made:
        drop_later(name)


@pytest.fixture
async def database(new_database: Callable[[], Awaitable[Database]]) -> Database:
    return await new_database()


@pytest.fixture
async def pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    p = await database.create_pool(min_size=1, max_size=8)
    yield p
    await p.close()


@pytest.fixture
async def store(pool: asyncpg.Pool) -> AsyncIterator[EventStore]:
    s = EventStore(pool, queue_size=1000, max_batch=200)
    s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="session")
def signing_key() -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": "test-key"})


@pytest.fixture(scope="session")
def verifier(signing_key: OKPKey) -> Verifier:
    public = KeySet.import_key_set({"keys": [signing_key.as_dict(private=False)]})
    return Verifier(public, ISSUER, AUDIENCE)


TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def make_token(signing_key: OKPKey) -> TokenFactory:
    def make(role: str | None = None, *, org: str | None = None, nhs_number: str | None = None,
             subject: str | None = None, key: Any = None, header: dict[str, Any] | None = None,
             **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER, "aud": AUDIENCE, "sub": subject or f"test-{role}",
            "roles": [role] if role else [], "iat": now, "nbf": now, "exp": now + 600,
        }
        if org:
            body["org"] = org
        if nhs_number:
            body["nhs_number"] = nhs_number
        body.update(claims)
        return jwt.encode(header or {"alg": "EdDSA", "kid": "test-key"}, body, key or signing_key,
                          algorithms=["EdDSA", "ES256", "HS256"])

    return make


@pytest.fixture
async def client(database: Database, verifier: Verifier) -> AsyncIterator[TestClient]:
    app = create_app(app_config(pool_size=6), database, verifier)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


@pytest.fixture
def app_store(client: TestClient) -> EventStore:
    return client.server.app[STORE]

"""Reads of personal data are recorded in the ledger; limits hold under
pressure (full write queue, slow clients, big bodies)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import app_config
from samples import VALID, auth, choice, head_position

from contracts import api
from service.app.read_records import READ_HEADER
from service.audit.chain import verify_database
from service.http.app import create_app
from service.http.keys import POOL, STORE

PATIENT = VALID[0]


async def _until(condition, what: str) -> None:
    for _ in range(1000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def _entry(client, token: str, position: int) -> dict:
    r = await client.get(f"/v1/events/{position}", headers=auth(token))
    assert r.status == 200
    return await r.json()


async def test_a_patient_apps_read_of_choices_is_recorded_before_it_is_served(client, make_token, database):
    app_token = make_token("patient-app", subject="nhs-app-backend")
    assert (await client.post(f"/v1/patients/{PATIENT}/opt-out", json=choice(), headers=auth(app_token))).status == 201
    r = await client.get(f"/v1/patients/{PATIENT}/choices", headers=auth(app_token, **{"X-Request-Id": "req-42"}))
    assert r.status == 200
    recorded = int(r.headers[READ_HEADER])
    assert recorded == 2 == await head_position(database)

    entry = await _entry(client, make_token("auditor"), recorded)
    assert entry["event_type"] == "PersonalDataRead"
    assert entry["payload"] == {
        "what": "choices", "role": "patient-app", "recorded_by": "nhs-app-backend",
        "nhs_number": PATIENT, "request_id": "req-42",
    }
    own = make_token("patient-app", nhs_number=PATIENT, subject="nhs-app")
    r = await client.get(f"/v1/patients/{PATIENT}/choices", headers=auth(own))
    entry = await _entry(client, make_token("auditor"), int(r.headers[READ_HEADER]))
    assert entry["payload"]["by_patient"] is True and entry["payload"]["recorded_by"] == "nhs-app"


async def test_auditor_reads_record_the_range_read_not_the_nhs_numbers(client, make_token, database):
    app_token, auditor = make_token("patient-app"), make_token("auditor", subject="regulator-1")
    for nhs in VALID:
        assert (await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=auth(app_token))).status == 201
    r = await client.get("/v1/events?after=1&limit=2", headers=auth(auditor))
    assert r.status == 200
    page = await r.json()
    assert [e["position"] for e in page["events"]] == [2, 3]
    recorded = int(r.headers[READ_HEADER])
    assert recorded == 4

    # Reading the read record is itself a read (auditors are audited too).
    entry = await _entry(client, auditor, recorded)
    payload = entry["payload"]
    assert payload["what"] == "entries" and payload["role"] == "auditor"
    assert payload["recorded_by"] == "regulator-1"
    assert (payload["first_position"], payload["last_position"], payload["entries"]) == (2, 3, 2)
    assert "nhs_number" not in payload and not any(n in str(payload) for n in VALID)
    assert await head_position(database) == 5

    # Nothing read, nothing recorded.
    r = await client.get("/v1/events?after=100", headers=auth(auditor))
    assert r.status == 200 and READ_HEADER not in r.headers
    assert (await client.get("/v1/events/100", headers=auth(auditor))).status == 404
    assert await head_position(database) == 5

    async with client.server.app[POOL].acquire() as conn:
        verified = await verify_database(conn)
    assert verified.failure is None and verified.size == 5


@pytest.fixture
async def busy_client(database, verifier) -> AsyncIterator[TestClient]:
    app = create_app(app_config(pool_size=4, writer_queue_size=1, writer_max_batch=1), database, verifier)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def test_full_write_queue_answers_503_with_retry_after(busy_client, make_token, database):
    client, token = busy_client, make_token("patient-app")
    store = client.server.app[STORE]
    blocker = await database.connect_owner()
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("SELECT * FROM ledger_head FOR UPDATE")  # the writer will wait on this row
    try:
        first = asyncio.create_task(client.post(f"/v1/patients/{VALID[0]}/opt-out", json=choice(), headers=auth(token)))

        async def writer_waiting() -> bool:
            return bool(await blocker.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"))

        await _until(writer_waiting, "the writer waits for the head row")
        second = asyncio.create_task(client.post(f"/v1/patients/{VALID[1]}/opt-out", json=choice(), headers=auth(token)))

        async def queue_full() -> bool:
            return store._queue.full()

        await _until(queue_full, "the queue holds the second write")
        r = await client.post(f"/v1/patients/{VALID[2]}/opt-out", json=choice(), headers=auth(token))
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert (await r.json())["type"].endswith(":busy")
        # A read that cannot be recorded is not served either.
        r = await client.get(f"/v1/patients/{VALID[2]}/choices", headers=auth(token))
        assert r.status == 503 and "Retry-After" in r.headers
        assert "nhs_number" not in await r.text()
    finally:
        await tx.rollback()
        await blocker.close()
    assert [(await t).status for t in (first, second)] == [201, 201]
    assert await head_position(database) == 2


@pytest.fixture
async def impatient_client(database, verifier) -> AsyncIterator[TestClient]:
    app = create_app(app_config(pool_size=4, request_timeout_seconds=0.3), database, verifier)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def test_a_client_that_trickles_its_body_is_timed_out(impatient_client, make_token, database):
    client = impatient_client
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            f"POST /v1/patients/{PATIENT}/opt-out HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {make_token('patient-app')}\r\nContent-Length: 500\r\n\r\n{{\"scope\": ".encode()
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout=30)
        assert status.split()[1] == b"503", status
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)).decode().lower()
        assert "retry-after: 1" in head
    finally:
        writer.close()
    assert await head_position(database) == 0


async def test_bodies_over_the_endpoint_limit_are_413_and_write_nothing(client, make_token, database):
    big = b'{"scope": "national", "channel": "app", "actor": {"kind": "patient"}, "pad": "' + b"x" * api.SMALL_BODY + b'"}'
    r = await client.post(f"/v1/patients/{PATIENT}/opt-out", data=big,
                          headers=auth(make_token("patient-app"), **{"Content-Type": "application/json"}))
    assert r.status == 413
    assert await head_position(database) == 0


def test_the_cohort_size_limit_is_in_the_published_schema():
    schema = api.openapi("test")["components"]["schemas"]["DataUseRequest"]["properties"]["nhs_numbers"]
    variants = schema.get("anyOf", [schema])
    assert any(v.get("maxItems") == api.MAX_COHORT_SIZE == 5_000_000 for v in variants), schema

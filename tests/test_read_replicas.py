"""Reads from a real streaming replica (issue 17, part B): projections, tiles
and proofs are read there, a read naming a position never sees an older
state, and a replica that stops is taken out of rotation and brought back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import app_config
from replication import StreamingPair, streaming_pair  # noqa: F401 (the fixture)
from samples import auth, choice, grant, nhs_numbers
from service.http.app import create_app
from service.http.keys import POOL
from service.store.database import Database


@pytest.fixture
async def replicated(streaming_pair: StreamingPair, verifier) -> AsyncIterator[tuple[TestClient, str]]:
    name = f"reads_{uuid.uuid4().hex[:8]}"
    await streaming_pair.create_database(name)
    config = app_config(read_database_urls=(streaming_pair.replica.database_url(name),), read_wait=1.0,
                        projection_poll_interval=0.05, pool_size=4)
    app = create_app(config, Database(owner_dsn=streaming_pair.primary.database_url(name), embedded=False), verifier)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client, name


def _ran(pair: StreamingPair, server, mark, name: str, table: str) -> int:
    return sum(table in s.text for s in pair.statements(server, since=mark, database=name))


async def _rotation(client: TestClient, in_rotation: bool, seconds: float = 20.0) -> dict:
    for _ in range(int(seconds * 10)):
        health = await (await client.get("/readyz")).json()
        if health["replicas"][0]["in_rotation"] is in_rotation:
            return health
        await asyncio.sleep(0.1)
    raise AssertionError(f"the replica did not go {'into' if in_rotation else 'out of'} rotation: {health}")


async def test_projection_and_proof_reads_come_from_the_replica(replicated, streaming_pair: StreamingPair,
                                                               make_token):
    client, name = replicated
    nhs = nhs_numbers(1, seed=71)[0]
    r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=auth(make_token("patient-app")))
    position = (await r.json())["position"]
    await client.post("/v1/grants", json=grant("G-1"), headers=auth(make_token("dac")))
    await streaming_pair.wait_for_replay()
    await _rotation(client, True)
    mark = streaming_pair.mark()
    for _ in range(3):
        assert (await client.get("/v1/register")).status == 200
    mine = auth(make_token("patient-app", nhs_number=nhs), **{"Ledger-Min-Position": str(position)})
    history = await (await client.get(f"/v1/patients/{nhs}/history", headers=mine)).json()
    assert [i["position"] for i in history["items"]] == [position]
    assert (await client.get("/v1/proofs/inclusion", params={"position": position, "tree_size": position})).status \
        == 200
    await asyncio.sleep(0.5)  # the statement log is written asynchronously
    assert _ran(streaming_pair, streaming_pair.replica, mark, name, "grants_view") >= 3
    assert _ran(streaming_pair, streaming_pair.replica, mark, name, "patient_choice_history") >= 1
    assert _ran(streaming_pair, streaming_pair.primary, mark, name, "grants_view") == 0
    assert _ran(streaming_pair, streaming_pair.primary, mark, name, "patient_choice_history") == 0
    metrics = await (await client.get("/metrics")).text()
    assert "consent_ledger_replica_in_rotation{" in metrics and "consent_ledger_replica_lag_entries{" in metrics


async def test_a_read_naming_a_position_never_sees_an_older_state(replicated, streaming_pair: StreamingPair,
                                                                 make_token):
    client, name = replicated
    await _rotation(client, True)
    app = auth(make_token("patient-app"))
    router = client.server.app[POOL]
    await streaming_pair.pause_replay()
    try:
        for nhs in nhs_numbers(5, seed=72):
            position = (await (await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(channel="phone"),
                                                 headers=app)).json())["position"]
            served = dict(router.served)
            mine = auth(make_token("patient-app", nhs_number=nhs), **{"Ledger-Min-Position": str(position)})
            for _ in range(100):  # the history projection, not the replica, may still be a moment behind
                page = await (await client.get(f"/v1/patients/{nhs}/history", headers=mine)).json()
                if page["items"]:
                    break
                await asyncio.sleep(0.05)
            assert page["as_of"] >= position and page["items"][0]["position"] == position
            assert router.served["primary"] > served["primary"]  # the paused replica could not answer it
    finally:
        await streaming_pair.resume_replay()
    await streaming_pair.wait_for_replay()
    before = dict(router.served)
    await client.get(f"/v1/patients/{nhs}/history", headers=mine)
    replica = next(k for k in router.served if k != "primary")
    assert router.served[replica] > before[replica]  # caught up: the replica serves it again


async def test_a_stopped_replica_leaves_the_rotation_and_comes_back(replicated, streaming_pair: StreamingPair):
    client, name = replicated
    await _rotation(client, True)
    streaming_pair.replica.stop()
    try:
        health = await _rotation(client, False)
        assert health["status"] == "ok" and health["replicas"][0]["problem"]
        for _ in range(3):
            assert (await client.get("/v1/register")).status == 200  # from the primary meanwhile
    finally:
        streaming_pair.replica.start()
    await streaming_pair.wait_for_replay()
    await _rotation(client, True)
    router = client.server.app[POOL]
    replica = next(k for k in router.served if k != "primary")
    before = router.served[replica]
    assert (await client.get("/v1/register")).status == 200
    assert router.served[replica] == before + 1

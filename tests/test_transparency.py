"""Checkpoints, tiles, proofs and receipts served by a live app on loopback,
checked with the RFC 9162 reference and the independent note parser."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from uuid import uuid4

from conftest import app_config
from samples import auth, choice
from test_merkle import independent_open, ref_mth, ref_path, ref_proof

from contracts import merkle, note
from contracts.events import OptOutRegistered
from contracts.values import Actor
from service.http.app import create_app
from service.http.keys import CHECKPOINTS, POOL, STORE
from service.store.checkpoints import CheckpointLog
from service.store.event_log import NewEvent
from service.store.event_store import EventStore
from service.store.tiles import TileReader


def opt_outs(count: int, nhs: str = "9434765919") -> list[NewEvent]:
    agg = uuid4()
    return [
        NewEvent(uuid4(), "OptOutRegistered", agg, v,
                 OptOutRegistered(nhs_number=nhs, scope="national", channel="app",
                                  actor=Actor(kind="patient"), recorded_by="test"))
        for v in range(1, count + 1)
    ]


async def entries_of(pool) -> list[bytes]:
    async with pool.acquire() as conn:
        return [bytes(r[0]) for r in await conn.fetch("SELECT entry FROM ledger_events ORDER BY position")]


async def test_checkpoint_tiles_and_proofs_match_the_reference(client, make_token):
    store: EventStore = client.server.app[STORE]
    for size in (1, 255, 300):  # grow across a tile boundary in uneven batches
        await store.append(opt_outs(size))
    await client.server.app[CHECKPOINTS].sign()
    entries = await entries_of(client.server.app[POOL])
    n = len(entries)
    assert n == 556

    keys = await (await client.get("/v1/log-key")).json()
    r = await client.get("/checkpoint")
    assert r.headers["Content-Type"].startswith("text/plain")
    text = await r.text()
    lines = independent_open(text, keys["keys"][0])
    assert lines == [keys["origin"], str(n), base64.b64encode(ref_mth(entries)).decode()]

    # Level-0 tiles are the leaf hashes; level 1 the roots of full level-0 tiles.
    leaves = [hashlib.sha256(b"\x00" + e).digest() for e in entries]
    assert await (await client.get("/tile/0/000")).read() == b"".join(leaves[:256])
    assert await (await client.get("/tile/0/002.p/44")).read() == b"".join(leaves[512:556])
    assert await (await client.get("/tile/1/000.p/2")).read() == ref_mth(entries[:256]) + ref_mth(entries[256:512])
    huge = "/".join(["x999"] * 6 + ["999"])  # beyond any position a log can hold: not a 500
    for missing in ("/tile/0/002", "/tile/0/003.p/1", "/tile/0/x000/002", "/tile/00/000", "/tile/0/002.p/045",
                    f"/tile/0/{huge}", f"/tile/3/{huge}.p/7"):
        assert (await client.get(missing)).status == 404, missing
    assert (await client.get(f"/tile/entries/{huge}", headers=auth(make_token("auditor")))).status == 404

    bundle = await (await client.get("/tile/entries/001", headers=auth(make_token("auditor")))).read()
    parsed, offset = [], 0
    while offset < len(bundle):
        length = int.from_bytes(bundle[offset:offset + 2], "big")
        parsed.append(bundle[offset + 2:offset + 2 + length])
        offset += 2 + length
    assert parsed == entries[256:512]
    assert (await client.get("/tile/entries/001")).status == 401
    assert (await client.get("/tile/entries/001", headers=auth(make_token("sde", org="X")))).status == 403

    for position in (1, 2, 255, 256, 257, 300, 512, 556):
        body = await (await client.get(f"/v1/proofs/inclusion?position={position}")).json()
        assert body["tree_size"] == n and body["leaf_index"] == position - 1
        assert [bytes.fromhex(h) for h in body["hashes"]] == ref_path(position - 1, entries)
    for old, new in ((1, 556), (255, 256), (256, 300), (300, 556), (556, 556), (7, 512)):
        body = await (await client.get(f"/v1/proofs/consistency?from={old}&to={new}")).json()
        assert (body["from"], body["to"]) == (old, new)
        assert [bytes.fromhex(h) for h in body["hashes"]] == (ref_proof(old, entries[:new]) if old < new else [])
    assert (await client.get("/v1/proofs/inclusion?position=557")).status == 400
    assert (await client.get("/v1/proofs/inclusion?position=1&tree_size=900")).status == 404
    assert (await client.get("/v1/proofs/consistency?from=9&to=3")).status == 400
    missing = await client.get("/v1/proofs/inclusion")
    assert missing.status == 400 and (await missing.json())["errors"][0]["path"] == "query.position"


async def test_patient_receipt_proves_only_their_own_event(client, make_token):
    mine, other = "9434765919", "4010232137"
    token = make_token("patient-app", nhs_number=mine)
    r = await client.post(f"/v1/patients/{mine}/opt-out", json=choice(), headers=auth(token))
    receipt = await r.json()
    r2 = await client.post(f"/v1/patients/{other}/opt-out", json=choice(), headers=auth(make_token("patient-app")))
    theirs = await r2.json()

    body = await (await client.get(f"/v1/patients/{mine}/receipts/{receipt['position']}", headers=auth(token))).json()
    assert body["leaf_hash"] == receipt["leaf_hash"] == hashlib.sha256(b"\x00" + body["entry"].encode()).hexdigest()
    signed = note.open_checkpoint(body["checkpoint"], client.server.app[CHECKPOINTS].verifiers)
    assert signed.size >= receipt["position"]
    merkle.verify_inclusion(body["proof"]["leaf_index"], body["proof"]["tree_size"], bytes.fromhex(body["leaf_hash"]),
                            [bytes.fromhex(h) for h in body["proof"]["hashes"]], signed.root)

    backend = make_token("patient-app")
    assert (await client.get(f"/v1/patients/{mine}/receipts/{theirs['position']}", headers=auth(backend))).status == 404
    assert (await client.get(f"/v1/patients/{mine}/receipts/999", headers=auth(backend))).status == 404
    assert (await client.get(f"/v1/patients/{other}/receipts/{theirs['position']}", headers=auth(token))).status == 403


async def test_checkpoints_stay_consistent_under_concurrent_writers_and_restarts(database, verifier):
    signer = note.Signer.generate("consent-ledger.example/log")
    sizes_seen: list[int] = []
    for restart in range(2):
        # Two service instances on one database: two writers, two checkpoint signers.
        apps = [create_app(app_config(pool_size=4, checkpoint_interval=0.01), database, verifier, signers=[signer])
                for _ in range(2)]
        from aiohttp.test_utils import TestServer
        servers = [TestServer(app, host="127.0.0.1") for app in apps]
        for s in servers:
            await s.start_server()
        stores = [app[STORE] for app in apps]
        logs = [app[CHECKPOINTS] for app in apps]

        async def write(i: int) -> None:
            await stores[i % 2].append(opt_outs(1 + i % 5))

        async def sign(i: int) -> None:
            sizes_seen.append((await logs[i % 2].sign()).size)

        await asyncio.gather(*(write(i) for i in range(60)), *(sign(i) for i in range(30)))
        await logs[0].sign()
        for s in servers:
            await s.close()

    conn = await database.connect_owner()
    try:
        rows = await conn.fetch("SELECT tree_size, root, note FROM checkpoints ORDER BY tree_size")
        entries = [bytes(r[0]) for r in await conn.fetch("SELECT entry FROM ledger_events ORDER BY position")]
    finally:
        await conn.close()
    assert len(rows) >= 3 and rows[-1]["tree_size"] == len(entries)
    for row in rows:
        cp = note.open_checkpoint(row["note"], [signer.verifier])
        assert cp.root == bytes(row["root"]) == ref_mth(entries[:row["tree_size"]])
    for a, b in zip(rows, rows[1:]):
        if a["tree_size"]:
            merkle.verify_consistency(a["tree_size"], b["tree_size"], bytes(a["root"]), bytes(b["root"]),
                                      ref_proof(a["tree_size"], entries[:b["tree_size"]]))


async def test_signer_refuses_a_tree_inconsistent_with_the_last_checkpoint(database, pool):
    store = EventStore(pool)
    store.start()
    try:
        await store.append(opt_outs(300))
    finally:
        await store.stop()
    log = CheckpointLog(pool, TileReader(), [note.Signer.generate("consent-ledger.example/log")], "x.example/log")
    first = await log.sign()
    conn = await database.connect_owner()
    try:
        # Rewrite history below the checkpoint (as a superuser bypassing the triggers) and grow.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("UPDATE merkle_tiles SET hashes = overlay(hashes placing '\\xff'::bytea from 1 for 1),"
                           " root = overlay(root placing '\\xff'::bytea from 1 for 1)"
                           " WHERE level = 0 AND n = 0")
        await conn.execute("SET session_replication_role = DEFAULT")
    finally:
        await conn.close()
    store = EventStore(pool)
    store.start()
    try:
        await store.append(opt_outs(3))
    finally:
        await store.stop()
    import pytest

    from service.store.checkpoints import CheckpointRefused
    restarted = CheckpointLog(pool, TileReader(), log.signers, "x.example/log")  # no cached tiles
    with pytest.raises(CheckpointRefused):
        await restarted.sign()
    assert (await restarted.latest()) == first


async def test_tile_store_matches_the_reference_at_the_tlog_tiles_example_size(database):
    """70,000 leaves (the tlog-tiles spec's example), loaded in uneven chunks
    through the writer's tile step: full and partial tiles on three levels."""
    import hashlib as h
    import uuid
    from datetime import datetime, timezone

    from service.store import tiles

    size = 70_000
    entries = [b'{"position":%d}' % p for p in range(1, size + 1)]
    leaves = [h.sha256(b"\x00" + e).digest() for e in entries]
    conn = await database.connect_owner()
    try:
        now, done, step = datetime.now(timezone.utc), 0, 1
        while done < size:
            upto = min(size, done + step)
            rows = [(p, uuid.UUID(int=p), "Bench", uuid.UUID(int=p), 1, now, entries[p - 1], leaves[p - 1], bytes(32))
                    for p in range(done + 1, upto + 1)]
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "ledger_events", records=rows,
                    columns=["position", "event_id", "event_type", "aggregate_id", "aggregate_version",
                             "recorded_at", "entry", "leaf_hash", "chain_hash"])
                await tiles.extend(conn, done, upto)
            done, step = upto, step * 3 + 1  # 1, 4, 13, ... crosses boundaries at odd offsets
        stored = {(r["level"], r["n"]) for r in await conn.fetch("SELECT level, n FROM merkle_tiles")}
        assert stored == {(lv, n) for lv, n, w in merkle.tiles_for(size) if w == merkle.TILE_WIDTH}

        reader = TileReader()
        assert await reader.tile(conn, 1, 0, 256) == b"".join(ref_mth(entries[i:i + 256]) for i in range(0, 65536, 256))
        assert await reader.tile(conn, 2, 0, 1) == ref_mth(entries[:65536])
        assert await reader.tile(conn, 1, 1, 18) is None  # the tree has only 17 there
        assert await reader.root(conn, size) == ref_mth(entries)
        for index in (0, 255, 256, 65535, 65536, 69_999, 12_345):
            assert await reader.inclusion(conn, index, size) == ref_path(index, entries)
        for old in (1, 256, 65535, 65536, 65537, 69_999):
            assert await reader.consistency(conn, old, size) == ref_proof(old, entries)
        assert await reader.consistency(conn, 1000, 66_000) == ref_proof(1000, entries[:66_000])
    finally:
        await conn.close()


async def test_tiles_and_checkpoints_are_append_only_and_never_shrink(database, pool):
    import asyncpg
    import pytest

    from service.store.checkpoints import CheckpointRefused

    store = EventStore(pool)
    store.start()
    try:
        await store.append(opt_outs(260))
    finally:
        await store.stop()
    log = CheckpointLog(pool, TileReader(), [note.Signer.generate("x.example/log")], "x.example/log")
    signed = await log.sign()
    async with pool.acquire() as conn:  # the service role
        for sql in ("UPDATE merkle_tiles SET root = root", "DELETE FROM checkpoints", "TRUNCATE merkle_tiles"):
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute(sql)
    owner = await database.connect_owner()
    try:
        await owner.execute("INSERT INTO checkpoint_cosignatures (tree_size, witness, line)"
                            " SELECT tree_size, 'w', 'line' FROM checkpoints ORDER BY tree_size DESC LIMIT 1")
        for sql in ("UPDATE checkpoints SET note = ''", "DELETE FROM merkle_tiles", "TRUNCATE checkpoints CASCADE",
                    "UPDATE checkpoint_cosignatures SET line = ''", "TRUNCATE checkpoint_cosignatures"):
            with pytest.raises(asyncpg.PostgresError, match="append-only"):
                await owner.execute(sql)
        # A superuser winds the head back behind the signed checkpoint: the signer refuses.
        await owner.execute("SET session_replication_role = replica")
        await owner.execute("UPDATE ledger_head SET position = 100")
    finally:
        await owner.close()
    with pytest.raises(CheckpointRefused, match="behind"):
        await log.sign()
    assert await log.latest() == signed

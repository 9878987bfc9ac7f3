"""`consent-ledger verify` and `export` as subprocesses against a live server on
loopback: an honest log verifies; each kind of tampering done as a superuser
in PostgreSQL (bypassing the append-only triggers) is caught at its first bad
position, live and in an export; forks and rollbacks are refused by --state."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import sys
from pathlib import Path

import msgspec
import pytest
from conftest import app_config
from test_merkle import ref_mth
from test_transparency import opt_outs

from contracts import note
from contracts.entry import chain_hash, leaf_hash
from service.http.keys import CHECKPOINTS, POOL, STORE

SIZE = 600


async def cli(*args: str, token: str | None = None) -> tuple[int, str]:
    env = {**os.environ, "CONSENT_LEDGER_TOKEN": token or ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli.main", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


@pytest.fixture
async def live(client, make_token, tmp_path):
    """A served log of SIZE entries with a signed checkpoint over all of them."""
    store = client.server.app[STORE]
    for chunk in (250, 250, 100):
        await store.append(opt_outs(chunk, nhs="9434765919"))
    await client.server.app[CHECKPOINTS].sign()
    vkey = client.server.app[CHECKPOINTS].signers[0].verifier.vkey
    key_file = tmp_path / "log.vkey"
    key_file.write_text(vkey + "\n")
    url = str(client.make_url("")).rstrip("/")
    return url, str(key_file), make_token("auditor")


async def superuser(database, *statements: str, args=()) -> None:
    conn = await database.connect_owner()
    try:
        await conn.execute("SET session_replication_role = replica")  # triggers off: a superuser attack
        for sql in statements:
            await conn.execute(sql, *args) if args else await conn.execute(sql)
    finally:
        await conn.close()


async def test_honest_log_verifies_live_and_exported_and_state_advances(live, tmp_path, client):
    url, key, token = live
    state = tmp_path / "state.json"
    code, out = await cli("verify", "--url", url, "--key", key, "--state", str(state), token=token)
    assert code == 0, out
    assert f"OK: {SIZE} entries verified" in out
    async with client.server.app[POOL].acquire() as conn:
        # The auditor's own reads are recorded after the checkpoint it verified.
        head_chain = bytes(await conn.fetchval(
            "SELECT chain_hash FROM ledger_events WHERE position = $1", SIZE)).hex()
    assert f"chain {head_chain}" in out
    assert json.loads(state.read_text())["size"] == SIZE

    await client.server.app[STORE].append(opt_outs(5))
    grown = (await client.server.app[CHECKPOINTS].sign()).size
    assert grown >= SIZE + 5  # plus the PersonalDataRead events of the first verify
    export = tmp_path / "log.jsonl.gz"
    code, out = await cli("export", "--url", url, "--out", str(export), token=token)
    assert code == 0 and f"exported {grown} entries" in out, out
    vkey = Path(key).read_text().strip()
    code, out = await cli("verify", "--export", str(export), "--key", vkey, "--state", str(state))
    assert code == 0 and f"OK: {grown} entries verified" in out, out
    assert json.loads(state.read_text())["size"] == grown

    other = note.Signer.generate("consent-ledger.example/log").verifier.vkey
    code, out = await cli("verify", "--export", str(export), "--key", other)
    assert code == 1 and "signature" in out and "first bad position 0" in out, out
    code, out = await cli("verify", "--url", url, "--key", key)  # no token: a one-line reason
    assert code == 2 and "auditor token" in out, out


def _rewrite(entry: bytes) -> bytes:
    return entry.replace(b'"recorded_by":"test"', b'"recorded_by":"evil"')


TAMPERING = {
    "one byte changed": (
        ["UPDATE ledger_events SET entry = overlay(entry placing 'T'::bytea"
         " from position('\"test\"'::bytea in entry) + 1 for 1) WHERE position = 300"],
        300, "leaf"),
    "entry deleted": (["DELETE FROM ledger_events WHERE position = 300"], 300, "entry"),
    "two entries swapped": (
        ["UPDATE ledger_events e SET entry = o.entry FROM ledger_events o"
         " WHERE (e.position, o.position) IN ((300, 301), (301, 300))"],
        300, "entry"),
    "tail truncated": (["DELETE FROM ledger_events WHERE position > 500"], 501, "size"),
    "last entries truncated": (["DELETE FROM ledger_events WHERE position > 590"], 591, "size"),
}


@pytest.mark.parametrize("attack", sorted(TAMPERING))
async def test_tampering_is_caught_at_the_first_bad_position(attack, live, database, tmp_path):
    url, key, token = live
    statements, position, what = TAMPERING[attack]
    await superuser(database, *statements)
    code, out = await cli("verify", "--url", url, "--key", key, token=token)
    assert code == 1, out
    assert f"first bad position {position}: {what}" in out, out

    export = tmp_path / "after.jsonl.gz"
    code, out = await cli("export", "--url", url, "--out", str(export), token=token)
    assert code == 0, out
    code, out = await cli("verify", "--export", str(export), "--key", key)
    assert code == 1 and f"first bad position {position}: {what}" in out, out


async def test_replaced_tail_with_fresh_hashes_is_caught(live, database, tmp_path):
    """Rewrite entries 400.. with a different history and recompute every leaf,
    chain link and the head, as an attacker with the database would."""
    url, key, token = live
    conn = await database.connect_owner()
    try:
        rows = await conn.fetch("SELECT position, entry, chain_hash FROM ledger_events ORDER BY position")
        chain = bytes(rows[398]["chain_hash"])
        await conn.execute("SET session_replication_role = replica")
        for r in rows[399:]:
            entry = _rewrite(bytes(r["entry"]))
            leaf = leaf_hash(entry)
            chain = chain_hash(chain, leaf)
            await conn.execute("UPDATE ledger_events SET entry = $2, leaf_hash = $3, chain_hash = $4"
                               " WHERE position = $1", r["position"], entry, leaf, chain)
        await conn.execute("UPDATE ledger_head SET chain_hash = $1", chain)
    finally:
        await conn.close()
    code, out = await cli("verify", "--url", url, "--key", key, token=token)
    assert code == 1 and "first bad position 400: leaf" in out, out
    export = tmp_path / "rewritten.jsonl.gz"
    assert (await cli("export", "--url", url, "--out", str(export), token=token))[0] == 0
    code, out = await cli("verify", "--export", str(export), "--key", key)
    assert code == 1 and "first bad position 400: leaf" in out, out


async def test_forked_and_rolled_back_checkpoints_are_refused(live, tmp_path, client):
    url, key, token = live
    state = tmp_path / "state.json"
    assert (await cli("verify", "--url", url, "--key", key, "--state", str(state), token=token))[0] == 0
    remembered = json.loads(state.read_text())

    # A fork: the same size signed with a different root (e.g. shown to someone else).
    forked = dict(remembered, root="A" * 43 + "=")
    state.write_text(json.dumps(forked))
    code, out = await cli("verify", "--url", url, "--key", key, "--state", str(state), token=token)
    # The live log has grown by the auditor's recorded reads, so the fork shows as
    # a newer checkpoint that does not extend the remembered one.
    assert code == 1 and ("not consistent" in out or "forked" in out), out
    assert json.loads(state.read_text()) == forked  # state untouched on failure

    # A rollback: we remember a bigger tree than the log now shows.
    state.write_text(json.dumps(dict(remembered, size=SIZE + 10_000)))
    code, out = await cli("verify", "--url", url, "--key", key, "--state", str(state), token=token)
    assert code == 1 and "consistency: rolled back" in out, out

    # The operator rewrites the whole history and signs a bigger checkpoint over it:
    # signature and hashes check out, but not against what we verified before.
    signer = client.server.app[CHECKPOINTS].signers[0]
    state.write_text(json.dumps(remembered))
    conn = await client.server.app[POOL].primary.acquire()  # writes: the primary
    try:
        entries = [bytes(r[0]) for r in await conn.fetch(
            "SELECT entry FROM ledger_events WHERE position <= $1 ORDER BY position", SIZE)]
    finally:
        await client.server.app[POOL].primary.release(conn)
    forged = [_rewrite(e) for e in entries] + [_rewrite(entries[-1]).replace(b'"position":600', b'"position":601')]
    lying = note.sign(note.Checkpoint(remembered["origin"], SIZE + 1, ref_mth(forged)).body(), [signer])
    export = tmp_path / "forged.jsonl.gz"
    with gzip.open(export, "wb") as f:
        f.write(json.dumps({"format": "consent-ledger-export/1", "checkpoint": lying}).encode() + b"\n")
        for i, e in enumerate(forged, 1):
            f.write(msgspec.json.encode([i, e, leaf_hash(e)]) + b"\n")
    code, out = await cli("verify", "--export", str(export), "--key", key)
    assert code == 0, out  # without memory, a consistent forgery by the key holder is undetectable...
    code, out = await cli("verify", "--export", str(export), "--key", key, "--state", str(state))
    assert code == 1 and f"first bad position {SIZE}: consistency" in out, out  # ...with --state it is


async def test_keys_generate_and_rotation_overlap(tmp_path, database, verifier):
    from aiohttp.test_utils import TestClient, TestServer

    from service import config
    from service.http.app import create_app
    from service.store.checkpoints import load_signers

    code, out = await cli("keys", "generate", "--out", str(tmp_path / "old.key"), "--name", "log.example/a")
    assert code == 0, out
    old_vkey = out.strip().splitlines()[-1]
    assert (tmp_path / "old.key").stat().st_mode & 0o077 == 0
    code, out = await cli("keys", "generate", "--out", str(tmp_path / "old.key"))
    assert code == 2 and "refusing to overwrite" in out
    code, out = await cli("keys", "generate", "--out", str(tmp_path / "new.key"), "--name", "log.example/a")
    new_vkey = out.strip().splitlines()[-1]

    cfg = config.load({"CONSENT_LEDGER_LOG_KEY": str(tmp_path / "new.key"),
                       "CONSENT_LEDGER_LOG_EXTRA_KEYS": str(tmp_path / "old.key"),
                       "CONSENT_LEDGER_LOG_ORIGIN": "log.example/a",
                       "CONSENT_LEDGER_DATA_DIR": str(tmp_path / "data")})
    signers, development = load_signers(cfg)
    assert not development and [s.verifier.vkey for s in signers] == [new_vkey, old_vkey]

    app = create_app(app_config(log_origin=cfg.log_origin), database, verifier, signers=signers)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        await client.server.app[STORE].append(opt_outs(3))
        await client.server.app[CHECKPOINTS].sign()
        keys = await (await client.get("/v1/log-key")).json()
        assert keys == {"origin": "log.example/a", "keys": [new_vkey, old_vkey]}
        url = str(client.make_url("/")).rstrip("/")
        token_free_checkpoint = await (await client.get("/checkpoint")).text()
        for vkey in (old_vkey, new_vkey):  # either key alone verifies during the overlap
            assert note.open_checkpoint(token_free_checkpoint, [note.parse_vkey(vkey)]).size == 3
        assert url.startswith("http://127.0.0.1:")


def test_development_log_key_is_generated_once_and_production_needs_one(tmp_path):
    from service import config
    from service.store.checkpoints import load_signers

    dev = config.load({"CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    first, development = load_signers(dev)
    again, _ = load_signers(dev)
    assert development and first[0].verifier == again[0].verifier
    assert first[0].name == "consent-ledger.example/log"
    with pytest.raises(RuntimeError, match="CONSENT_LEDGER_LOG_KEY"):
        load_signers(config.load({"CONSENT_LEDGER_DATA_DIR": str(tmp_path), "CONSENT_LEDGER_ENV": "production",
                                  "CONSENT_LEDGER_JWKS": "x"}))


async def test_rewritten_entries_and_tree_still_fail_against_the_signed_root(live, database, client):
    """An attacker who also rebuilds the Merkle tiles leaves no unsigned hash to
    compare with: verify still refuses, bounded by the last remembered checkpoint."""
    from service.http.keys import TILES
    from service.store import tiles

    url, key, token = live
    conn = await database.connect_owner()
    try:
        rows = await conn.fetch("SELECT position, entry, chain_hash FROM ledger_events ORDER BY position")
        chain = bytes(rows[398]["chain_hash"])
        await conn.execute("SET session_replication_role = replica")
        for r in rows[399:]:
            entry = _rewrite(bytes(r["entry"]))
            chain = chain_hash(chain, leaf_hash(entry))
            await conn.execute("UPDATE ledger_events SET entry = $2, leaf_hash = $3, chain_hash = $4"
                               " WHERE position = $1", r["position"], entry, leaf_hash(entry), chain)
        await conn.execute("UPDATE ledger_head SET chain_hash = $1", chain)
        await conn.execute("DELETE FROM merkle_tiles")
        await tiles.extend(conn, 0, SIZE)
    finally:
        await conn.close()
    reader = client.server.app[TILES]
    for cache in (reader._cache, reader._partial, reader._nodes):  # as after a restart
        cache.clear()
    code, out = await cli("verify", "--url", url, "--key", key, token=token)
    assert code == 1 and "first bad position 1: root" in out, out


async def _reads(client) -> list:
    async with client.server.app[POOL].acquire() as conn:
        rows = await conn.fetch("SELECT entry FROM ledger_events WHERE event_type = 'PersonalDataRead' ORDER BY position")
    return [msgspec.json.decode(bytes(r[0]))["payload"] for r in rows]


async def test_an_audit_run_is_one_recorded_read_of_its_range(live, tmp_path, client):
    """verify and export page through three entry bundles each; every run
    used to append one PersonalDataRead per page, so the log grew while it
    was being audited.  Now each run is one read session over 1..N."""
    url, key, token = live
    code, out = await cli("verify", "--url", url, "--key", key, token=token)
    assert code == 0, out
    # The export's range ends at the latest checkpoint: sign one over the verify run's own read
    # rather than race the background signer.
    await client.server.app[CHECKPOINTS].sign()
    code, out = await cli("export", "--url", url, "--out", str(tmp_path / "x.jsonl.gz"), token=token)
    assert code == 0, out
    reads = await _reads(client)
    assert [(r["what"], r["first_position"], r["last_position"], r["entries"]) for r in reads] == [
        ("audit-session", 1, SIZE, SIZE), ("audit-session", 1, SIZE + 1, SIZE + 1)]
    assert {r["recorded_by"] for r in reads} == {"test-auditor"}


async def test_a_read_session_covers_only_its_caller_range_and_day(live, client, make_token):
    from service.http.keys import READ_SESSIONS

    url, _, token = live
    auth = {"Authorization": f"Bearer {token}"}
    r = await client.post("/v1/read-sessions", json={"first_position": 1, "last_position": 300}, headers=auth)
    assert r.status == 201, await r.text()
    session = (await r.json())["session"]
    assert r.headers["Ledger-Read-Recorded"] == str(session)
    before = len(await _reads(client))

    def page(path: str, who: dict, name: str = str(session)):
        return client.get(path, headers={**who, "Ledger-Read-Session": name})

    r = await page("/tile/entries/000", auth)
    assert r.status == 200 and r.headers["Ledger-Read-Recorded"] == str(session)
    r = await page("/v1/events?after=10&limit=50", auth)
    assert r.status == 200 and r.headers["Ledger-Read-Recorded"] == str(session)
    assert len(await _reads(client)) == before  # the pages were not recorded again

    other = {"Authorization": f"Bearer {make_token('auditor', subject='another-auditor')}"}
    refusals = {
        "another caller": await page("/tile/entries/000", other),
        "beyond its range": await page("/tile/entries/001", auth),  # positions 257-512
        "not a session": await page("/v1/events/5", auth, name="5"),
        "not a number": await page("/v1/events/5", auth, name="x"),
    }
    for why, r in refusals.items():
        problem = await r.json()
        assert r.status == 403 and "POST /v1/read-sessions" in problem["detail"], (why, problem)
    assert len(await _reads(client)) == before

    client.server.app[READ_SESSIONS]._opened[session] -= __import__("datetime").timedelta(hours=24)
    r = await page("/v1/events/5", auth)
    assert r.status == 403 and "expired" in (await r.json())["detail"]


@pytest.mark.parametrize(("body", "status", "said"), [
    ({"first_position": 1, "last_position": SIZE + 50}, 422, "beyond the log's head"),
    ({"first_position": 9, "last_position": 3}, 422, "must not be before"),
    ({"first_position": 0, "last_position": 3}, 422, ">= 1"),
])
async def test_a_read_session_must_name_a_range_of_the_log(live, client, body, status, said):
    _, _, token = live
    before = len(await _reads(client))
    r = await client.post("/v1/read-sessions", json=body, headers={"Authorization": f"Bearer {token}"})
    problem = await r.json()
    assert r.status == status and said in problem["detail"], problem
    assert len(await _reads(client)) == before


def _readme_block(heading: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return text.split(heading, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


async def test_the_readmes_audit_commands_work_and_write_nothing_into_the_working_tree(
        database, signing_key, tmp_path, make_token):
    """Run the README's audit block as written (port and paths adapted) in an
    empty folder standing for the repository: it used to leave
    auditor-state.json and ledger.jsonl.gz there, outside .gitignore."""
    import shutil
    import subprocess

    from conftest import AUDIENCE, ISSUER
    from live_server import LiveServer

    server = LiveServer(database_url=database.owner_dsn, signing_key=signing_key, issuer=ISSUER, audience=AUDIENCE,
                        workdir=tmp_path, extra_env={"CONSENT_LEDGER_JWKS": ""})  # the development default
    repo, home = tmp_path / "repo", tmp_path / "home"
    repo.mkdir(), home.mkdir()
    try:
        await asyncio.to_thread(server.wait_ready)
        script = _readme_block("## Auditing without trusting the operator")
        assert "auditor-state.json" not in script
        command = str(Path(sys.executable).parent / "consent-ledger")
        script = (script.replace("localhost:8080", f"127.0.0.1:{server.port}")
                  .replace("127.0.0.1:8080", f"127.0.0.1:{server.port}").replace(".venv/bin/consent-ledger", command))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSENT_LEDGER_", "XDG_"))}
        env.update({"HOME": str(home), "CONSENT_LEDGER_DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": ""})
        assert shutil.which("curl"), "the README uses curl"
        done = await asyncio.to_thread(subprocess.run, ["bash", "-euo", "pipefail", "-c", script], cwd=repo, env=env,
                                       capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("OK: ") == 2, done.stdout
    assert list(repo.iterdir()) == []
    audit = home / ".local" / "state" / "consent-ledger-audit"
    assert sorted(p.name for p in audit.iterdir()) == ["ledger.jsonl.gz", "state.json"]

"""The log and its witnesses end to end: `consent-ledger witness serve`
processes on loopback cosign what the service submits, `/checkpoint/witnessed`
and `verify --witness` rest on their cosignatures, and a log restored from an
older database and grown differently gets none (issue 12, items 4 and 5)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import _dsn_with_database, app_config
from contracts import cosignature, merkle, note
from live_server import ROOT
from service import config
from service.config import ConfigError
from samples import auth, choice, nhs_numbers
from service.audit import client as auditor
from service.http.app import create_app
from service.http.keys import CHECKPOINTS, POOL, TILES
from service.store.database import Database
from service.witness.submitter import Submitter
from witness_process import Witness, witness_key

ORIGIN = app_config().log_origin


class Witnessed:
    """Two witness processes following one log key."""

    def __init__(self, tmp: Path, signer: note.Signer):
        self.signer = signer
        self.processes: list[Witness] = []
        self.verifiers: list[cosignature.CosignatureVerifier] = []
        for name in ("witness.test/ndg", "witness.test/panel"):
            key, verifier = witness_key(tmp, name)
            short = name.rsplit("/", 1)[1]
            self.processes.append(Witness(tmp, key, [f"{ORIGIN}:{signer.verifier.vkey}"], tmp / f"{short}-state",
                                          name=short).launch().ready())
            self.verifiers.append(verifier)

    def config(self, quorum: int = 2):
        return app_config(pool_size=4, checkpoint_interval=0.1, witness_interval=0.2, witness_quorum=quorum,
                          witnesses=tuple((w.url, v.vkey) for w, v in zip(self.processes, self.verifiers)))

    def evidence(self, index: int) -> int:
        with sqlite3.connect(self.processes[index].state / "witness.sqlite3") as db:
            return db.execute("SELECT count(*) FROM evidence").fetchone()[0]

    def stop(self) -> None:
        for w in self.processes:
            w.stop()


@pytest.fixture
def witnessed(tmp_path: Path) -> Witnessed:
    w = Witnessed(tmp_path, note.Signer.generate(ORIGIN))
    yield w
    w.stop()


async def _serving(database: Database, witnessed: Witnessed, verifier, quorum: int = 2) -> TestClient:
    app = create_app(witnessed.config(quorum), database, verifier, signers=[witnessed.signer])
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def ledger(database, witnessed, verifier) -> AsyncIterator[TestClient]:
    client = await _serving(database, witnessed, verifier)
    yield client
    await client.close()


async def _opt_out(client: TestClient, token: str, patients: list[str]) -> int:
    position = 0
    for nhs in patients:
        r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=auth(token))
        assert r.status == 201, await r.text()
        position = (await r.json())["position"]
    return position


async def _witnessed_at_least(client: TestClient, size: int, seconds: float = 30) -> str:
    for _ in range(int(seconds * 10)):
        r = await client.get("/checkpoint/witnessed")
        if r.status == 200:
            text = await r.text()
            if note.parse_checkpoint(note.split(text)[0]).size >= size:
                return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"no checkpoint of size {size} was witnessed in {seconds} s")


def _size(text: str) -> int:
    return note.parse_checkpoint(note.split(text)[0]).size


async def _verify(client: TestClient, token: str, **kwargs) -> auditor.Outcome:
    # The verifier is a blocking HTTP client: run it beside the event loop that serves it.
    source = auditor.HttpSource(str(client.make_url("")), token)
    return await asyncio.to_thread(auditor.verify, source, kwargs.pop("keys"), **kwargs)


async def test_checkpoints_are_cosigned_by_the_witnesses_and_verify_requires_them(
        ledger: TestClient, witnessed: Witnessed, make_token):
    head = await _opt_out(ledger, make_token("patient-app"), nhs_numbers(5, seed=12))
    text = await _witnessed_at_least(ledger, head)
    assert note.open_checkpoint(text, [witnessed.signer.verifier], ORIGIN).size >= head
    assert set(cosignature.cosignatures(text, witnessed.verifiers)) == {v.vkey for v in witnessed.verifiers}
    # /checkpoint carries the same cosignatures once it is at that size (no write since).
    latest = await (await ledger.get("/checkpoint")).text()
    if _size(latest) == _size(text):
        assert latest == text

    token, keys = make_token("auditor"), [witnessed.signer.verifier]
    outcome = await _verify(ledger, token, keys=keys, witnesses=witnessed.verifiers, quorum=2)
    assert outcome.ok and outcome.size == _size(text), outcome.report()
    metrics = await (await ledger.get("/metrics")).text()
    witnessed_metric = next(float(line.split()[1]) for line in metrics.splitlines()
                            if line.startswith("consent_ledger_witnessed_size "))
    assert witnessed_metric >= _size(text)
    assert 'consent_ledger_witness_cosigned_size{witness="witness.test/ndg"}' in metrics
    home = await (await ledger.get("/")).text()
    assert "witness.test/ndg, witness.test/panel" in home and "when 2 of these 2 have" in home
    assert f"The latest witnessed has {_size(text):,} entries" in home
    page = await (await ledger.get("/transparency")).text()
    assert all(f"--witness '{v.vkey}'" in page for v in witnessed.verifiers)
    stranger = cosignature.Cosigner.from_signer(note.Signer.generate("witness.test/stranger")).verifier
    outcome = await _verify(ledger, token, keys=keys, witnesses=[*witnessed.verifiers, stranger], quorum=3)
    assert not outcome.ok and outcome.failure.what == "witness" and "stranger" in outcome.failure.detail


async def test_a_witness_that_is_down_delays_only_the_witnessed_checkpoint_and_is_caught_up(
        ledger: TestClient, witnessed: Witnessed, make_token):
    token = make_token("patient-app")
    first = await _opt_out(ledger, token, nhs_numbers(3, seed=13))
    before = _size(await _witnessed_at_least(ledger, first))
    witnessed.processes[1].stop()
    head = await _opt_out(ledger, token, nhs_numbers(4, seed=14))
    for _ in range(100):  # the log goes on signing
        if _size(await (await ledger.get("/checkpoint")).text()) >= head:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the log stopped signing while a witness was down")
    await asyncio.sleep(1.0)  # several submission rounds
    assert _size(await (await ledger.get("/checkpoint/witnessed")).text()) == before
    witnessed.processes[1].launch().ready()
    assert _size(await _witnessed_at_least(ledger, head)) >= head


async def test_a_witness_that_moved_on_without_this_instance_is_resynced(
        ledger: TestClient, witnessed: Witnessed, make_token):
    """Another instance of the service (here: a second submitter on the same database) believes the
    witness holds nothing yet; the witness answers 409 with the size it holds, and the submitter
    proves consistency from there instead."""
    await _witnessed_at_least(ledger, await _opt_out(ledger, make_token("patient-app"), nhs_numbers(3, seed=15)))
    app = ledger.server.app
    other = Submitter(app[CHECKPOINTS], app[TILES], app[POOL], [witnessed.config().witnesses[0]], 60)
    witness = other.witnesses[0]
    assert witness.held == 0  # what a fresh instance that never read the database would assume
    latest = await app[CHECKPOINTS].latest()
    async with aiohttp.ClientSession() as session:
        assert await other.submit(session, witness, latest)
    assert witness.held == witness.cosigned == latest.size


async def test_a_forked_log_gets_no_cosignature_and_an_old_receipt_detects_the_fork(
        database: Database, witnessed: Witnessed, verifier, make_token, admin_dsn, drop_later, tmp_path: Path):
    patients = nhs_numbers(12, seed=18)
    app_token, auditor_token = make_token("patient-app"), make_token("auditor")
    keys = [witnessed.signer.verifier]

    a = await _serving(database, witnessed, verifier)
    snapshot_size = _size(await _witnessed_at_least(a, await _opt_out(a, app_token, patients[:3])))
    await a.close()
    # The operator keeps a copy of the database as it was at this point...
    name = urlsplit(database.owner_dsn).path.lstrip("/")
    old = f"cl_fork_{name[-12:]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{old}" TEMPLATE "{name}"')
    finally:
        await admin.close()

    # ... the log grows, is witnessed, and a patient keeps a receipt; an auditor verifies.
    a = await _serving(database, witnessed, verifier)
    patient = patients[3]
    mine = make_token("patient-app", nhs_number=patient)
    position = await _opt_out(a, mine, [patient])
    await _opt_out(a, app_token, patients[4:6])
    honest = _size(await _witnessed_at_least(a, position + 2))
    receipt = await (await a.get(f"/v1/patients/{patient}/receipts/{position}", headers=auth(mine))).json()
    state = tmp_path / "verified.json"
    outcome = await _verify(a, auditor_token, keys=keys, state_path=state, witnesses=witnessed.verifiers, quorum=2)
    assert outcome.ok and outcome.size == honest, outcome.report()
    await a.close()

    # The operator restores the old copy and writes a different history with the same key.
    forked = Database(owner_dsn=_dsn_with_database(admin_dsn, old), embedded=False)
    b = await _serving(forked, witnessed, verifier)
    try:
        head = await _opt_out(b, app_token, patients[6:12])
        assert head > honest
        for _ in range(100):
            latest = await (await b.get("/checkpoint")).text()
            if _size(latest) >= head:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # several submission rounds
        # No witness cosigns the fork: its newest witnessed checkpoint is the one from before the copy.
        assert _size(await (await b.get("/checkpoint/witnessed")).text()) == snapshot_size
        latest = await (await b.get("/checkpoint")).text()
        assert cosignature.cosignatures(latest, witnessed.verifiers) == {}
        cp = note.open_checkpoint(latest, keys, ORIGIN)  # the log's own signature is fine
        refusal = auditor.witness_refusal(latest, cp, witnessed.verifiers, 2)
        assert refusal is not None and "cosigned by 0 of the 2" in refusal
        assert witnessed.evidence(0) >= 1 and witnessed.evidence(1) >= 1  # the witnesses kept the signed fork

        # verify --witness (with the auditor's remembered state) refuses the forked log.
        outcome = await _verify(b, auditor_token, keys=keys, state_path=state, witnesses=witnessed.verifiers,
                                quorum=2)
        assert not outcome.ok and "rolled back" in outcome.failure.detail, outcome.report()

        # The patient's old receipt: the forked log cannot prove its checkpoint extends the one in the receipt.
        held = note.open_checkpoint(receipt["checkpoint"], keys, ORIGIN)
        proof = await (await b.get(f"/v1/proofs/consistency?from={held.size}&to={cp.size}")).json()
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(held.size, cp.size, held.root, cp.root,
                                      [bytes.fromhex(h) for h in proof["hashes"]])
    finally:
        await b.close()
        drop_later(old)  # dropped in the background: only once nothing uses it


async def test_the_verify_command_requires_the_witnesses_it_is_given(
        ledger: TestClient, witnessed: Witnessed, make_token):
    await _witnessed_at_least(ledger, await _opt_out(ledger, make_token("patient-app"), nhs_numbers(2, seed=19)))
    stranger = cosignature.Cosigner.from_signer(note.Signer.generate("witness.test/stranger")).verifier

    async def verify(*witness_args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli.main", "verify", "--url", str(ledger.make_url("")),
            "--key", witnessed.signer.verifier.vkey, "--token", make_token("auditor"), *witness_args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT)
        out, _ = await process.communicate()
        return process.returncode, out.decode()

    code, out = await verify(*[a for v in witnessed.verifiers for a in ("--witness", v.vkey)])
    assert code == 0 and out.startswith("OK:"), out
    code, out = await verify("--witness", witnessed.verifiers[0].vkey, "--witness", stranger.vkey,
                             "--witnesses-required", "2")
    assert code == 1 and "cosigned by 1 of the 2 witnesses required (missing: witness.test/stranger)" in out, out
    code, out = await verify("--witness", witnessed.signer.verifier.vkey)  # a log key is not a witness key
    assert code == 2 and "is not a witness vkey" in out, out
    code, out = await verify("--witness", stranger.vkey, "--witnesses-required", "2")
    assert code == 2 and "--witnesses-required must be between 1 and the 1" in out, out


@pytest.mark.parametrize("witnesses, quorum, complaint", [
    ("http://w.example/add-checkpoint", None, "is not '<add-checkpoint URL> <vkey>'"),
    ("w.example/add-checkpoint {vkey}", None, "is not '<add-checkpoint URL> <vkey>'"),
    ("http://w.example/add-checkpoint not-a-vkey", None, "is not a witness vkey"),
    ("http://w.example/add-checkpoint {vkey}", "2", "must be between 1 and the 1 witness(es)"),
    ("http://w.example/add-checkpoint {vkey}", "two", "is not a whole number"),
])
def test_witness_settings_that_cannot_work_are_refused_at_start(witnesses: str, quorum: str | None, complaint: str):
    vkey = cosignature.Cosigner.from_signer(note.Signer.generate("witness.test/w")).verifier.vkey
    env = {"CONSENT_LEDGER_WITNESSES": witnesses.format(vkey=vkey)}
    if quorum is not None:
        env["CONSENT_LEDGER_WITNESS_QUORUM"] = quorum
    with pytest.raises(ConfigError, match=re.escape(complaint)):
        config.load(env)


def test_the_default_quorum_is_a_majority_of_the_witnesses():
    vkeys = [cosignature.Cosigner.from_signer(note.Signer.generate(f"witness.test/w{i}")).verifier.vkey
             for i in range(3)]
    loaded = config.load({"CONSENT_LEDGER_WITNESSES": ",".join(f"http://w{i}.test/add-checkpoint {v}"
                                                              for i, v in enumerate(vkeys))})
    assert loaded.witness_quorum == 2 and [v for _, v in loaded.witnesses] == vkeys
    assert loaded.witness_interval == 10.0

"""The witness as real processes on loopback, fed by a log built here from
contracts/note.py and contracts/merkle.py: it cosigns an honest log, refuses
a lying one (fork, rollback, bad proof) with tlog-witness's status codes,
keeps its state across a restart, and one atomic step per submission keeps
concurrent submissions (two processes, one state) from rolling it back."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest

from contracts import cosignature, merkle, note

from live_server import ROOT
from witness_process import ORIGIN, Log, Witness, witness_key

# A real checkpoint of the Go checksum database and its key (litewitness's test
# data): a witness for consent-ledger logs is a witness for any C2SP log.
GO_ORIGIN = "go.sum database tree"
GO_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
GO_CHECKPOINT = (
    "go.sum database tree\n35225469\nvt5T6GaLCXvyHFl9VUvvItR43XZxfLgftEcTyO3eJCQ=\n\n"
    "— sum.golang.org Az3grpukl5AXaVfYkLiDGORx/DN2nlcS5kZHR5uYOBV2KA2HgXpD+gu9HHONebHLAyaKbbTM75QTtPydhKCExixSfwQ=\n"
)


@pytest.fixture
def log_signer() -> note.Signer:
    return note.Signer.generate(ORIGIN)


@pytest.fixture
def witnesses(tmp_path: Path):
    started: list[Witness] = []

    def start(*specs: tuple[Path, list[str], Path, str]) -> list[Witness]:
        """Start witnesses side by side; return once all of them listen."""
        ws = [Witness(tmp_path, *spec).launch() for spec in specs]
        started.extend(ws)
        return [w.ready() for w in ws]

    yield start
    for w in started:
        w.stop()


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str, str]:
    async with session.post(url, data=body) as r:
        return r.status, r.content_type, await r.text()


def query(state: Path, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(state / "witness.sqlite3")) as db:
        return db.execute(sql).fetchall()


def stored(state: Path) -> dict[str, tuple[int, bytes]]:
    return {o: (s, bytes(r)) for o, s, r in query(state, "SELECT origin, size, root FROM cosigned")}


def evidence(state: Path) -> list[tuple[str, str]]:
    return query(state, "SELECT origin, reason FROM evidence ORDER BY id")


async def test_three_witnesses_cosign_a_growing_log(tmp_path, witnesses, log_signer):
    log = Log(log_signer)
    keys = [witness_key(tmp_path, f"witness{i}.example/w") for i in range(3)]
    verifiers = [v for _, v in keys]
    ws = witnesses(*((key, [f"{ORIGIN}:{log_signer.verifier.vkey}"], tmp_path / f"state{i}", f"w{i}")
                     for i, (key, _) in enumerate(keys)))
    async with aiohttp.ClientSession() as session:
        held = 0
        for grow in (1, 4, 250, 3):
            log.append(grow)
            lines = []
            for w in ws:
                status, kind, text = await post(session, w.url, log.request(held))
                assert status == 200, text
                lines.append(text)
            held = log.size
            before = int(time.time()) + 1
            signed = cosignature.cosignatures(log.checkpoint() + "".join(lines), verifiers)
            assert set(signed) == {v.vkey for v in verifiers}
            assert all(before - 60 <= t <= before for t in signed.values())
            # the cosigned note still opens with the log's key
            assert note.open_checkpoint(log.checkpoint() + "".join(lines), [log_signer.verifier]).size == held

        # A client that lost track asks with old size 0 and is told the size to prove from.
        log.append(7)
        status, kind, text = await post(session, ws[0].url, log.request(0))
        assert (status, kind) == (409, cosignature.SIZE_MEDIA_TYPE)
        assert cosignature.parse_size_body(text.encode()) == held
        status, _, text = await post(session, ws[0].url, log.request(held))
        assert status == 200 and cosignature.cosignatures(log.checkpoint() + text, verifiers[:1])


async def test_a_lying_log_is_refused_and_its_signed_requests_kept(tmp_path, witnesses, log_signer):
    key, verifier = witness_key(tmp_path, "witness.example/ndg")
    state = tmp_path / "state"
    (w,) = witnesses((key, [f"{ORIGIN}:{log_signer.verifier.vkey}", f"{GO_ORIGIN}:{GO_VKEY}"], state, "w"))
    honest = Log(log_signer).append(20)
    async with aiohttp.ClientSession() as session:
        assert (await post(session, w.url, honest.request(0)))[0] == 200
        held = stored(state)[ORIGIN]

        stranger = Log(note.Signer.generate(ORIGIN)).append(30)  # same origin, a key the witness does not trust
        other_origin = note.sign(note.Checkpoint("elsewhere.example/log", 1, bytes(32)).body(), [log_signer])
        bad_hash = list(honest.append(10).proof(20))
        bad_hash[0] = bytes(32)
        bad_proof = cosignature.AddCheckpoint(20, tuple(bad_hash), honest.checkpoint()).body()
        fork_ahead = honest.fork(12).append(25, "forked")  # restored to 12, then different entries: 37
        fork_same_size = honest.fork(12).append(8, "forked")  # 20 entries, another root
        cases = [
            (b"old 0\nnot a request", 400, "malformed"),
            (cosignature.AddCheckpoint(0, (), other_origin).body(), 404, "unknown log origin"),
            (stranger.request(20), 403, "signature"),
            (cosignature.AddCheckpoint(40, (), honest.checkpoint(30)).body(), 400, "larger than"),
            (bad_proof, 422, "consistency proof"),
            (fork_ahead.request(20), 422, "consistency proof"),  # the fork's own proof: not from the root held
            (fork_same_size.request(20), 409, ""),
            (honest.request(10, 15), 409, ""),  # a rollback to a smaller tree
            (cosignature.AddCheckpoint(20, (), honest.checkpoint(15)).body(), 400, "larger than"),
            (honest.request(0), 409, ""),
        ]
        for body, status, words in cases:
            got, kind, text = await post(session, w.url, body)
            assert got == status, (status, text)
            assert words in text
            if got == 409:
                assert kind == cosignature.SIZE_MEDIA_TYPE and text == "20\n"
            assert stored(state)[ORIGIN] == held  # nothing was stored

        # Only the refusals the log itself signed are kept, as evidence against it.
        assert [reason.split(":")[0] for _, reason in evidence(state)] == [
            "consistency proof from size 20 to 30", "consistency proof from size 20 to 37",
            "a different root for size 20",
        ]
        # The honest log goes on; so does any other C2SP log the witness follows.
        status, _, text = await post(session, w.url, honest.request(20))
        assert status == 200 and cosignature.cosignatures(honest.checkpoint() + text, [verifier])
        status, _, text = await post(session, w.url, cosignature.AddCheckpoint(0, (), GO_CHECKPOINT).body())
        assert status == 200 and cosignature.cosignatures(GO_CHECKPOINT + text, [verifier])
    assert stored(state)[GO_ORIGIN][0] == 35225469


async def test_state_survives_a_restart(tmp_path, witnesses, log_signer):
    key = tmp_path / "witness.key"
    made = subprocess.run([sys.executable, "-m", "service.cli.main", "witness", "keys", "generate",
                           "--name", "witness.example/restart", "--out", str(key)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    verifier = cosignature.parse_vkey(made.stdout.strip())
    state = tmp_path / "state"
    logs = [f"{ORIGIN}:{log_signer.verifier.vkey}"]
    log = Log(log_signer).append(33)
    (first,) = witnesses((key, logs, state, "first"))
    async with aiohttp.ClientSession() as session:
        assert (await post(session, first.url, log.request(0)))[0] == 200
        first.stop()
        (second,) = witnesses((key, logs, state, "second"))
        status, _, text = await post(session, second.url, log.append(1).request(0))
        assert (status, text) == (409, "33\n")
        assert (await post(session, second.url, log.fork(20).append(13, "forked").request(33)))[0] == 409
        status, _, text = await post(session, second.url, log.request(33))
        assert status == 200 and cosignature.cosignatures(log.checkpoint() + text, [verifier])


async def test_concurrent_submissions_never_roll_the_state_back(tmp_path, witnesses, log_signer):
    """Two processes share one state (the race tlog-witness warns about):
    of many submissions from the same size exactly one wins."""
    key, _ = witness_key(tmp_path, "witness.example/race")
    state = tmp_path / "state"
    logs = [f"{ORIGIN}:{log_signer.verifier.vkey}"]
    pair = witnesses(*((key, logs, state, f"p{i}") for i in range(2)))
    log = Log(log_signer).append(10)
    async with aiohttp.ClientSession() as session:
        assert (await post(session, pair[0].url, log.request(0)))[0] == 200
        log.append(40)
        sizes = list(range(11, 51))
        answers = await asyncio.gather(*(
            post(session, pair[i % 2].url, log.request(10, size)) for i, size in enumerate(sizes)))
        winners = [size for size, (status, _, _) in zip(sizes, answers) if status == 200]
        assert len(winners) == 1, [a[0] for a in answers]
        assert all(a[0] == 409 and a[2] == f"{winners[0]}\n" for a in answers if a[0] != 200)
        assert stored(state)[ORIGIN] == (winners[0], merkle.root_from_leaves(log.leaves[:winners[0]]))
        assert (await post(session, pair[1].url, log.request(winners[0])))[0] == 200
    assert stored(state)[ORIGIN][0] == 50


def test_log_arguments_split_where_the_vkey_checks_out():
    from service.witness.cli import parse_log

    signer = note.Signer.generate("example.org:8443/log")
    assert parse_log(f"example.org:8443/log:{signer.verifier.vkey}") == ("example.org:8443/log", signer.verifier)
    assert parse_log(f"{GO_ORIGIN}:{GO_VKEY}")[0] == GO_ORIGIN
    with pytest.raises(Exception, match="ORIGIN:VKEY"):
        parse_log(signer.verifier.vkey)


def test_the_stored_size_is_checked_and_replaced_in_one_step(tmp_path):
    """Two processes read size 10, both check a proof from it: only the first
    store may land; the second learns the size now held (tlog-witness's race)."""
    from service.witness.state import Cosigned, WitnessState

    a, b = WitnessState(tmp_path), WitnessState(tmp_path)  # two connections, as two processes have
    assert a.advance(ORIGIN, Cosigned(0, None), 10, b"\x01" * 32, "cp10") is None
    held = a.latest(ORIGIN)
    assert held == b.latest(ORIGIN) == Cosigned(10, b"\x01" * 32)
    assert b.advance(ORIGIN, held, 50, b"\x05" * 32, "cp50") is None
    assert a.advance(ORIGIN, held, 11, b"\x02" * 32, "cp11") == Cosigned(50, b"\x05" * 32)
    a.close()
    b.close()
    reopened = WitnessState(tmp_path)
    assert reopened.latest(ORIGIN) == Cosigned(50, b"\x05" * 32)
    reopened.close()

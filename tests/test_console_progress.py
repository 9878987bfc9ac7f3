"""Progress of long commands on stderr: a bar with rate and time left on a
terminal (a real pseudo-terminal here), plain periodic lines otherwise;
stdout keeps only the result."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import re
import subprocess
import sys

from service.http.keys import CHECKPOINTS, STORE
from service.console.progress import Progress

from test_transparency import opt_outs

PLAIN = re.compile(r"^verify: [\d,]+/1,000 entries \(\d+%\), [\d,]+ entries/s(, about .+ left)?$")


async def _served_log(client, make_token, tmp_path, size: int = 1000) -> tuple[str, str, str]:
    store = client.server.app[STORE]
    await store.append(opt_outs(size))
    await client.server.app[CHECKPOINTS].sign()
    url = str(client.make_url("")).rstrip("/")
    vkey = (await (await client.get("/v1/log-key")).json())["keys"][0]
    return url, vkey, make_token("auditor")


def _env(token: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")}
    return {**env, "CONSENT_LEDGER_TOKEN": token, **extra}


async def test_without_a_terminal_progress_is_plain_lines_on_stderr(client, make_token, tmp_path):
    url, vkey, token = await _served_log(client, make_token, tmp_path)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "service.cli.main", "verify", "--url", url, "--key", vkey],
        env=_env(token, CONSENT_LEDGER_PROGRESS_SECONDS="0"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: 1000 entries verified") and len(done.stdout.splitlines()) == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) >= 3 and "\r" not in done.stderr and "\x1b" not in done.stderr
    assert all(PLAIN.match(line) for line in lines[:-1]), lines[:3]
    assert re.match(r"^verify: 1,000 entries in [\d.]+ s \([\d,]+ entries/s\)$", lines[-1]), lines[-1]

    quiet = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "service.cli.main", "verify", "--url", url, "--key", vkey],
        env=_env(token), capture_output=True, text=True, timeout=120)  # default: a line every 10 s
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


async def test_on_a_terminal_progress_is_a_bar_with_rate_and_time_left(client, make_token, tmp_path):
    url, vkey, token = await _served_log(client, make_token, tmp_path)
    leader, follower = pty.openpty()
    try:
        process = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "service.cli.main", "export", "--url", url,
                               "--out", str(tmp_path / "log.jsonl.gz")],
            env=_env(token, TERM="xterm", COLUMNS="160"), stdout=subprocess.PIPE, stderr=follower,
            stdin=subprocess.DEVNULL, text=True)
        os.close(follower)
        out, _ = await asyncio.to_thread(process.communicate, timeout=120)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert process.returncode == 0, shown
    assert out.startswith("exported 1000 entries")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    assert "export" in text and "1000/1000" in text and "100%" in text, text
    assert re.search(r"[\d,]+ entries/s", text) and re.search(r"left -?:?[\d:]+", text), text


def test_plain_lines_come_at_most_every_interval_and_close_with_a_summary():
    sink = io.StringIO()
    with Progress("rebuild choices", 10_000, stream=sink, every=3600) as progress:
        for _ in range(10_000):
            progress.advance()
    assert sink.getvalue() == ""  # a short run stays quiet
    sink = io.StringIO()
    with Progress("rebuild choices", stream=sink, every=0) as progress:
        progress.update(5_000, total=20_000)
        progress.update(20_000)
    lines = sink.getvalue().splitlines()
    assert lines[0].startswith("rebuild choices: 5,000/20,000 entries (25%), ")
    assert lines[-1].startswith("rebuild choices: 20,000 entries in ")


async def test_projection_rebuild_reports_progress(database, tmp_path):
    from service.store.event_store import EventStore

    pool = await database.create_pool(min_size=1, max_size=2)
    store = EventStore(pool)
    store.start()
    try:
        await store.append(opt_outs(1200))
    finally:
        await store.stop()
        await pool.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")}
    env.update({"DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp_path),
                "CONSENT_LEDGER_PROGRESS_SECONDS": "0"})
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "service.cli.main", "projections", "rebuild", "choices"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "choices rebuilt from position 0 to 1200"
    assert re.search(r"^rebuild choices: [\d,]+/1,200 entries \(\d+%\)", done.stderr, re.M), done.stderr

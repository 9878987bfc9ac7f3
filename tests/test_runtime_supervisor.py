"""Supervised background tasks: a failure is logged when it happens, the task
restarts, a stuck task shows in /readyz and /metrics, and stopping is clean."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from conftest import app_config
from service.auth.tokens import Verifier
from service.store.database import Database
from service.http.keys import CHECKPOINTS, STORE
from service.http.app import create_app
from service.runtime.supervisor import Supervisor
from samples import auth, choice, nhs_numbers


async def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_failing_task_is_logged_when_it_fails_restarted_and_then_healthy():
    supervisor = Supervisor(stall_after=0.2)
    attempts = 0
    beats = 0

    async def work(beat) -> None:
        nonlocal attempts, beats
        attempts += 1
        if attempts <= 2:
            raise RuntimeError(f"failure {attempts}")
        while True:
            beats += 1
            beat()
            await asyncio.sleep(0.01)

    with capture_logs() as logs:
        supervisor.start("worker", work, every=0.01)
        await wait_until(lambda: beats >= 3)
    failures = [e for e in logs if e["event"] == "background task failed; restarting"]
    assert [(e["task"], e["error"], e["log_level"]) for e in failures] == [
        ("worker", "RuntimeError: failure 1", "error"), ("worker", "RuntimeError: failure 2", "error")]
    assert supervisor.tasks["worker"].restarts == 2
    assert supervisor.stalls() == []
    await supervisor.stop()
    assert supervisor.tasks == {}


async def test_a_task_without_progress_is_reported_with_its_name_and_last_error():
    supervisor = Supervisor(stall_after=0.1, max_backoff=0.05)

    async def always_fails(beat) -> None:
        raise ConnectionRefusedError("database down")

    async def healthy(beat) -> None:
        while True:
            beat()
            await asyncio.sleep(0.01)

    supervisor.start("signer", always_fails, every=0.05)
    supervisor.start("runner", healthy, every=0.05)
    await wait_until(lambda: supervisor.stalls())
    (stall,) = supervisor.stalls()
    assert stall.task == "signer"
    assert "no progress since start" in stall.reason and "ConnectionRefusedError: database down" in stall.reason
    await supervisor.stop()  # never raises although a task kept failing


async def test_a_task_that_returns_is_restarted_too():
    supervisor = Supervisor(stall_after=1)
    runs = 0

    async def returns(beat) -> None:
        nonlocal runs
        runs += 1
        beat()

    with capture_logs() as logs:
        supervisor.start("quitter", returns)
        await wait_until(lambda: runs >= 2)
    assert "the task returned" in logs[0]["error"]
    await supervisor.stop()


async def test_the_checkpoint_signer_survives_the_errors_that_killed_it(
    database: Database, verifier: Verifier, make_token
):
    """Regression (issue 10): after pg_terminate_backend or a restart the
    signer ended on asyncpg's InterfaceError or InternalClientError, which its
    loop did not catch; checkpoints froze, /readyz stayed 200, nothing was
    logged, and shutdown exited 1.  The exact exceptions are raised here from
    sign() while the database itself stays real."""
    app = create_app(app_config(pool_size=4, checkpoint_interval=0.05, task_stall_seconds=0.3), database, verifier)
    errors = [
        asyncpg.InterfaceError("cannot call Connection.fetchval(): the underlying connection is closed"),
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
    ]
    healed = asyncio.Event()
    attempts = 0
    with capture_logs() as logs:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            checkpoints = client.server.app[CHECKPOINTS]
            real_sign = checkpoints.sign

            async def failing_sign():
                nonlocal attempts
                attempts += 1
                if not healed.is_set():
                    raise errors[attempts % 2]
                return await real_sign()

            checkpoints.sign = failing_sign  # type: ignore[method-assign]
            token = make_token("patient-app")
            for nhs in nhs_numbers(3, seed=41):
                r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=auth(token))
                assert r.status == 201
            head, _ = await client.server.app[STORE].head()

            # While signing keeps failing, /readyz says which task and why.
            deadline = time.monotonic() + 10
            while True:
                r = await client.get("/readyz")
                if r.status == 503:
                    break
                assert time.monotonic() < deadline, "readyz never reported the stalled signer"
                await asyncio.sleep(0.05)
            body = await r.json()
            assert "checkpoint-signer" in body["detail"] and r.headers["Retry-After"]
            assert any(name in body["detail"] for name in ("InterfaceError", "InternalClientError")), body
            metrics = await (await client.get("/metrics")).text()
            assert 'consent_ledger_task_stalled{task="checkpoint-signer"} 1.0' in metrics

            healed.set()
            deadline = time.monotonic() + 10
            while (await checkpoints.latest()).size < head:
                assert time.monotonic() < deadline, "checkpoints did not catch up to the head"
                await asyncio.sleep(0.05)
            assert (await client.get("/readyz")).status == 200
            metrics = await (await client.get("/metrics")).text()
            restarts = next(line for line in metrics.splitlines()
                            if line.startswith('consent_ledger_task_restarts{task="checkpoint-signer"}'))
            assert float(restarts.split()[-1]) >= 2
        # Leaving the client stops the app: no exception although the task failed earlier.
    failures = [e for e in logs if e["event"] == "background task failed; restarting"]
    assert failures and all(e["task"] == "checkpoint-signer" for e in failures)
    assert {e["error"].split(":")[0] for e in failures} == {"InterfaceError", "InternalClientError"}



async def test_a_cancellation_of_the_caller_during_stop_is_not_swallowed():
    """Ctrl-C while a command stops its background tasks must still stop the
    command (it once ended as a normal stop, exit status 0)."""
    supervisor = Supervisor()
    release = asyncio.Event()

    async def slow_to_stop(beat) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # a task that takes a moment to wind down

    supervisor.start("slow", slow_to_stop, every=1.0)
    await asyncio.sleep(0)
    stopping = asyncio.create_task(supervisor.stop())
    await asyncio.sleep(0.01)
    stopping.cancel()  # the caller is cancelled while it waits for the task
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping

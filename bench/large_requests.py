"""Large requests against a real `consent-ledger serve`: memory per 5M-number
body in every accepted format, and whether small requests keep their
latency while 5M-number data uses are processed.

1. Memory: for each bulk endpoint and format, one body of --size numbers;
   the server's peak RSS (VmHWM, reset before each request through
   /proc/PID/clear_refs) against its RSS just before. Target: <= 400 MiB.
2. Latency: --writers closed-loop small writers (opt-outs) and a /healthz
   poller; after a quiet phase, --uses data uses of --size inline numbers
   are sent at once. Targets: /healthz p99 <= 100 ms, no small write times
   out (client timeout = the server's request timeout, 60 s).

    .venv/bin/python -m bench.large_requests
    .venv/bin/python -m bench.large_requests --size 1000000 --quiet-seconds 3

Only 127.0.0.1 is loaded; a scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import numpy as np

from contracts import bulk
from contracts.note import Signer
from service.store.checkpoints import write_key

from .http_writes import AUDIENCE, ISSUER, free_port, make_keys, nhs_numbers, token, wait_ready
from .machine import cpu_seconds, load_average, postgres_details, print_machine, require_durable
from .population import random_stems
from .scratch_db import scratch_database, server_dsn

ORG = "BENCH-LARGE"
GRANT = "BENCH-LARGE-1"
TIMEOUT = 60.0  # the server's default request timeout
CHOICE = json.dumps({"scope": "national", "channel": "app", "actor": {"kind": "patient"}}).encode()


def rss_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise LookupError(field)


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def grant_body() -> dict:
    now = datetime.now(timezone.utc)
    return {
        "grant_id": GRANT, "organisation": {"code": ORG, "name": "Large request benchmark"},
        "purpose": {"code": "research", "description": "Benchmark", "patient_benefit": "Faster releases"},
        "legal_basis": "public-task-research", "datasets": ["hes-apc"], "commercial": False, "exclusive": False,
        "valid_from": (now - timedelta(days=1)).isoformat(), "valid_until": (now + timedelta(days=30)).isoformat(),
        "approved_by": "Benchmark",
    }


def data_use_body(use_id: str, stems: np.ndarray) -> memoryview:
    head = json.dumps({"use_id": use_id, "grant_id": GRANT, "purpose": "research", "datasets": ["hes-apc"],
                       "occurred_at": datetime.now(timezone.utc).isoformat(), "access_method": "sde"})
    return bulk.format_json_array(stems, head[:-1].encode() + b', "nhs_numbers": ', b"}")


def spaced_lines(stems: np.ndarray) -> bytes:
    """``943 476 5919`` per line: the general (not fixed-width-digits) path."""
    digits = bulk.number_table(stems, 10)
    table = np.full((len(stems), 13), ord(" "), dtype=np.uint8)
    table[:, 0:3], table[:, 4:7], table[:, 8:12] = digits[:, 0:3], digits[:, 3:6], digits[:, 6:10]
    table[:, 12] = ord("\n")
    return table.tobytes()


def bodies(stems: np.ndarray) -> list[tuple[str, str, str, bytes | memoryview]]:
    """(label, path, content type, body) for every bulk endpoint and format."""
    dat = bulk.format_lines(stems, dat=True)
    return [
        ("filter JSON", "/v1/opt-out-filter", "application/json",
         bulk.format_json_array(stems, b'{"nhs_numbers": ', b"}")),
        ("filter text/plain (spaced)", "/v1/opt-out-filter", "text/plain", spaced_lines(stems)),
        ("filter .dat", "/v1/opt-out-filter", bulk.DAT, dat),
        ("cohort JSON array", "/v1/cohorts", "application/json", bulk.format_json_array(stems)),
        ("cohort text/plain", "/v1/cohorts", "text/plain", bulk.format_lines(stems)),
        ("cohort .dat", "/v1/cohorts", bulk.DAT, dat),
        ("data use JSON nhs_numbers", "/v1/data-uses", "application/json", data_use_body("BENCH-MEM", stems)),
    ]


async def memory_phase(serve, sde: dict, stems: np.ndarray) -> None:
    print(f"\n## Memory: one body of {len(stems):,} numbers, each to a freshly started server")
    print("| endpoint, format | body MiB | status | wall s | server CPU s | RSS idle MiB | peak RSS MiB "
          "| peak - idle |")
    print("|---|---|---|---|---|---|---|---|")
    for label, path, content_type, body in bodies(stems):
        async with serve() as (pid, _, session):
            await asyncio.sleep(1.0)  # let the startup's work settle
            idle = rss_mib(pid, "VmRSS")
            reset_peak(pid)
            cpu = cpu_seconds(pid)
            started = time.perf_counter()
            async with session.post(path, data=bytes(body), headers={**sde, "Content-Type": content_type},
                                    timeout=aiohttp.ClientTimeout(total=300)) as r:
                await r.read()
                status = r.status
            wall = time.perf_counter() - started
            peak = rss_mib(pid, "VmHWM")
            print(f"| {label} | {len(body) / 2**20:.1f} | {status} | {wall:.2f} | {cpu_seconds(pid) - cpu:.2f} | "
                  f"{idle:.0f} | {peak:.0f} | **{peak - idle:.0f}** |", flush=True)


async def latency_phase(session: aiohttp.ClientSession, base: str, pid: int, tokens: dict,
                        args: argparse.Namespace) -> None:
    print(f"\n## Latency: {args.writers} small writers + /healthz every 20 ms; after {args.quiet_seconds:g} s, "
          f"{args.uses} data uses of {args.size:,} inline numbers at once (sent by another process)")
    numbers = nhs_numbers(10**6)
    stop = asyncio.Event()
    writes: list[tuple[float, float, int]] = []  # (started, seconds, status)
    health: list[tuple[float, float]] = []
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    patient = {**tokens["patient"], "Content-Type": "application/json"}

    async def writer() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                async with session.post(f"/v1/patients/{next(numbers)}/opt-out", data=CHOICE, headers=patient,
                                        timeout=timeout) as r:
                    await r.read()
                    status = r.status
            except asyncio.TimeoutError:
                status = -1
            writes.append((t0, time.perf_counter() - t0, status))

    async def poller() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            async with session.get("/healthz", timeout=timeout) as r:
                await r.read()
            health.append((t0, time.perf_counter() - t0))
            await asyncio.sleep(0.02)

    # The big bodies go from another process: sending 3 x 62 MB from this
    # event loop would delay the very /healthz calls being timed.
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.large_requests", "--send-uses", base, "--token",
        tokens["sde"]["Authorization"], "--size", str(args.size), "--uses", str(args.uses),
        stdout=asyncio.subprocess.PIPE)
    assert sender.stdout is not None
    assert (await sender.stdout.readline()).strip() == b"bodies ready"
    background = [asyncio.create_task(writer()) for _ in range(args.writers)] + [asyncio.create_task(poller())]
    await asyncio.sleep(args.quiet_seconds)
    cpu = cpu_seconds(pid)
    big_started = time.perf_counter()
    os.kill(sender.pid, signal.SIGUSR1)  # go
    results = [json.loads(line) for line in (await sender.stdout.read()).splitlines()]
    big_done = time.perf_counter()
    await sender.wait()
    server_cpu = cpu_seconds(pid) - cpu
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*background)

    def summary(label: str, samples: list[float]) -> str:
        if not samples:
            return f"{label}: none"
        ms = np.array(samples) * 1000
        return (f"{label}: n={len(ms)}, p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms, "
                f"max {ms.max():.1f} ms")

    def quiet(t: float) -> bool:
        return t < big_started

    def during(t: float) -> bool:
        return big_started <= t <= big_done

    print(summary("/healthz before the big requests", [d for t, d in health if quiet(t)]))
    print(summary("/healthz while they ran        ", [d for t, d in health if during(t)]))
    print(summary("small writes before            ", [d for t, d, _ in writes if quiet(t)]))
    print(summary("small writes while they ran    ", [d for t, d, _ in writes if during(t)]))
    statuses: dict[int, int] = {}
    for _, _, s in writes:
        statuses[s] = statuses.get(s, 0) + 1
    print(f"small write statuses: {dict(sorted(statuses.items()))} (-1 = client timeout after {TIMEOUT:g} s)")
    for status, seconds, text in results:
        print(f"data use: {status} in {seconds:.2f} s{'' if status == 201 else ' ' + text}")
    print(f"big requests took {big_done - big_started:.2f} s wall, {server_cpu:.2f} s of server CPU; "
          f"server peak RSS {rss_mib(pid, 'VmHWM'):.0f} MiB", flush=True)


async def send_uses(base: str, authorization: str, size: int, uses: int) -> None:
    """The sender process: build the bodies, say so, wait for SIGUSR1, send them at once."""
    stems = [random_stems(np.random.default_rng(7 + i), size).astype(np.uint32) for i in range(uses)]
    bodies = [bytes(data_use_body(f"BENCH-LAT-{i}", c)) for i, c in enumerate(stems)]
    go = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
    print("bodies ready", flush=True)
    await go.wait()
    async with aiohttp.ClientSession(base) as session:
        async def send(body: bytes) -> list:
            t0 = time.perf_counter()
            async with session.post("/v1/data-uses", data=body, timeout=aiohttp.ClientTimeout(total=300),
                                    headers={"Authorization": authorization, "Content-Type": "application/json"}) as r:
                return [r.status, time.perf_counter() - t0, (await r.text())[:200]]

        for result in await asyncio.gather(*(send(b) for b in bodies)):
            print(json.dumps(result), flush=True)


async def main_async(args: argparse.Namespace) -> None:
    admin = server_dsn(False)
    pg = await postgres_details(admin)
    print("# Large requests: memory per 5M-number body, latency of small requests meanwhile")
    print_machine(pg)
    require_durable(pg)
    rng = np.random.default_rng(2026)
    stems = random_stems(rng, args.size).astype(np.uint32)
    async with scratch_database(admin) as db:
        with tempfile.TemporaryDirectory(prefix="cl-bench-large-") as tmp:
            key, jwks = make_keys(Path(tmp))
            log_key = Path(tmp) / "log.key"
            write_key(log_key, Signer.generate("consent-ledger.example/log"))
            env = {**os.environ, "DATABASE_URL": db.owner_dsn, "CONSENT_LEDGER_DATA_DIR": tmp,
                   "CONSENT_LEDGER_ENV": "production", "CONSENT_LEDGER_JWKS": str(jwks),
                   # Production accepts only issued ranges; the benchmark's patients are synthetic.
                   "CONSENT_LEDGER_NHS_NUMBER_RANGES": "synthetic",
                   "CONSENT_LEDGER_LOG_KEY": str(log_key), "CONSENT_LEDGER_JWT_ISSUER": ISSUER,
                   "CONSENT_LEDGER_JWT_AUDIENCE": AUDIENCE, "CONSENT_LEDGER_LOG_LEVEL": args.server_log_level}
            server_log = args.server_log or Path(tmp) / "serve.log"
            tokens = {"patient": {"Authorization": f"Bearer {token(key)}"},
                      "sde": {"Authorization": f"Bearer {token(key, 'sde', ORG)}"},
                      "dac": {"Authorization": f"Bearer {token(key, 'dac')}"}}

            @asynccontextmanager
            async def serve() -> AsyncIterator[tuple[int, str, aiohttp.ClientSession]]:
                port = free_port()
                proc = subprocess.Popen([sys.executable, "-m", "service.cli.main", "serve", "--port", str(port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=open(server_log, "ab"))
                base = f"http://127.0.0.1:{port}"
                try:
                    await wait_ready(base, proc)
                    async with aiohttp.ClientSession(base) as session:
                        yield proc.pid, base, session
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    if proc.returncode != 0:
                        print(f"server exited with {proc.returncode}; its log: {server_log}")

            async with serve() as (_, _, session):
                async with session.post("/v1/grants", json=grant_body(), headers=tokens["dac"]) as r:
                    assert r.status == 201, await r.text()
            print(f"load before: {load_average()}")
            if not args.skip_memory:
                await memory_phase(serve, tokens["sde"], stems)
            async with serve() as (pid, base, session):
                await latency_phase(session, base, pid, tokens, args)
            print(f"load after: {load_average()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=5_000_000, help="NHS numbers per large request")
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--uses", type=int, default=3, help="concurrent large data uses in the latency phase")
    p.add_argument("--quiet-seconds", type=float, default=5.0)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--server-log", help="keep the servers' logs in this file")
    p.add_argument("--server-log-level", default="warning")
    p.add_argument("--send-uses", metavar="URL", help=argparse.SUPPRESS)  # the sender process
    p.add_argument("--token", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.send_uses:
        asyncio.run(send_uses(args.send_uses, args.token, args.size, args.uses))
        return
    if not 0 < args.size <= 5_000_000 or not 0 < args.writers <= 64 or not 0 < args.uses <= 8:
        raise SystemExit("--size in (0, 5M], --writers in (0, 64], --uses in (0, 8]")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

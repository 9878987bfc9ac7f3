"""HTTP single-event writes against a real `consent-ledger serve` subprocess.

64 concurrent clients (by default) each POST /v1/patients/{nhs}/opt-out for
patients no one has written before, one request at a time, over loopback.
The server runs in a fresh database with a JWKS made for this run (a
generated Ed25519 key; tokens signed by the benchmark), as in production.

    .venv/bin/python -m bench.http_writes
    .venv/bin/python -m bench.http_writes --workers 2      # serve --workers 2
    .venv/bin/python -m bench.http_writes --embedded

Loops are bounded by --duration and --max-requests; only 127.0.0.1 is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import warnings

from joserfc import jwt
from joserfc.jwk import OKPKey

from contracts.nhs_number import NhsNumber, check_digit
from contracts.note import Signer
from service.store.checkpoints import write_key

from .machine import (
    backend_pids,
    cpu_seconds,
    load_average,
    self_cpu_seconds,
    peak_rss_mib,
    postgres_details,
    print_machine,
    process_peak_rss_mib,
    require_durable,
)
from .scratch_db import scratch_database, server_dsn

ISSUER = "https://idp.bench.invalid"
warnings.filterwarnings("ignore", message="EdDSA is deprecated")
AUDIENCE = "consent-ledger"
BODY = json.dumps({"scope": "national", "channel": "app", "actor": {"kind": "patient"}}).encode()


def nhs_numbers(count: int, first_stem: int = 999_000_000):
    stem = first_stem
    made = 0
    while made < count and stem < 1_000_000_000:
        if check_digit(f"{stem:09d}") is not None:
            yield str(NhsNumber.from_stem(stem))
            made += 1
        stem += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(directory: Path) -> tuple[OKPKey, Path]:
    key = OKPKey.generate_key("Ed25519", parameters={"kid": "bench", "alg": "EdDSA", "use": "sig"})
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    return key, jwks


def token(key: OKPKey, role: str = "patient-app", org: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"bench-{role}", "roles": [role],
              "iat": now, "nbf": now, "exp": now + 3600, **({"org": org} if org else {})}
    return jwt.encode({"alg": "EdDSA", "kid": "bench"}, claims, key, algorithms=["EdDSA"])


def server_pids(root: int) -> list[int]:
    """The serve process and its children (worker processes)."""
    pids = [root]
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(root)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    return pids


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    async with aiohttp.ClientSession() as session:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode} before becoming ready")
            try:
                async with session.get(f"{base}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the server did not become ready in time")


async def load(base: str, bearer: str, clients: int, duration: float, max_requests: int,
               warmup: int, cpu_now) -> dict:
    numbers = nhs_numbers(max_requests + warmup + clients)
    headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client(limit: int, deadline: float, record: bool) -> None:
            nonlocal sent
            while sent < limit and time.time() < deadline:
                nhs = next(numbers, None)
                if nhs is None:
                    return
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{base}/v1/patients/{nhs}/opt-out", data=BODY, headers=headers) as r:
                        await r.read()
                        status = r.status
                except aiohttp.ClientError:
                    status = 0
                if record:
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(client(warmup, time.time() + 30, False) for _ in range(clients)))
        sent = 0
        cpu_before = await cpu_now()
        started = time.time()
        await asyncio.gather(*(client(max_requests, started + duration, True) for _ in range(clients)))
        wall = time.time() - started
        cpu_after = await cpu_now()
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "wall": wall,
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "max": float(lat.max()) if len(lat) else float("nan"),
        "statuses": statuses,
        "cpu": {k: cpu_after[k] - cpu_before[k] for k in cpu_before},
    }


async def count_rows(dsn: str) -> tuple[int, int]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return (await conn.fetchval("SELECT count(*) FROM ledger_events"),
                await conn.fetchval("SELECT position FROM ledger_head"))
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> None:
    admin = server_dsn(args.embedded)
    pg = await postgres_details(admin)
    print("# HTTP single-event write benchmark")
    print_machine(pg)
    require_durable(pg)
    async with scratch_database(admin) as db:
        with tempfile.TemporaryDirectory(prefix="cl-bench-http-") as tmp:
            key, jwks = make_keys(Path(tmp))
            log_key = Path(tmp) / "log.key"  # production mode needs a real checkpoint key
            write_key(log_key, Signer.generate("consent-ledger.example/log"))
            port = free_port()
            env = {
                **os.environ,
                "DATABASE_URL": db.owner_dsn,
                "CONSENT_LEDGER_DATA_DIR": tmp,
                "CONSENT_LEDGER_ENV": "production",
                # Production accepts only issued ranges; the benchmark's patients are synthetic (999...).
                "CONSENT_LEDGER_NHS_NUMBER_RANGES": "synthetic",
                "CONSENT_LEDGER_JWKS": str(jwks),
                "CONSENT_LEDGER_LOG_KEY": str(log_key),
                "CONSENT_LEDGER_JWT_ISSUER": ISSUER,
                "CONSENT_LEDGER_JWT_AUDIENCE": AUDIENCE,
                "CONSENT_LEDGER_LOG_LEVEL": args.log_level,
            }
            cmd = [sys.executable, "-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
            if args.workers > 1:
                cmd += ["--workers", str(args.workers)]
            print(f"server:   {' '.join(cmd[1:])} (log level {args.log_level}, logs to {args.server_log})")
            print(f"clients:  {args.clients} concurrent, duration {args.duration} s, at most {args.max_requests}"
                  f" requests, {args.warmup} warm-up requests first", flush=True)
            log_file = open(args.server_log, "wb")
            proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                base = f"http://127.0.0.1:{port}"
                await wait_ready(base, proc)
                database_name = urlsplit(db.owner_dsn).path.lstrip("/")

                async def cpu_now() -> dict[str, float]:
                    # Server processes, this database's PostgreSQL backends, and this client.
                    return {
                        "server": sum(cpu_seconds(p) for p in server_pids(proc.pid)),
                        "postgres": sum(cpu_seconds(p) for p in await backend_pids(admin, database_name)),
                        "client": self_cpu_seconds(),
                    }

                load_before = load_average()
                result = await load(base, token(key), args.clients, args.duration, args.max_requests, args.warmup,
                                    cpu_now)
                load_after = load_average()
                rss = [process_peak_rss_mib(p) for p in server_pids(proc.pid)]
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log_file.close()
            rows, head = await count_rows(db.owner_dsn)
    ok = result["statuses"].get(201, 0)
    print(f"{args.clients} clients, {args.workers} server process(es): {result['requests']} requests in "
          f"{result['wall']:.1f} s = {result['rps']:.0f} req/s | p50 {result['p50']:.2f} ms | "
          f"p99 {result['p99']:.2f} ms | max {result['max']:.1f} ms")
    print(f"    statuses {dict(sorted(result['statuses'].items()))}; ledger rows {rows}, head {head} "
          f"(warm-up included); server peak RSS {' + '.join(f'{r:.0f}' for r in rss if r)} MiB; "
          f"client peak RSS {peak_rss_mib():.0f} MiB")
    n = max(1, result["requests"])
    print("    CPU per request: " + ", ".join(f"{k} {v / n * 1e6:.0f} us" for k, v in result["cpu"].items())
          + f" (total {sum(result['cpu'].values()) / n * 1e6:.0f} us; at this CPU cost 2 idle cores could do at most "
          f"~{2 * n / max(1e-9, sum(result['cpu'].values())):.0f} req/s)")
    print(f"    load before {load_before}; after {load_after}", flush=True)
    if ok != result["requests"]:
        print("    NOTE: not every request got 201; see statuses above and the server log")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embedded", action="store_true", help="use a private pgserver, not DATABASE_URL")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="server processes (serve --workers N)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--log-level", default="info", help="the server's log level (info is the default)")
    p.add_argument("--server-log", default=os.devnull, help="where the server's logs go")
    args = p.parse_args()
    if not 0 < args.duration <= 600 or not 0 < args.clients <= 1024 or args.max_requests > 800_000:
        raise SystemExit("--duration in (0, 600], --clients in (0, 1024], --max-requests <= 800000")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

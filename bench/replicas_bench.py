"""Figures for reads across instances and a streaming replica (issue 17).

    .venv/bin/python -m bench.replicas_bench                 # 1,000,000 opt-outs

Builds a real primary and streaming replica (tests/replication.py), loads
opt-outs on the primary (replayed to the replica), then runs `consent-ledger
serve` against primary + replica — one process, then two — and measures:
opt-out filter calls of 1,000,000 NHS numbers (MESH .dat in and out) per
second from two clients, and the history read's latency from the replica.
Two cores cap what one machine can show: the processes, both PostgreSQL
servers and the clients share them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from joserfc import jwt
from joserfc.jwk import OKPKey

from contracts.nhs_number import NhsNumber

from .bulk_load import load
from .machine import print_machine
from .population import random_stems

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from live_server import LiveServer  # noqa: E402
from replication import StreamingPair  # noqa: E402

ISSUER, AUDIENCE = "bench", "consent-ledger"


def token(key: OKPKey, role: str, **claims: object) -> str:
    now = int(time.time())
    return jwt.encode({"alg": "EdDSA", "kid": "bench"}, {"iss": ISSUER, "aud": AUDIENCE, "sub": f"bench-{role}",
                      "roles": [role], "iat": now, "exp": now + 3600, **claims}, key, algorithms=["EdDSA"])


async def filter_rate(urls: list[str], body: bytes, sde: str, seconds: float) -> tuple[float, float]:
    """Calls/s and p50 latency of 1M-number filter calls from two clients, spread over the instances."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {sde}",
                                                  "Content-Type": "application/vnd.nhs.mesh.dat"}) as session:
            n = 0
            while time.perf_counter() < deadline:
                url = urls[(i + n) % len(urls)]
                started = time.perf_counter()
                async with session.post(f"{url}/v1/opt-out-filter", data=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                latencies.append(time.perf_counter() - started)
                n += 1

    began = time.perf_counter()
    await asyncio.gather(client(0), client(1))
    latencies.sort()
    return len(latencies) / (time.perf_counter() - began), latencies[len(latencies) // 2]


async def history_latency(url: str, key: OKPKey, patient: str, requests: int) -> tuple[float, float, dict]:
    own = token(key, "patient-app", nhs_number=patient)
    times = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {own}"}) as session:
        for _ in range(requests + 20):
            started = time.perf_counter()
            async with session.get(f"{url}/v1/patients/{patient}/history") as r:
                await r.read()
                assert r.status == 200
            times.append(time.perf_counter() - started)
        async with session.get(f"{url}/metrics") as r:
            served = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in (await r.text()).splitlines()
                      if line.startswith("consent_ledger_reads_served{")}
    times = sorted(times[20:])
    return times[len(times) // 2] * 1000, times[int(len(times) * 0.99)] * 1000, served


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--opt-outs", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    print("# Replicas and instances benchmark")
    print_machine()
    pair = StreamingPair()
    key = OKPKey.generate_key("Ed25519", parameters={"kid": "bench"})
    try:
        await pair.create_database("bench")
        started = time.perf_counter()
        await load(pair.primary.database_url("bench"), args.opt_outs, 17)
        await pair.wait_for_replay(seconds=600)
        print(f"{args.opt_outs:,} opt-outs loaded on the primary and replayed in {time.perf_counter() - started:.0f} s")
        numbers = [str(NhsNumber.from_stem(int(s))) for s in random_stems(np.random.default_rng(5), 1_000_000)]
        body = "".join(f"{n},\n" for n in numbers).encode()
        sde = token(key, "sde", org="BENCH")
        env = {"CONSENT_LEDGER_READ_DATABASE_URL": pair.replica.database_url("bench"),
               "CONSENT_LEDGER_LOG_LEVEL": "warning"}
        with tempfile.TemporaryDirectory(prefix="cl-bench-replicas-") as tmp:
            servers: list[LiveServer] = []
            try:
                for count in (1, 2):
                    while len(servers) < count:
                        work = Path(tmp) / f"s{len(servers)}"
                        work.mkdir()
                        server = LiveServer(database_url=pair.primary.database_url("bench"), signing_key=key,
                                            issuer=ISSUER, audience=AUDIENCE, workdir=work, extra_env=env)
                        server.wait_ready(attempts=6000)
                        servers.append(server)
                    rate, p50 = await filter_rate([s.url for s in servers], body, sde, args.seconds)
                    print(f"{count} process(es): {rate:.2f} filter calls/s of 1,000,000 numbers (.dat), p50 "
                          f"{p50 * 1000:.0f} ms, two clients")
                patient = numbers[0]
                p50, p99, served = await history_latency(servers[0].url, key, patient, 200)
                print(f"history read (200 requests, one client): p50 {p50:.1f} ms, p99 {p99:.1f} ms; reads served "
                      f"by instance 1: {json.dumps(served)}")
            finally:
                for s in servers:
                    s.stop()
    finally:
        pair.remove()


if __name__ == "__main__":
    asyncio.run(main())

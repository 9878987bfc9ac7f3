"""What a witness costs per checkpoint: add-checkpoint round trips to a
`consent-ledger witness serve` process on loopback, its CPU per checkpoint
(signature check, consistency proof, durable SQLite write, cosignature), and
the log side's check of the cosignature it gets back.

    .venv/bin/python bench/witness_bench.py [--checkpoints 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from machine import cpu_seconds, print_machine  # noqa: E402
from witness_process import ORIGIN, Log, Witness, witness_key  # noqa: E402

from contracts import cosignature, note  # noqa: E402


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoints", type=int, default=300)
    args = p.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        signer = note.Signer.generate(ORIGIN)
        key, verifier = witness_key(work, "witness.example/bench")
        witness = Witness(work, key, [f"{ORIGIN}:{signer.verifier.vkey}"], work / "state").launch().ready()
        try:
            log = Log(signer).append(1000)
            bodies, checkpoints, held = [], [], 0
            for _ in range(args.checkpoints):  # made beforehand: only the witness is timed
                bodies.append(log.request(held))
                checkpoints.append(log.checkpoint())
                held = log.size
                log.append(7)
            latencies, checks = [], []
            async with aiohttp.ClientSession() as session:
                cpu = cpu_seconds(witness.process.pid)
                for body, checkpoint in zip(bodies, checkpoints):
                    t = time.perf_counter()
                    async with session.post(witness.url, data=body) as r:
                        text = await r.text()
                        assert r.status == 200, text
                    latencies.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    assert cosignature.cosignatures(checkpoint + text, [verifier])
                    checks.append(time.perf_counter() - t)
                cpu = cpu_seconds(witness.process.pid) - cpu
        finally:
            witness.stop()
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    print(f"{args.checkpoints} checkpoints (log of {held:,} entries at the end)")
    print(f"add-checkpoint round trip: p50 {statistics.median(ordered) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"
          f" (includes an fsync'd SQLite commit)")
    print(f"witness CPU per checkpoint: {cpu / args.checkpoints * 1e3:.2f} ms")
    print(f"log side, verifying the cosignature: p50 {statistics.median(checks) * 1e3:.3f} ms")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())

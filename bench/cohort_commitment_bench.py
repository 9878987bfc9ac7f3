"""Build a cohort commitment for a 5M-member cohort and time its proofs.

Steps, each with CPU and wall-clock time: derive the members' secrets from
a service key, compute their tags for one commitment, build the tree; then
membership and absence proofs (generation and verification) for sampled
patients, and the size of a proof as JSON.  Target: the commitment is a
small fraction of the 3.2 s a 5M-member data use takes today (issue 12:
recording with the commitment within 2x of that).

    .venv/bin/python bench/cohort_commitment_bench.py [--size 5000000] [--samples 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import msgspec
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from machine import peak_rss_mib, print_machine, self_cpu_seconds  # noqa: E402
from population import random_stems  # noqa: E402

from contracts import cohort_commitment as cc  # noqa: E402


def timed(what: str, fn):
    cpu, wall = self_cpu_seconds(), time.perf_counter()
    out = fn()
    print(f"{what:<34} {time.perf_counter() - wall:7.3f} s wall  {self_cpu_seconds() - cpu:7.3f} s CPU")
    return out


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=5_000_000)
    p.add_argument("--samples", type=int, default=2000)
    args = p.parse_args()
    print_machine()
    rng = np.random.default_rng(12)
    stems = random_stems(rng, args.size).astype(np.uint32)
    key, context = rng.bytes(32), "6f1c9a52-3c1b-4a4e-9a9e-1d2f3a4b5c6d"
    print(f"cohort: {len(stems):,} members")

    cpu, wall = self_cpu_seconds(), time.perf_counter()
    secrets = timed("derive secrets (AES, one call)", lambda: cc.derive_secrets(key, stems))
    tags = timed("member tags (AES, one call)", lambda: cc.member_tags(secrets, context))
    tree = timed("build tree (sort, hash buckets)", lambda: cc.build(tags))
    print(f"{'commitment in all':<34} {time.perf_counter() - wall:7.3f} s wall  {self_cpu_seconds() - cpu:7.3f} s CPU"
          f"  ({tree.bits} bits: {1 << tree.bits:,} buckets, {len(stems) / (1 << tree.bits):.1f} members each)")

    members = rng.choice(len(stems), args.samples, replace=False)
    outsiders = cc.member_tags(rng.integers(0, 256, (args.samples, 16), dtype=np.uint8), context)
    for label, sample in (("membership", [tags[i].tobytes() for i in members]),
                          ("absence", [row.tobytes() for row in outsiders])):
        proving, verifying, sizes = [], [], []
        for tag in sample:
            t = time.perf_counter()
            proof = tree.proof(tag)
            proving.append(time.perf_counter() - t)
            wire = msgspec.json.encode(proof)
            t = time.perf_counter()
            answer = cc.verify(msgspec.json.decode(wire, type=cc.CohortProof), tag, tree.size, tree.root)
            verifying.append(time.perf_counter() - t)
            assert answer is (label == "membership")
            sizes.append(len(wire))
        print(f"{label} proof: make {percentiles(proving)}; decode+verify {percentiles(verifying)};"
              f" {statistics.mean(sizes) / 1024:.1f} KiB JSON on average")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

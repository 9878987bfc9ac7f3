"""Auditor verify throughput over an export of synthetic entries.

    python bench/verify_bench.py [--entries 1000000] [--keep FILE]

Builds the export directly (no HTTP): canonical entries of realistic size,
their leaf hashes and a checkpoint signed with a fresh key; then times the
same `verify` the CLI runs.  Target: >= 100,000 entries/s.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from uuid import UUID

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts import note  # noqa: E402
from contracts.entry import encode_entry, leaf_hash  # noqa: E402
from contracts.events import OptOutRegistered  # noqa: E402
from contracts.merkle import CompactRange  # noqa: E402
from contracts.values import Actor  # noqa: E402
from service.audit import client as auditor  # noqa: E402

from machine import describe  # noqa: E402


def write_export(path: Path, count: int) -> tuple[note.Signer, float]:
    started = time.perf_counter()
    signer = note.Signer.generate("bench.example/log")
    tree = CompactRange()
    encode = msgspec.json.Encoder().encode
    tmp = path.with_name(path.name + ".body")
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        for position in range(1, count + 1):
            entry = encode_entry(
                position=position,
                event_id=UUID(int=position * 7919 + 1),
                event_type="OptOutRegistered",
                aggregate_id=UUID(int=position),
                aggregate_version=1,
                recorded_at="2026-11-23T06:00:00.000000Z",
                payload=OptOutRegistered(nhs_number=f"999{position % 10**7:07d}", scope="national",
                                         channel="app", actor=Actor(kind="patient"), recorded_by="patient-app:nhs-app"),
            )
            leaf = leaf_hash(entry)
            tree.append(leaf)
            f.write(encode(auditor.ExportLine(position, entry, leaf)) + b"\n")
    checkpoint = note.sign(note.Checkpoint("bench.example/log", count, tree.root()).body(), [signer])
    with gzip.open(path, "wb", compresslevel=1) as out, gzip.open(tmp, "rb") as body:
        out.write(json.dumps({"format": auditor.EXPORT_FORMAT, "checkpoint": checkpoint}).encode() + b"\n")
        while chunk := body.read(1 << 20):
            out.write(chunk)
    tmp.unlink()
    return signer, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--keep", help="write the export here and keep it")
    args = p.parse_args()
    print(asyncio.run(describe(None)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "export.jsonl.gz"
        signer, build = write_export(path, args.entries)
        print(f"export: {args.entries:,} entries, {path.stat().st_size / 2**20:.1f} MiB gzip, built in {build:.1f}s")
        outcome = auditor.verify(auditor.ExportSource(path), [signer.verifier])
        assert outcome.ok, outcome.report()
        print(outcome.report())
        print(f"verify throughput: {args.entries / outcome.seconds:,.0f} entries/s (target >= 100,000)")


if __name__ == "__main__":
    main()

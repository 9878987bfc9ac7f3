"""FHIR figures: importing opt-outs from NDJSON, and reading a patient's
history as AuditEvents.

    .venv/bin/python -m bench.fhir_bench                       # 1,000,000 resources, 200 uses
    .venv/bin/python -m bench.fhir_bench --resources 100000 --embedded

The import runs `consent-ledger import-fhir` as a subprocess against a
scratch database (targets: >= 10,000 resources/s); the AuditEvent read is
`GET /fhir/AuditEvent?patient=…&_count=200` over loopback for a patient in
200 data uses (target: p99 as the history's).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import msgspec
import numpy as np
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey

from contracts.bodies import DataUseRequest, GrantRequest
from contracts.cohort import encode_cohort
from contracts.nhs_number import NhsNumber
from service import config
from service.app.caller import Caller
from service.auth.tokens import Verifier
from service.composition import running
from service.fhir.resources import NATIONAL_OPT_OUT_POLICY, NHS_NUMBER
from service.http.app import create_app
from service.runtime import logs

from .machine import (
    cpu_seconds,
    peak_rss_mib,
    postgres_details,
    print_machine,
    process_peak_rss_mib,
    self_cpu_seconds,
)
from .population import random_stems, valid
from .scratch_db import scratch_database, server_dsn


def ndjson(path: Path, count: int) -> int:
    stems = valid(random_stems(np.random.default_rng(7), count * 2))[:count]
    with path.open("w") as f:
        for i, stem in enumerate(stems):
            f.write(json.dumps({
                "resourceType": "Consent", "id": f"ndop-{i}", "status": "active",
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                      "code": "patient-privacy"}]},
                "patient": {"identifier": {"system": NHS_NUMBER, "value": str(NhsNumber.from_stem(int(stem)))}},
                "dateTime": "2021-06-01T09:30:00Z", "policy": [{"uri": NATIONAL_OPT_OUT_POLICY}],
                "provision": {"type": "deny"}}) + "\n")
    return len(stems)


async def bench_import(db, count: int, tmp: Path) -> None:
    path = tmp / "optouts.ndjson"
    made = ndjson(path, count)
    env = {**os.environ, "DATABASE_URL": db.owner_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp),
           "CONSENT_LEDGER_LOG_LEVEL": "warning", "CONSENT_LEDGER_PROGRESS_SECONDS": "3600"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli.main", "import-fhir", str(path), "--source",
                             "bench-register", "--batch", "2000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    peak = 0.0
    cpu = 0.0
    while proc.poll() is None:
        await asyncio.sleep(0.5)
        try:
            cpu = cpu_seconds(proc.pid)
            peak = max(peak, process_peak_rss_mib(proc.pid) or 0.0)
        except OSError:
            pass
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"import failed: {err.decode()[-2000:]}")
    print(f"import-fhir: {made:,} Consent resources ({path.stat().st_size / 2**20:.0f} MiB NDJSON) in {wall:.1f} s "
          f"= {made / wall:,.0f} resources/s [target >= 10,000]; importer CPU >= {cpu:.1f} s, peak RSS "
          f"{peak:.0f} MiB; {out.decode().strip()}")


async def bench_audit_events(db, uses: int, queries: int) -> None:
    key = OKPKey.generate_key("Ed25519", parameters={"kid": "bench"})
    verifier = Verifier(KeySet([key]), issuer="bench", audience="consent-ledger")
    cfg = dataclasses.replace(config.load({}), pool_size=4)
    patient = NhsNumber.from_stem(int(valid(random_stems(np.random.default_rng(3), 10))[0]))
    dac, sde = Caller("bench-dac", frozenset({"dac"})), Caller("bench-sde", frozenset({"sde"}), org="BENCH")
    async with running(cfg, db) as parts:
        now = datetime.now(timezone.utc)
        await parts.ledger.create_grant(dac, msgspec.convert({
            "grant_id": "FHIR-BENCH", "organisation": {"code": "BENCH", "name": "Bench SDE"},
            "purpose": {"code": "research", "description": "bench", "patient_benefit": "figures"},
            "legal_basis": "public-task-research", "datasets": ["hes-apc"], "commercial": False,
            "exclusive": False, "valid_from": now.isoformat(), "valid_until": now.replace(year=now.year + 1).isoformat(),
            "approved_by": "bench"}, GrantRequest), None)
        others = valid(random_stems(np.random.default_rng(4), 2000))
        for i in range(uses):
            cohort = encode_cohort(np.unique(np.append(others[i % 1000: i % 1000 + 500], patient.stem)))
            await parts.ledger.store_cohort(sde, cohort, None)
            await parts.ledger.record_data_use(sde, msgspec.convert({
                "use_id": f"u{i}", "grant_id": "FHIR-BENCH", "purpose": "research", "datasets": ["hes-apc"],
                "occurred_at": datetime.now(timezone.utc).isoformat(), "access_method": "sde",
                "cohort_id": cohort.cohort_id}, DataUseRequest), None)
        head, _ = await parts.store.head()
        assert await parts.runner.wait_for(head, 120, parts.runner.lowest_position)
    logs.configure("warning", "json")
    server = TestServer(create_app(cfg, db, verifier), host="127.0.0.1")
    await server.start_server()
    token = jwt.encode({"alg": "EdDSA", "kid": "bench"}, {"iss": "bench", "aud": "consent-ledger", "sub": "bench-app",
                       "roles": ["patient-app"], "nhs_number": str(patient),  # the patient's own app: its reads are not listed
                       "iat": int(time.time()), "exp": int(time.time()) + 3600}, key,
                       algorithms=["EdDSA"])
    latencies = []
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}",
                                         headers={"Authorization": f"Bearer {token}"}) as session:
            for n in range(queries + 20):
                t = time.perf_counter()
                async with session.get("/fhir/AuditEvent", params={"patient": str(patient), "_count": "200"}) as r:
                    body = await r.read()
                    assert r.status == 200, body[:500]
                if n >= 20:
                    latencies.append(time.perf_counter() - t)
            found = sum(1 for e in msgspec.json.decode(body)["entry"] if e["resource"]["type"]["code"] == "110106")
    finally:
        await server.close()
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1000  # noqa: E731
    print(f"GET /fhir/AuditEvent, a patient in {uses} data uses, _count=200 ({found} disclosures on the page), "
          f"{queries} requests: p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1] * 1000:.1f} ms; "
          f"bench process peak RSS {peak_rss_mib():.0f} MiB, CPU {self_cpu_seconds():.1f} s")


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--embedded", action="store_true", help="use a private pgserver, not DATABASE_URL")
    p.add_argument("--resources", type=int, default=1_000_000)
    p.add_argument("--uses", type=int, default=200)
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args()
    admin = server_dsn(args.embedded)
    print("# FHIR benchmark")
    print_machine(await postgres_details(admin))
    with tempfile.TemporaryDirectory(prefix="cl-bench-fhir-") as tmp:
        async with scratch_database(admin) as db:
            await bench_import(db, args.resources, Path(tmp))
    async with scratch_database(admin) as db:
        await bench_audit_events(db, args.uses, args.queries)


if __name__ == "__main__":
    asyncio.run(main())

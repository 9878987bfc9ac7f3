"""Public statistics (issue 14, item 4): every count of patients suppressed
under 10 and rounded to 5, cell by cell, so no figure is an exact count and
one patient's choice moves a cell by 0 or 5, never by 1."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import app_config
from samples import auth, choice, data_use, grant, nhs_numbers
from service.http.app import create_app


@pytest.fixture
async def fresh(database, verifier) -> AsyncIterator[TestClient]:
    """Statistics recomputed on every request, so two queries see two states."""
    async with TestClient(TestServer(create_app(app_config(statistics_seconds=0), database, verifier),
                                     host="127.0.0.1")) as c:
        yield c


async def _caught_up(client: TestClient, position: int) -> dict:
    for _ in range(200):
        stats = await (await client.get("/v1/statistics")).json()
        if stats["as_of"] >= position:
            return stats
    raise AssertionError("the statistics did not catch up")


def _patient_counts(stats: dict) -> list[int | None]:
    cells = [c[k] for table in ("choices_by_month", "choices_over_time", "choices_by_channel")
             for c in stats[table] for k in ("opt_outs", "opt_ins")]
    return cells + list(stats["opted_out_now"].values())


async def test_statistics_publish_no_small_or_exact_count_of_patients(fresh: TestClient, make_token):
    app, dac, sde = (auth(make_token("patient-app")), auth(make_token("dac")),
                     auth(make_token("sde", org="SDE-NORTH")))
    patients = nhs_numbers(40, seed=31)
    last = 0
    for nhs in patients[:23]:
        last = (await (await fresh.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=app)).json())["position"]
    for nhs in patients[23:26]:
        await fresh.post(f"/v1/patients/{nhs}/opt-out", json=choice(channel="post"), headers=app)
    for nhs in patients[26:38]:
        await fresh.post(f"/v1/patients/{nhs}/opt-out", json=choice(scope="commercial"), headers=app)
    for body in (grant("G-1", datasets=["hes-apc", "gp-prescribing"]),
                 grant("G-2", org="PHARMA-1", commercial=True, datasets=["hes-apc"])):
        last = (await (await fresh.post("/v1/grants", json=body, headers=dac)).json())["position"]
    r = await fresh.post("/v1/data-uses", json=data_use("u-1", "G-1", nhs_numbers=patients[38:40],
                                                         opt_out_state_position=last), headers=sde)
    assert r.status == 201, await r.text()
    stats = await _caught_up(fresh, (await r.json())["position"])

    counts = _patient_counts(stats)
    assert all(c is None or c == 0 or (c >= 10 and c % 5 == 0) for c in counts), counts
    month = datetime.now(timezone.utc).strftime("%Y-%m")
    cube = {(c["month"], c["scope"], c["channel"]): (c["opt_outs"], c["opt_ins"]) for c in stats["choices_by_month"]}
    assert cube == {(month, "national", "app"): (25, 0), (month, "national", "post"): (None, 0),
                    (month, "commercial", "app"): (10, 0)}
    assert stats["opted_out_now"] == {"national": 25, "type-1": 0, "commercial": 10, "non-research": 0,
                                      "non-planning": 0}
    assert [(g["grant_id"], g["uses"], g["commercial"]) for g in stats["uses_by_grant"]] == [
        ("G-1", 1, False), ("G-2", 0, True)]
    datasets = {d["dataset"]: d for d in stats["datasets"]}
    assert datasets["hes-apc"]["organisations"] == 2 and datasets["hes-apc"]["grants"] == 2
    assert datasets["hes-apc"]["uses"] == 1 and datasets["hes-apc"]["largest_organisation"] == "SDE-NORTH"
    assert datasets["gp-prescribing"]["organisations"] == 1 and datasets["gp-prescribing"]["uses"] == 0
    assert stats["commercial"] == {"grants": 2, "commercial_grants": 1, "uses": 1, "commercial_uses": 0}

    text = await (await fresh.get("/v1/statistics", params={"format": "csv"})).text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {(r["scope"], r["channel"], r["opt_outs"]) for r in rows} == {
        ("national", "app", "25"), ("national", "post", "<10"), ("commercial", "app", "10")}
    grants_csv = await (await fresh.get("/v1/statistics", params={"table": "uses-by-grant"},
                                        headers={"Accept": "text/csv"})).text()
    assert grants_csv.splitlines()[0] == "grant_id,organisation_code,organisation_name,purpose,commercial,uses"
    assert (await fresh.get("/v1/statistics", params={"table": "patients"})).status == 400
    assert (await fresh.get("/v1/statistics", params={"format": "xml"})).status == 400

    # The register's counts of patients follow the same rule: 2 patients covered is "fewer than 10".
    register = await (await fresh.get("/v1/register")).json()
    assert {g["grant_id"]: g["patients_covered"] for g in register["grants"]} == {"G-1": None, "G-2": 0}


async def test_one_patients_choice_moves_a_published_cell_by_zero_or_five_never_one(fresh: TestClient, make_token):
    """Differencing two queries, either side of one more patient's opt-out, never reveals an exact count."""
    app = auth(make_token("patient-app"))
    patients = nhs_numbers(30, seed=32)
    before = None
    for nhs in patients:
        position = (await (await fresh.post(f"/v1/patients/{nhs}/opt-out", json=choice(channel="phone"),
                                            headers=app)).json())["position"]
        after = _patient_counts(await _caught_up(fresh, position))
        if before is not None:
            for old, new in zip(before, after):
                if old is not None and new is not None:
                    assert new - old in (0, 5), (old, new)
                assert not (old is None and new not in (None, 10))  # out of suppression only at 10
        before = after

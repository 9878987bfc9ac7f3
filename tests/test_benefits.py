"""Benefits and value, promised and delivered (issue 14, item 3): structured
commitments on grants, outputs and value recorded against them, the register
showing promised against delivered and flagging what is overdue."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from aiohttp.test_utils import TestClient

from samples import auth, grant, settled, verified_register

NOW = datetime.now(timezone.utc)
TERMS = {"value_model": "royalty", "limits_national_benefit": False, "accreditation": "ISO 27001",
         "security_toolkit": "standards-met"}
BENEFITS = [
    {"description": "Faster diagnosis of lung cancer", "measure": "median days to diagnosis",
     "target": "down 20% in pilot trusts", "due": (NOW - timedelta(days=1)).isoformat()},
    {"description": "An open diagnostic model", "measure": "model published", "target": "under an open licence",
     "due": (NOW + timedelta(days=300)).isoformat()},
]


async def _register_row(client: TestClient, position: int) -> dict:
    for _ in range(200):
        register = await (await client.get("/v1/register")).json()
        if register["as_of"] >= position:
            (row,) = register["grants"]
            return row
        await asyncio.sleep(0.05)
    raise AssertionError("the register did not catch up")


async def test_the_register_shows_promised_against_delivered_and_value_returned(client: TestClient, make_token,
                                                                               database):
    dac = auth(make_token("dac"))
    r = await client.post("/v1/grants", json=grant("G-AI", org="PHARMA-1", commercial=True, benefits=BENEFITS,
                                                   commercial_terms=TERMS), headers=dac)
    assert r.status == 201, await r.text()

    async def post(path: str, body: dict, status: int = 201) -> dict:
        r = await client.post(f"/v1/grants/G-AI/{path}", json=body, headers=dac)
        answer = await r.json()
        assert r.status == status, answer
        return answer

    await post("outputs", {"kind": "publication", "identifier": "10.1000/xyz123", "title": "Open lung model",
                           "benefit": 1})
    await post("outputs", {"kind": "publication", "identifier": "10.1000/xyz123", "title": "Again"}, 409)
    problem = await post("outputs", {"kind": "product", "identifier": "P-1", "title": "Tool", "benefit": 5}, 422)
    assert problem["type"].endswith("unknown-benefit")
    period = {"period_from": (NOW - timedelta(days=90)).isoformat(), "period_until": NOW.isoformat()}
    await post("value", {"amount": 1_000_000, "currency": "GBP", **period})
    await post("allocations", {"amount": 600_000, "currency": "GBP", "care_service": "Leeds lung cancer pathway"})
    problem = await post("allocations", {"amount": 500_000, "currency": "GBP", "care_service": "X"}, 422)
    assert problem["type"].endswith("allocation-exceeds-value") and "400000" not in problem["detail"]
    assert "only 1000000 GBP" in problem["detail"] and "600000 is already allocated" in problem["detail"]
    await post("allocations", {"amount": 1, "currency": "EUR", "care_service": "X"}, 422)
    await post("value", {"amount": 0, "currency": "GBP", **period}, 422)
    await post("value", {"amount": 5, "currency": "gbp", **period}, 422)
    last = await post("value", {"amount": 5, "currency": "GBP", "period_from": period["period_until"],
                                "period_until": period["period_from"]}, 422)
    assert last["type"].endswith("invalid-dates")
    r = await client.post("/v1/grants/G-AI/value", json={"amount": 5, "currency": "GBP", **period},
                          headers=auth(make_token("sde", org="PHARMA-1")))
    assert r.status == 403
    r = await client.post("/v1/grants/G-NONE/outputs", json={"kind": "other", "identifier": "x", "title": "y"},
                          headers=dac)
    assert r.status == 404
    position = (await post("allocations", {"amount": 100_000, "currency": "GBP", "care_service": "Bradford GP "
                                                                                                   "access"}))["position"]

    row = await _register_row(client, position)
    assert [(b["delivered_by"], b["overdue"]) for b in row["benefits"]] == [([], True), (["10.1000/xyz123"], False)]
    assert row["commercial_terms"] == TERMS
    assert [(o["kind"], o["identifier"], o["benefit"]) for o in row["outputs"]] == [
        ("publication", "10.1000/xyz123", 1)]
    (value,) = row["value"]
    assert (value["currency"], value["received"], value["allocated"]) == ("GBP", 1_000_000, 700_000)
    assert [a["care_service"] for a in value["allocations"]] == ["Leeds lung cancer pathway", "Bradford GP access"]

    page = await (await client.get("/register/G-AI")).text()
    assert "Overdue" in page and "royalty" in page and "GBP 10000.00 received, 7000.00 allocated" in page
    table = await (await client.get("/register")).text()
    assert "1 of 2 delivered" in table and "1 overdue" in table
    stats = await (await client.get("/v1/statistics")).json()
    assert stats["value"] == [{"currency": "GBP", "received": 1_000_000, "allocated": 700_000}]
    charts = await (await client.get("/statistics")).text()
    assert "GBP received" in charts and ">10,000<" in charts and ">7,000<" in charts  # whole pounds

    # Anyone can check all of it against the log; a changed amount in the read model is caught.
    await settled(client, position)
    honest = await verified_register(client)
    assert honest.ok, honest.report()
    owner = await database.connect_owner()
    try:
        await owner.execute("UPDATE grant_value SET amount = amount * 10 WHERE direction = 'received'")
        await owner.execute("DELETE FROM grant_outputs")
    finally:
        await owner.close()
    tampered = await verified_register(client)
    found = {(f.where, f.what.split(":")[0]) for f in tampered.findings}
    assert {("G-AI", "value"), ("G-AI", "outputs"), ("G-AI", "benefits")} <= found, tampered.report()

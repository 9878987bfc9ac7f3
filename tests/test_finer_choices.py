"""Finer choices on top of the national opt-out (issue 14, item 1): no
commercial use, research only, planning only. Recorded and withdrawn like
opt-outs, honoured by the one rule under the grants they cover, and read
back the same way whether the decision state was followed or loaded from the
entries' bytes."""

from __future__ import annotations

import random

import msgspec
import numpy as np
from aiohttp.test_utils import TestClient

from contracts.bodies import ChoiceRequest
from contracts.codes import OptOutScope, values
from contracts.nhs_number import NhsNumber
from projection_reference import APP
from projections.optout_filter import OptOutFilter
from samples import auth, choice, data_use, grant, nhs_numbers
from service.app.ledger import Ledger
from service.store.event_store import EventStore


async def test_the_state_loaded_from_entry_bytes_equals_the_state_that_followed_them(store: EventStore, pool):
    rng = random.Random(14)
    patients = nhs_numbers(30, seed=14)
    ledger = Ledger(store)
    for _ in range(300):
        nhs = NhsNumber(rng.choice(patients))
        actor = {"kind": "patient"} if rng.random() < 0.8 else {"kind": "proxy", "proxy_role": "parent"}
        request = msgspec.convert({"scope": rng.choice(values(OptOutScope)), "channel": rng.choice(["app", "phone"]),
                                   "actor": actor}, ChoiceRequest)
        await ledger.choose(APP, nhs, rng.random() < 0.6, request, None)
    head, _ = await store.head()
    loaded = await OptOutFilter.load(pool)
    followed = OptOutFilter()
    followed.follow([s.entry for s in await store.read_after(0, head)])
    stems = np.array([int(p[:9]) for p in patients], dtype=np.uint32)
    assert loaded.position == followed.position == head
    held = 0
    for scope in values(OptOutScope):
        for position in range(0, head + 1, 7):
            want = followed.scopes[scope].contains(stems, position)
            assert (loaded.scopes[scope].contains(stems, position) == want).all(), (scope, position)
            held += int(want.sum())
    assert held, "no choice was in force anywhere: the comparison proved nothing"


async def _filter(client: TestClient, sde: dict, numbers: list[str], grant_id: str | None, min_position: int) -> list:
    params = {"min_position": str(min_position), **({"grant_id": grant_id} if grant_id else {})}
    r = await client.post("/v1/opt-out-filter", params=params, json={"nhs_numbers": numbers}, headers=sde)
    assert r.status == 200, await r.text()
    return (await r.json())["nhs_numbers"]


async def test_no_commercial_use_is_honoured_under_commercial_grants_only(client: TestClient, make_token):
    app, dac, sde = (auth(make_token("patient-app")), auth(make_token("dac")),
                     auth(make_token("sde", org="SDE-NORTH")))
    patients = nhs_numbers(4, seed=41)
    careful, research_only, planning_only, other = patients
    for nhs, scope in ((careful, "commercial"), (research_only, "non-research"), (planning_only, "non-planning")):
        r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(scope=scope), headers=app)
        assert r.status == 201, await r.text()
    positions = []
    for body in (grant("G-PHARMA", commercial=True),
                 grant("G-PLAN", purpose={"code": "planning", "description": "Winter bed planning",
                                          "patient_benefit": "Fewer cancelled operations"}),
                 grant("G-RESEARCH"),
                 grant("G-EXEMPT", commercial=True, legal_basis="section-251",
                       opt_out_exemption={"basis": "s251-cag", "reference": "CAG 9-99"})):
        r = await client.post("/v1/grants", json=body, headers=dac)
        assert r.status == 201, await r.text()
        positions.append((await r.json())["position"])
    head = max(positions)

    assert await _filter(client, sde, patients, None, head) == patients  # no grant: only opt-outs apply
    assert await _filter(client, sde, patients, "G-PHARMA", head) == [research_only, other]
    assert await _filter(client, sde, patients, "G-PLAN", head) == [careful, planning_only, other]
    assert await _filter(client, sde, patients, "G-RESEARCH", head) == [careful, research_only, other]
    assert await _filter(client, sde, patients, "G-EXEMPT", head) == patients  # an exemption sets choices aside

    # The data-use check applies the same rule: a commercial use that includes the patient is refused...
    r = await client.post("/v1/data-uses", json=data_use("u-1", "G-PHARMA", nhs_numbers=[careful, other]),
                          headers=sde)
    problem = await r.json()
    assert r.status == 422 and problem["type"].endswith("finer-choice-in-cohort"), problem
    assert problem["detail"].startswith("1 patient(s) in the cohort chose")
    # ... until the patient consents to that project, which is their own, more specific choice.
    r = await client.post(f"/v1/patients/{careful}/consents", json={"grant_id": "G-PHARMA", "actor": {"kind": "patient"}},
                          headers=app)
    assert r.status == 201
    r = await client.post("/v1/data-uses", json=data_use("u-2", "G-PHARMA", nhs_numbers=[careful, other],
                                                          opt_out_state_position=(await r.json())["position"]),
                          headers=sde)
    assert r.status == 201, await r.text()

    # Withdrawing the choice (opt-in of that scope) lifts it.
    r = await client.post(f"/v1/patients/{research_only}/opt-in", json=choice(scope="non-research"), headers=app)
    assert r.status == 201
    assert await _filter(client, sde, patients, "G-PLAN", (await r.json())["position"]) == patients[:3] + [other]


async def test_finer_choices_show_in_choices_history_and_statistics(client: TestClient, make_token):
    app, dac, sde = (auth(make_token("patient-app")), auth(make_token("dac")),
                     auth(make_token("sde", org="SDE-NORTH")))
    nhs = nhs_numbers(1, seed=42)[0]
    mine = auth(make_token("patient-app", nhs_number=nhs))
    await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(scope="commercial"), headers=app)
    choices = await (await client.get(f"/v1/patients/{nhs}/choices", headers=mine)).json()
    assert set(choices["scopes"]) == set(values(OptOutScope))
    assert choices["scopes"]["commercial"]["state"] == "opted-out"
    assert choices["scopes"]["national"]["state"] == "not-recorded"
    r = await client.post("/v1/grants", json=grant("G-X", commercial=True, legal_basis="section-251",
                                                   opt_out_exemption={"basis": "s251-cag", "reference": "CAG 1"}),
                          headers=dac)
    r = await client.post("/v1/data-uses", json=data_use("u-x", "G-X", nhs_numbers=[nhs],
                                                          opt_out_state_position=(await r.json())["position"]),
                          headers=sde)
    assert r.status == 201, await r.text()
    use = (await r.json())["position"]
    for _ in range(100):
        page = await (await client.get(f"/v1/patients/{nhs}/history", headers=mine)).json()
        if page["as_of"] >= use:
            break
    items = page["items"]
    assert items[0]["kind"] == "data-use" and "s251" not in items[0]["opt_out"]
    assert items[0]["opt_out"].startswith("Your opt-out did not apply: section 251 approval")
    assert items[1]["summary"] == "You opted out: no commercial use"
    bundle = await (await client.get("/fhir/Consent", params={"patient": nhs}, headers=mine)).json()
    (consent,) = [e["resource"] for e in bundle["entry"]]
    assert consent["policy"][0]["uri"] == "urn:consent-ledger:choice:commercial"
    assert consent["provision"]["type"] == "deny"
    html = await (await client.post("/patient", data={"token": make_token("patient-app", nhs_number=nhs),
                                                       "nhs_number": nhs, "action": "show"})).text()
    assert "no commercial use" in html and "research only (no other use)" in html


async def test_grants_to_recipients_the_policy_never_allows_are_refused(client: TestClient, make_token):
    dac = auth(make_token("dac"))
    for category in ("insurance", "marketing"):
        body = grant(f"G-{category}", organisation={"code": "ACME", "name": "Acme", "category": category})
        r = await client.post("/v1/grants", json=body, headers=dac)
        problem = await r.json()
        assert r.status == 422 and problem["type"].endswith("recipient-not-allowed"), problem
        assert problem["errors"][0]["path"] == "$.organisation.category"
    r = await client.post("/v1/grants", json=grant("G-ok", organisation={"code": "PHARMA", "name": "Pharma",
                                                                         "category": "commercial"}), headers=dac)
    assert r.status == 201
    r = await client.post("/v1/grants", json=grant("G-bad", organisation={"code": "X", "name": "X",
                                                                          "category": "bank"}), headers=dac)
    assert r.status == 422 and "allowed: academic, charity, commercial" in (await r.json())["detail"]
    assert (await (await client.get("/v1/grants/G-insurance", headers=dac)).json())["status"] == 404

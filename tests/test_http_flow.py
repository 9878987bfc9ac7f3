"""The main journeys through HTTP: choices, grants, data uses, events."""

from __future__ import annotations

from samples import auth, choice, data_use, grant, head_position, nhs_numbers


async def test_opt_out_then_opt_in_with_receipts(client, make_token, database):
    nhs = "9434765919"
    token = make_token("patient-app")
    r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=auth(token))
    assert r.status == 201, await r.text()
    first = await r.json()
    assert first["position"] == 1 and first["event_type"] == "OptOutRegistered"
    assert len(first["leaf_hash"]) == 64 and len(first["chain_hash"]) == 64

    again = await client.post("/v1/patients/943 476 5919/opt-out", json=choice(channel="phone"), headers=auth(token))
    assert again.status == 200 and await again.json() == first

    choices = await (await client.get(f"/v1/patients/{nhs}/choices", headers=auth(token))).json()
    assert choices["scopes"]["national"]["state"] == "opted-out"
    assert choices["scopes"]["type-1"]["state"] == "not-recorded"
    assert choices["as_of"] == 1

    r = await client.post(f"/v1/patients/{nhs}/opt-in", json=choice(), headers=auth(token))
    assert r.status == 201 and (await r.json())["event_type"] == "OptOutWithdrawn"
    # 2 choices and the recorded read of the choices (reads of personal data are ledger events).
    assert await head_position(database) == 3


async def test_grant_and_data_use_refused_for_opted_out_patients(client, make_token, database):
    dac, sde = make_token("dac"), make_token("sde", org="SDE-NORTH")
    patient_app = make_token("patient-app")
    cohort = nhs_numbers(50)
    assert (await client.post("/v1/grants", json=grant(), headers=auth(dac))).status == 201
    assert (await client.post(f"/v1/patients/{cohort[7]}/opt-out", json=choice(), headers=auth(patient_app))).status == 201
    before = await head_position(database)

    r = await client.post("/v1/data-uses", json=data_use("use-1", nhs_numbers=cohort), headers=auth(sde))
    assert r.status == 422
    problem = await r.json()
    assert "1 patient(s)" in problem["detail"]
    assert cohort[7] not in await r.text()
    assert await head_position(database) == before

    allowed = [n for n in cohort if n != cohort[7]]
    r = await client.post("/v1/data-uses", json=data_use("use-1", nhs_numbers=allowed), headers=auth(sde))
    assert r.status == 201, await r.text()
    auditor = make_token("auditor")
    event = await (await client.get(f"/v1/events/{(await r.json())['position']}", headers=auth(auditor))).json()
    assert event["payload"]["cohort_size"] == 49
    assert event["payload"]["opted_out_included"] == 0


async def test_metrics_report_the_ledger_without_personal_data(client, make_token):
    nhs = "9434765919"
    token = make_token("patient-app")
    for scope in ("national", "type-1"):
        r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(scope), headers=auth(token))
        assert r.status == 201
    bad = await client.post("/v1/patients/9434765918/opt-out", json=choice(), headers=auth(token))
    assert bad.status == 422
    r = await client.get("/metrics")
    assert r.status == 200 and r.content_type == "text/plain"
    text = await r.text()
    assert "consent_ledger_head_position 2.0" in text
    assert 'consent_ledger_http_requests_total{method="POST",route="/v1/patients/{nhs}/opt-out",status="201"} 2.0' in text
    assert 'status="422"} 1.0' in text
    assert 'consent_ledger_projection_position{projection="choices"}' in text
    assert nhs not in text and "9434765918" not in text

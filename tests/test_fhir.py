"""FHIR R4 reads through the real HTTP server: every resource the service
emits validates against the R4 models (fhir.resources' R4B package, whose
Consent, AuditEvent, Bundle, CapabilityStatement and OperationOutcome are
R4's), and ties back to the ledger's own receipts."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.consent import Consent
from fhir.resources.R4B.operationoutcome import OperationOutcome
from samples import auth, choice, data_use, grant, nhs_numbers

from service.http.keys import RUNNER


FHIR = "application/fhir+json"
NHS = "9434765919"


async def fhir_get(client, path: str, token: str | None = None, **params):
    r = await client.get(path, params=params, headers=auth(token) if token else {})
    assert r.content_type == FHIR, (r.status, await r.text())
    return r.status, await r.json(), r.headers


def outcome(body: dict) -> OperationOutcome:
    return OperationOutcome.model_validate(body)


async def test_the_capability_statement_is_public_and_names_what_is_served(client):
    status, body, _ = await fhir_get(client, "/fhir/metadata")
    assert status == 200
    statement = CapabilityStatement.model_validate(body)
    assert statement.fhirVersion == "4.0.1"
    served = {r.type: [p.name for p in r.searchParam] for r in statement.rest[0].resource}
    assert served == {"Consent": ["patient"], "AuditEvent": ["patient", "_count"]}


async def test_choices_become_consents_tied_to_their_receipts(client, make_token):
    app, dac = make_token("patient-app"), make_token("dac")
    assert (await client.post("/v1/grants", json=grant(legal_basis="explicit-consent"), headers=auth(dac))).status == 201
    opt_out = await (await client.post(f"/v1/patients/{NHS}/opt-out", json=choice(), headers=auth(app))).json()
    type_1 = await (await client.post(f"/v1/patients/{NHS}/opt-out", json=choice("type-1"), headers=auth(app))).json()
    await client.post(f"/v1/patients/{NHS}/opt-in", json=choice("type-1"), headers=auth(app))
    consent = await (await client.post(f"/v1/patients/{NHS}/consents",
                                       json={"grant_id": "DARS-2026-0001", "actor": {"kind": "patient"}},
                                       headers=auth(app))).json()

    status, body, headers = await fhir_get(client, "/fhir/Consent", app, patient=NHS)
    assert status == 200 and int(headers["Ledger-Read-Recorded"]) > consent["position"]
    bundle = Bundle.model_validate(body)
    assert bundle.type == "searchset" and bundle.total == 3
    resources = {r.resource.id: Consent.model_validate(r.resource.model_dump()) for r in bundle.entry}
    national = resources[f"choice-{opt_out['position']}"]
    assert national.provision.type == "deny"
    assert national.policy[0].uri.endswith("national-data-opt-out")
    assert {i.system: i.value for i in national.identifier} == {
        "urn:consent-ledger:position": str(opt_out["position"]),
        "urn:consent-ledger:leaf-hash": opt_out["leaf_hash"],
    }
    assert national.patient.identifier.value == NHS
    # Opted back in from type 1: the current choice is a permit, from the later entry.
    type_1_now = [c for c in resources.values() if c.policy[0].uri.endswith("type-1-opt-outs")]
    assert len(type_1_now) == 1 and type_1_now[0].provision.type == "permit"
    assert int(type_1_now[0].identifier[0].value) > type_1["position"]
    study = resources[f"consent-{consent['position']}"]
    assert study.provision.type == "permit" and study.policy[0].uri == "urn:consent-ledger:grant:DARS-2026-0001"


async def test_a_patient_without_choices_has_an_empty_bundle(client, make_token):
    status, body, _ = await fhir_get(client, "/fhir/Consent", make_token("patient-app"),
                                     patient=f"https://fhir.nhs.uk/Id/nhs-number|{NHS}")
    assert status == 200 and Bundle.model_validate(body).total == 0


async def test_history_becomes_balp_audit_events_paged_with_next_links(client, make_token):
    app, dac, sde = make_token("patient-app"), make_token("dac"), make_token("sde", org="SDE-NORTH")
    cohort = nhs_numbers(5)
    patient = cohort[2]
    assert (await client.post("/v1/grants", json=grant(), headers=auth(dac))).status == 201
    r = await client.post("/v1/data-uses", json=data_use("use-1", nhs_numbers=cohort), headers=auth(sde))
    assert r.status == 201, await r.text()
    await client.post(f"/v1/patients/{patient}/opt-out", json=choice(), headers=auth(app))
    read = await client.get(f"/v1/patients/{patient}/choices", headers=auth(app))  # a recorded read by the app
    runner = client.server.app[RUNNER]
    assert await runner.wait_for(int(read.headers["Ledger-Read-Recorded"]), 20, runner.lowest_position)

    seen: list[AuditEvent] = []
    params = {"patient": patient, "_count": "1"}
    for _ in range(10):
        status, body, _ = await fhir_get(client, "/fhir/AuditEvent", app, **params)
        assert status == 200
        bundle = Bundle.model_validate(body)
        seen += [AuditEvent.model_validate(e.resource.model_dump()) for e in bundle.entry]
        following = [link.url for link in bundle.link if link.relation == "next"]
        if not following:
            break
        params = {k: v[0] for k, v in parse_qs(urlsplit(following[0]).query).items()}
    by_kind = {e.type.code: e for e in seen}
    disclosure = by_kind["110106"]
    assert disclosure.subtype[0].code == "disclose"
    assert disclosure.purposeOfEvent[0].coding[0].code == "HRESCH"
    recipient = [a for a in disclosure.agent if a.requestor][0]
    assert recipient.who.identifier.value == "SDE-NORTH"
    grant_entity = [e for e in disclosure.entity if e.what.identifier.system == "urn:consent-ledger:grant"][0]
    assert grant_entity.what.identifier.value == "DARS-2026-0001"
    assert {d.type for d in grant_entity.detail} >= {"grant", "legal-basis"}
    assert by_kind["rest"].action in ("C", "R")
    assert [e.id for e in seen] == sorted((e.id for e in seen), key=lambda i: -int(i.split("-")[1]))
    assert len(seen) == len({e.id for e in seen}) >= 3


async def test_mistakes_answer_operation_outcomes_that_say_what_to_fix(client, make_token):
    app = make_token("patient-app")
    status, body, _ = await fhir_get(client, "/fhir/Consent", app)
    assert status == 400 and "patient" in outcome(body).issue[0].diagnostics
    status, body, _ = await fhir_get(client, "/fhir/Consent", app, patient="9434765918")
    assert status == 422 and outcome(body).issue[0].code == "business-rule"
    status, body, _ = await fhir_get(client, "/fhir/Consent", app, patient=f"http://example.org/ids|{NHS}")
    assert status == 400 and "nhs-number" in outcome(body).issue[0].diagnostics
    status, body, _ = await fhir_get(client, "/fhir/AuditEvent", app, patient=NHS, _count="0")
    assert status == 400 and outcome(body).issue[0].expression == ["query._count"]
    status, body, headers = await fhir_get(client, "/fhir/Consent", None, patient=NHS)
    assert status == 401 and outcome(body).issue[0].code == "login" and "WWW-Authenticate" in headers
    status, body, _ = await fhir_get(client, "/fhir/Consent", make_token("sde", org="SDE-NORTH"), patient=NHS)
    assert status == 403 and outcome(body).issue[0].code == "forbidden"
    status, body, _ = await fhir_get(client, "/fhir/Patient", app)
    assert status == 404 and outcome(body).issue[0].code == "not-found"


async def test_a_patients_own_token_reads_only_that_patient(client, make_token):
    mine = make_token("patient-app", nhs_number=NHS)
    assert (await fhir_get(client, "/fhir/Consent", mine, patient=NHS))[0] == 200
    status, body, _ = await fhir_get(client, "/fhir/AuditEvent", mine, patient=nhs_numbers(1)[0])
    assert status == 403 and outcome(body).issue[0].code == "forbidden"

"""Importing an earlier register's choices as FHIR R4 Consent resources:
through HTTP (a Bundle, whole or nothing) and the CLI (NDJSON, checked whole
first), never overriding a later choice, safe to run again."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import app_config
from samples import auth, choice, grant, head_position, nhs_numbers

from service.http.app import create_app
from service.http.keys import RUNNER
from service.store.database import Database

FHIR = "application/fhir+json"
A, B, C = nhs_numbers(3, seed=1515)


@pytest.fixture
async def other_client(new_database, verifier) -> AsyncIterator[TestClient]:
    """A second, fresh ledger: where the register is migrated to."""
    database = await new_database()
    async with TestClient(TestServer(create_app(app_config(pool_size=4), database, verifier),
                                     host="127.0.0.1")) as c:
        c.database = database  # type: ignore[attr-defined]
        yield c


def consent(nhs: str, policy: str, decision: str, rid: str, **extra) -> dict:
    return {"resourceType": "Consent", "id": rid, "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "patient": {"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}},
            "dateTime": "2021-06-01T09:30:00Z", "policy": [{"uri": policy}], "provision": {"type": decision},
            **extra}


NATIONAL = "https://digital.nhs.uk/services/national-data-opt-out"
TYPE_1 = "https://digital.nhs.uk/services/national-data-opt-out/type-1-opt-outs"


def bundle(*resources: dict, source: str | None = "legacy-register") -> dict:
    return {"resourceType": "Bundle", "type": "transaction", **({"meta": {"source": source}} if source else {}),
            "entry": [{"resource": r, "request": {"method": "POST", "url": "Consent"}} for r in resources]}


async def post_bundle(client, token: str, body, content_type: str = FHIR):
    r = await client.post("/fhir/Bundle", data=json.dumps(body) if not isinstance(body, bytes) else body,
                          headers={**auth(token), "Content-Type": content_type})
    return r.status, await r.json(content_type=None)


async def choices_of(client, token: str, nhs: str) -> dict:
    body = await (await client.get(f"/v1/patients/{nhs}/choices", headers=auth(token))).json()
    return {"scopes": {k: v["state"] for k, v in body["scopes"].items()},
            "consents": sorted(c["grant_id"] for c in body["consents"])}


async def test_choices_read_as_consent_import_into_a_fresh_ledger_as_the_same_choices(client, other_client,
                                                                                      make_token):
    app, dac, auditor = make_token("patient-app"), make_token("dac"), make_token("auditor")
    for ledger in (client, other_client):
        assert (await ledger.post("/v1/grants", json=grant(), headers=auth(dac))).status == 201
    await client.post(f"/v1/patients/{A}/opt-out", json=choice(), headers=auth(app))
    await client.post(f"/v1/patients/{B}/opt-out", json=choice("type-1"), headers=auth(app))
    await client.post(f"/v1/patients/{B}/opt-out", json=choice(), headers=auth(app))
    await client.post(f"/v1/patients/{B}/opt-in", json=choice(), headers=auth(app))
    await client.post(f"/v1/patients/{C}/consents", json={"grant_id": "DARS-2026-0001", "actor": {"kind": "patient"}},
                      headers=auth(app))
    exported = []
    for nhs in (A, B, C):
        body = await (await client.get("/fhir/Consent", params={"patient": nhs}, headers=auth(app))).json()
        exported += [e["resource"] for e in body["entry"]]

    status, answer = await post_bundle(other_client, dac, bundle(*exported, source="register-A"))
    assert status == 200, answer
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created"] * len(exported)
    for nhs in (A, B, C):
        assert await choices_of(other_client, app, nhs) == await choices_of(client, app, nhs)
    position = int(answer["entry"][0]["response"]["location"].rsplit("/", 1)[1])
    entry = await (await other_client.get(f"/v1/events/{position}", headers=auth(auditor))).json()
    assert entry["payload"]["channel"] == "import"
    assert entry["payload"]["imported"]["source"] == "register-A"
    assert entry["payload"]["imported"]["resource_id"] == exported[0]["id"]
    assert entry["payload"]["imported"]["dated"].startswith(exported[0]["dateTime"][:19])
    assert entry["recorded_at"] != entry["payload"]["imported"]["dated"]  # the log is never backdated
    runner = other_client.server.app[RUNNER]
    assert await runner.wait_for(await head_position(other_client.database), 20, runner.lowest_position)
    history = await (await other_client.get(f"/v1/patients/{A}/history", headers=auth(app))).json()
    (opt_out,) = [i for i in history["items"] if i["kind"] == "choice"]
    assert opt_out["channel"] == "import" and "carried over" in opt_out["summary"]

    # The same bundle again writes nothing.
    head = await head_position(other_client.database)
    status, answer = await post_bundle(other_client, dac, bundle(*exported, source="register-A"))
    assert status == 200 and {e["response"]["status"] for e in answer["entry"]} == {"200 OK"}
    assert await head_position(other_client.database) == head


async def test_an_import_never_overrides_a_choice_the_ledger_already_holds(client, make_token):
    app, dac = make_token("patient-app"), make_token("dac")
    await client.post(f"/v1/patients/{A}/opt-in", json=choice(), headers=auth(app))  # opted back in here
    status, answer = await post_bundle(client, dac, bundle(consent(A, NATIONAL, "deny", "old-1"),
                                                           consent(B, TYPE_1, "deny", "old-2")))
    assert status == 200
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK", "201 Created"]
    assert (await choices_of(client, app, A))["scopes"]["national"] == "opted-in"
    assert (await choices_of(client, app, B))["scopes"]["type-1"] == "opted-out"


@pytest.mark.parametrize(("resources", "path", "words"), [
    ([consent(A, NATIONAL, "deny", "r1"), {"resourceType": "Patient", "id": "p"}],
     "entry[1].resource.resourceType", "only Consent"),
    ([consent(A, "https://example.org/some-policy", "deny", "r1")], "entry[0].resource.policy", "unknown policy"),
    ([consent("9434765918", NATIONAL, "deny", "r1")], "entry[0].resource.patient.identifier.value", "check digit"),
    ([consent(A, NATIONAL, "deny", "r1"), consent(B, NATIONAL, "deny", "r1")], "entry[1].resource.id", "same"),
    ([consent(A, NATIONAL, "deny", "r1", status="inactive")], "entry[0].resource.status", "only active"),
    ([consent(A, NATIONAL, "deny", "r1", dateTime="2021-06-01")], "entry[0].resource.dateTime", "offset"),
    ([consent(A, "urn:consent-ledger:grant:NO-SUCH", "permit", "r1")], None, "no grant"),
])
async def test_a_bad_resource_is_named_by_its_index_and_nothing_of_its_bundle_is_written(
        client, database, make_token, resources, path, words):
    head = await head_position(database)
    status, outcome = await post_bundle(client, make_token("dac"), bundle(consent(C, NATIONAL, "deny", "ok"),
                                                                          *resources))
    assert status == 422 and outcome["resourceType"] == "OperationOutcome", outcome
    issues = outcome["issue"]
    assert any(words in i["diagnostics"] for i in issues), issues
    if path is not None:
        shifted = path.replace(f"entry[{path[6]}]", f"entry[{int(path[6]) + 1}]")  # after the good first entry
        assert [i["expression"] for i in issues if words in i["diagnostics"]] == [[shifted]]
    assert await head_position(database) == head


async def test_the_import_says_what_is_wrong_with_the_request_itself(client, database, make_token):
    dac = make_token("dac")
    assert (await post_bundle(client, dac, bundle(consent(A, NATIONAL, "deny", "r"), source=None)))[0] == 422
    status, outcome = await post_bundle(client, dac, b"not json")
    assert status == 422 and outcome["resourceType"] == "OperationOutcome"
    status, outcome = await post_bundle(client, dac, {"resourceType": "Bundle", "type": "searchset"})
    assert status == 422
    status, outcome = await post_bundle(client, dac, bundle(consent(A, NATIONAL, "deny", "r")), "text/plain")
    assert status == 415 and outcome["issue"][0]["code"] == "not-supported"
    for role in ("patient-app", "sde", "auditor"):
        token = make_token(role, org="SDE-NORTH") if role == "sde" else make_token(role)
        status, outcome = await post_bundle(client, token, bundle(consent(A, NATIONAL, "deny", "r")))
        assert status == 403 and outcome["issue"][0]["code"] == "forbidden"
    assert await head_position(database) == 0


async def run_cli(*args: str, database: Database, data_dir) -> tuple[int, str]:
    env = {**os.environ, "DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_DATA_DIR": str(data_dir),
           "CONSENT_LEDGER_LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "service.cli.main", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode() + err.decode()


async def test_the_command_line_import_checks_the_whole_file_first_and_can_run_again(database, tmp_path):
    lines = [consent(n, NATIONAL, "deny", f"r{i}") for i, n in enumerate(nhs_numbers(5, seed=77))]
    bad = tmp_path / "bad.ndjson"
    again = consent(lines[0]["patient"]["identifier"]["value"], NATIONAL, "permit", "r-later")
    bad.write_text("\n".join(json.dumps(r) for r in lines[:3]) + "\n" +
                   json.dumps(consent("9434765918", NATIONAL, "deny", "x")) + "\n{oops\n" + json.dumps(again) + "\n")
    code, out = await run_cli("import-fhir", str(bad), "--source", "legacy", database=database, data_dir=tmp_path)
    assert code == 2 and "nothing imported, 3 mistake(s)" in out and "line 4: " in out and "line 5: " in out, out
    assert "line 6: a second record for the same patient and scope as line 1" in out, out
    assert await head_position(database) == 0

    good = tmp_path / "good.ndjson"
    good.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    code, out = await run_cli("import-fhir", str(good), "--source", "legacy", "--batch", "2",
                              database=database, data_dir=tmp_path)
    assert code == 0 and "5 written" in out, out
    assert await head_position(database) == 5
    code, out = await run_cli("import-fhir", str(good), "--source", "legacy", database=database, data_dir=tmp_path)
    assert code == 0 and "0 written" in out and "5 already covered" in out, out
    assert await head_position(database) == 5

"""Issue 8, through the real HTTP server and the CLI: the filter applies the
grant, decisions come from the ledger's entries (not from a table the
service role can rewrite), data uses are judged when they occur, and
`consent-ledger verify --decisions` catches a false claim."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import msgspec
import numpy as np
from aiohttp.test_utils import TestClient, TestServer

from contracts import cohort as cohorts
from contracts.entry import chain_hash, decode_entry, encode_entry, format_recorded_at, leaf_hash
from contracts.events import AccessGranted, DataUseRecorded
from samples import auth, choice, data_use, grant, head_position, nhs_numbers
from conftest import app_config
from service.store import tiles
from service.domain.aggregates import data_use_aggregate_id, grant_aggregate_id
from service.http.keys import CHECKPOINTS
from service.http.app import create_app
from service.store.event_log import NewEvent
from test_audit_client import cli
from test_http_rules import refused, written

DAC = "dac"


def iso(delta: timedelta = timedelta(0)) -> str:
    return (datetime.now(timezone.utc) + delta).isoformat()


async def entry_at(database, position: int):
    conn = await database.connect_owner()
    try:
        return decode_entry(bytes(await conn.fetchval("SELECT entry FROM ledger_events WHERE position = $1", position)))
    finally:
        await conn.close()


async def filtered(client, token: str, numbers: list[str], query: str = "") -> dict:
    r = await client.post(f"/v1/opt-out-filter{query}", json={"nhs_numbers": numbers}, headers=auth(token))
    assert r.status == 200, await r.text()
    return await r.json()


async def test_the_filter_applies_the_grant_and_every_call_is_recorded(client, database, make_token):
    dac, app = auth(make_token(DAC)), auth(make_token("patient-app"))
    north, south = make_token("sde", org="SDE-NORTH"), make_token("sde", org="SDE-SOUTH")
    a, b, c = nhs_numbers(3, seed=81)
    await written(client, "POST", "/v1/grants", json=grant("G-N"), headers=dac)
    await written(client, "POST", "/v1/grants", json=grant("G-GONE"), headers=dac)
    await written(client, "POST", "/v1/grants", headers=dac, json=grant(
        "G-LATER", valid_from=iso(timedelta(days=10)), valid_until=iso(timedelta(days=20))))
    await written(client, "POST", "/v1/grants/G-GONE/revoke", json={"reason": "ended"}, headers=dac)
    await written(client, "POST", f"/v1/patients/{a}/opt-out", json=choice(), headers=app)
    consent = await written(client, "POST", f"/v1/patients/{a}/consents", headers=app,
                            json={"grant_id": "G-N", "actor": {"kind": "patient"}})
    at = f"min_position={consent['position']}"

    # Another organisation's SDE learns nothing under G-N (it would learn who consented).
    for query in (f"?grant_id=G-N&{at}", f"?grant_id=G-N&purpose=research&{at}"):
        problem = await refused(client, database, "POST", f"/v1/opt-out-filter{query}", 403,
                                json={"nhs_numbers": [a, b]}, headers=auth(south))
        assert "another organisation" in problem["detail"]
    for path in ("/v1/opt-out-filter", "/v1/cohorts"):  # an sde token without `org`
        problem = await refused(client, database, "POST", path, 403, json={"nhs_numbers": [a]} if "filter" in path
                                else [a], headers=auth(make_token("sde")))
        assert "`org` claim" in problem["detail"]
    for grant_id, slug in (("G-GONE", "grant-revoked"), ("G-LATER", "grant-not-yet-valid")):
        problem = await refused(client, database, "POST", f"/v1/opt-out-filter?grant_id={grant_id}", 422,
                                json={"nhs_numbers": [a, b]}, headers=auth(north))
        assert problem["type"].endswith(slug)
    problem = await refused(client, database, "POST", "/v1/opt-out-filter?grant_id=G-N&purpose=planning", 422,
                            json={"nhs_numbers": [a]}, headers=auth(north))
    assert problem["type"].endswith("purpose-outside-grant")
    problem = await refused(client, database, "POST", "/v1/opt-out-filter?purpose=research", 422,
                            json={"nhs_numbers": [a]}, headers=auth(north))
    assert problem["type"].endswith("purpose-without-grant")

    # The owner's call: the consenting patient is kept, and the call is in the ledger.
    sent = [a, b, c, b]
    before = await head_position(database)
    r = await client.post(f"/v1/opt-out-filter?grant_id=G-N&purpose=research&{at}", data="\n".join(sent),
                          headers={**auth(north), "Content-Type": "text/plain"})
    assert r.status == 200 and (await r.text()).split() == sent
    position = int(r.headers["Ledger-Read-Recorded"])
    assert position == before + 1
    recorded = await entry_at(database, position)
    assert recorded.event_type == "OptOutFilterApplied"
    p = recorded.payload
    stems = np.array([int(n[:9]) for n in sent], dtype="<u4")
    assert (p.recorded_by, p.organisation_code, p.grant_id, p.purpose) == ("test-sde", "SDE-NORTH", "G-N", "research")
    assert (p.submitted, p.removed, p.as_of) == (4, 0, int(r.headers["Ledger-As-Of"]))
    assert p.cohort_sha256 == hashlib.sha256(stems.tobytes()).hexdigest()
    assert not any(n in json.dumps(recorded.payload, default=str) for n in sent)
    # Without a grant only opt-outs apply: the opted-out patient is removed.
    body = await filtered(client, north, sent)
    assert body["nhs_numbers"] == [b, c, b] and body["removed"] == 1


async def test_an_explicit_consent_grant_takes_only_patients_who_consented(client, database, make_token):
    dac, app, sde = auth(make_token(DAC)), auth(make_token("patient-app")), make_token("sde", org="SDE-NORTH")
    consenting, silent = nhs_numbers(2, seed=82)
    await written(client, "POST", "/v1/grants", json=grant("G-CONSENT", legal_basis="explicit-consent"), headers=dac)
    given = await written(client, "POST", f"/v1/patients/{consenting}/consents", headers=app,
                          json={"grant_id": "G-CONSENT", "actor": {"kind": "patient"}})
    body = await filtered(client, sde, [consenting, silent], f"?grant_id=G-CONSENT&min_position={given['position']}")
    assert body["nhs_numbers"] == [consenting] and body["removed"] == 1
    problem = await refused(client, database, "POST", "/v1/data-uses", 422, headers=auth(sde),
                            json=data_use("u-all", "G-CONSENT", nhs_numbers=[consenting, silent]))
    assert problem["type"].endswith("consent-missing") and "1 patient(s)" in problem["detail"]
    receipt = await written(client, "POST", "/v1/data-uses", headers=auth(sde),
                            json=data_use("u-one", "G-CONSENT", nhs_numbers=[consenting]))
    page = await history(client, make_token, consenting, receipt["position"])
    use = page["items"][0]
    assert use["kind"] == "data-use" and use["consent_applied"] is True
    assert use["opt_out"] == "You consented to this project, so your data was included."


async def history(client, make_token, nhs: str, position: int) -> dict:
    own = auth(make_token("patient-app", nhs_number=nhs))
    for _ in range(200):
        page = await (await client.get(f"/v1/patients/{nhs}/history", headers=own)).json()
        if page["as_of"] >= position:
            return page
        await asyncio.sleep(0.05)
    raise AssertionError("the history did not catch up")


async def test_a_data_use_is_judged_when_it_occurred(client, database, make_token):
    """An opt-out in force when the use occurred, withdrawn before it is
    reported, still keeps the patient out; one recorded after the use does not
    retroactively refuse it.  The history tells each patient what held then."""
    dac, app, sde = auth(make_token(DAC)), auth(make_token("patient-app")), auth(make_token("sde", org="SDE-NORTH"))
    was_out, later_out, other = nhs_numbers(3, seed=83)
    await written(client, "POST", "/v1/grants", json=grant(), headers=dac)
    await written(client, "POST", f"/v1/patients/{was_out}/opt-out", json=choice(), headers=app)
    await asyncio.sleep(0.01)
    during = iso()
    await asyncio.sleep(0.01)
    await written(client, "POST", f"/v1/patients/{was_out}/opt-in", json=choice(), headers=app)
    await written(client, "POST", f"/v1/patients/{later_out}/opt-out", json=choice(), headers=app)

    problem = await refused(client, database, "POST", "/v1/data-uses", 422, headers=sde,
                            json=data_use("u-then", occurred_at=during, nhs_numbers=[was_out, other]))
    assert problem["type"].endswith("opted-out-patients-in-cohort") and "1 patient(s)" in problem["detail"]
    receipt = await written(client, "POST", "/v1/data-uses", headers=sde,
                            json=data_use("u-then", occurred_at=during, nhs_numbers=[later_out, other]))
    payload = (await entry_at(database, receipt["position"])).payload
    assert payload.opted_out_included == 0 and payload.opt_out_state_position < receipt["position"] - 2
    page = await history(client, make_token, later_out, receipt["position"])
    use = next(i for i in page["items"] if i["kind"] == "data-use")
    assert use["opt_out"] == "You had no opt-out in force at that time."

    # Dates: not in the future, not before the grant was recorded, no 500 near year 1 or 9999.
    for occurred, slug in ((iso(timedelta(hours=1)), "invalid-dates"), (iso(-timedelta(hours=1)), "invalid-dates")):
        problem = await refused(client, database, "POST", "/v1/data-uses", 422, headers=sde,
                                json=data_use("u-bad", occurred_at=occurred, nhs_numbers=[other]))
        assert problem["type"].endswith(slug), problem
    for moment in ("0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"):
        await refused(client, database, "POST", "/v1/data-uses", 422, headers=sde,
                      json=data_use("u-bad", occurred_at=moment, nhs_numbers=[other]))
        await refused(client, database, "POST", "/v1/grants", 422, headers=dac,
                      json=grant("G-ODD", valid_from=moment))
    for overrides in ({"valid_from": "1990-01-01T00:00:00Z"}, {"valid_until": "9999-01-01T00:00:00Z"},
                      {"opt_out_exemption": {"basis": "s251-cag", "reference": "CAG 1\r\nX-Evil: 1"}},
                      {"organisation": {"code": "SDE-NORTH", "name": "North\nSDE"}}):
        await refused(client, database, "POST", "/v1/grants", 422, headers=dac, json=grant("G-ODD", **overrides))


async def test_cohorts_and_use_ids_belong_to_their_organisation(client, database, make_token):
    dac, app = auth(make_token(DAC)), auth(make_token("patient-app"))
    north, south = auth(make_token("sde", org="SDE-NORTH")), auth(make_token("sde", org="SDE-SOUTH"))
    await written(client, "POST", "/v1/grants", json=grant("G-N"), headers=dac)
    await written(client, "POST", "/v1/grants", json=grant("G-S", org="SDE-SOUTH"), headers=dac)
    numbers = nhs_numbers(6, seed=84)
    await written(client, "POST", f"/v1/patients/{numbers[0]}/opt-out", json=choice(), headers=app)
    before = await head_position(database)
    stored = await written(client, "POST", "/v1/cohorts", json=numbers, headers=north)
    event = await entry_at(database, before + 1)
    assert event.event_type == "CohortStored"
    assert (event.payload.cohort_id, event.payload.organisation_code, event.payload.recorded_by) == (
        stored["cohort_id"], "SDE-NORTH", "test-sde")
    # South never stored it: the same refusal as for a cohort nobody stored, and no opt-out count.
    foreign = await refused(client, database, "POST", "/v1/data-uses", 422, headers=south,
                            json=data_use("u-1", "G-S", cohort_id=stored["cohort_id"]))
    missing = await refused(client, database, "POST", "/v1/data-uses", 422, headers=south,
                            json=data_use("u-1", "G-S", cohort_id="0" * 64))
    assert foreign["type"] == missing["type"] and "opt-out" not in foreign["detail"]
    assert (await refused(client, database, "POST", "/v1/data-uses", 422, headers=north,
                          json=data_use("u-1", "G-N", cohort_id=stored["cohort_id"])))["type"].endswith(
        "opted-out-patients-in-cohort")
    # One organisation's use_id neither collides with nor reveals another's.
    await written(client, "POST", "/v1/data-uses", headers=north, json=data_use("u-1", "G-N", nhs_numbers=numbers[1:3]))
    await written(client, "POST", "/v1/data-uses", headers=south, json=data_use("u-1", "G-S", nhs_numbers=numbers[3:]))
    await refused(client, database, "POST", "/v1/data-uses", 409, headers=north,
                  json=data_use("u-1", "G-N", nhs_numbers=numbers[1:2]))
    # A token with sde and another role still gets the sde organisation rule on grants.
    mixed = auth(make_token(None, org="SDE-SOUTH", roles=["sde", "patient-app"]))
    await refused(client, database, "GET", "/v1/grants/G-N", 403, headers=mixed)
    assert (await client.get("/v1/grants/G-S", headers=mixed)).status == 200
    assert (await client.get("/v1/grants/G-N", headers=auth(make_token(None, roles=["sde", "dac"])))).status == 200


async def test_a_withdrawal_by_a_proxy_keeps_who_made_it(client, database, make_token):
    app = auth(make_token("patient-app"))
    nhs = nhs_numbers(1, seed=85)[0]
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(make_token(DAC)))
    proxy = {"kind": "proxy", "proxy_role": "lasting-power-of-attorney", "id": "LPA-77"}
    await written(client, "POST", f"/v1/patients/{nhs}/consents", headers=app,
                  json={"grant_id": "DARS-2026-0001", "actor": proxy})
    await refused(client, database, "DELETE", f"/v1/patients/{nhs}/consents/DARS-2026-0001", 422, headers=app,
                  json={"actor": {"kind": "proxy"}})
    receipt = await written(client, "DELETE", f"/v1/patients/{nhs}/consents/DARS-2026-0001", headers=app,
                            json={"actor": proxy})
    assert (await entry_at(database, receipt["position"])).payload.actor.proxy_role == "lasting-power-of-attorney"


async def test_decisions_survive_a_rewritten_projection_and_verify_catches_a_false_claim(
        client, database, verifier, make_token, tmp_path):
    """The service role deletes the opted-out patient's projection row and the
    service restarts: the filter and the data-use check still exclude the
    patient, because they read the ledger's entries.  A false claim written
    straight into the log (as an older build reading that table would have
    written it) is named by `verify --decisions`, live and from an export."""
    dac, app = auth(make_token(DAC)), auth(make_token("patient-app"))
    sde = make_token("sde", org="SDE-NORTH")
    numbers = nhs_numbers(8, seed=86)
    out = numbers[0]
    await written(client, "POST", "/v1/grants", json=grant(), headers=dac)
    await written(client, "POST", f"/v1/patients/{out}/opt-out", json=choice(), headers=app)
    head = await head_position(database)
    await written(client, "POST", "/v1/data-uses", headers=auth(sde),
                           json=data_use("u-honest", nhs_numbers=numbers[1:], opt_out_state_position=head))

    service = await database.create_pool(min_size=1, max_size=2)  # consent_ledger_app, like the service
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while not await service.fetchval("SELECT count(*) FROM patient_choices WHERE opted_out"):
            assert asyncio.get_running_loop().time() < deadline, "the projection never caught up"
            await asyncio.sleep(0.05)
        assert await service.execute("DELETE FROM patient_choices") == "DELETE 1"
    finally:
        await service.close()
    restarted = create_app(app_config(pool_size=4), database, verifier)
    async with TestClient(TestServer(restarted, host="127.0.0.1")) as again:
        body = await filtered(again, sde, numbers)
        assert out not in body["nhs_numbers"] and body["removed"] == 1
        await refused(again, database, "POST", "/v1/data-uses", 422, headers=auth(sde),
                      json=data_use("u-leak", nhs_numbers=numbers))

    await client.server.app[CHECKPOINTS].sign()
    key = tmp_path / "log.vkey"
    key.write_text(client.server.app[CHECKPOINTS].signers[0].verifier.vkey + "\n")
    url, auditor = str(client.make_url("")).rstrip("/"), make_token("auditor")
    code, text = await cli("verify", "--url", url, "--key", str(key), "--decisions", token=auditor)
    assert code == 0 and "decisions: 1 data use(s) re-checked" in text, text

    forged_at = await forge_use(database, numbers, "u-forged")
    inflated_at = await forge_use(database, numbers[1:], "u-inflated", opted_out_included=2)
    await client.server.app[CHECKPOINTS].sign()
    code, text = await cli("verify", "--url", url, "--key", str(key), token=auditor)
    assert code == 0, text  # every hash is right: only the decision is false
    code, text = await cli("verify", "--url", url, "--key", str(key), "--decisions", token=auditor)
    assert code == 1, text
    assert f"first bad position {forged_at}: decision: data use 'u-forged': 1 member(s) of the cohort could not " \
           "be included" in text and "1 opted out excluded" in text, text
    assert f"also position {inflated_at}: claim: data use 'u-inflated': says 2 opted-out patient(s) included " \
           "(0 by consent); at position" in text, text
    assert "u-honest" not in text

    export = tmp_path / "ledger.jsonl.gz"
    code, text = await cli("export", "--url", url, "--out", str(export), token=auditor)
    assert code == 0, text
    with gzip.open(export, "rb") as f:
        lines = f.read().splitlines()
    assert json.loads(lines[0])["format"] == "consent-ledger-export/2"
    assert len([line for line in lines[1:] if line.startswith(b"{")]) == 2  # each cohort once
    code, text = await cli("verify", "--export", str(export), "--key", str(key), "--decisions")
    assert code == 1 and f"first bad position {forged_at}: decision" in text, text


async def forge_use(database, numbers: list[str], use_id: str, opted_out_included: int = 0) -> int:
    """Append, as a superuser with triggers off, a data use of ``numbers``
    stating that ``opted_out_included`` opted-out patients were included."""
    stems = cohorts.normalise([int(n[:9]) for n in numbers])
    cohort_id = cohorts.cohort_id(stems)
    encoding, members = cohorts.encode_members(stems)
    conn = await database.connect_owner()
    try:
        head = await conn.fetchrow("SELECT position, chain_hash FROM ledger_head")
        position = head["position"] + 1
        payload = DataUseRecorded(
            use_id=use_id, grant_id="DARS-2026-0001", organisation_code="SDE-NORTH", purpose="research",
            legal_basis="public-task-research", datasets=["hes-apc"], cohort_id=cohort_id, cohort_size=len(stems),
            occurred_at=datetime.now(timezone.utc), access_method="extract", opt_out_state_position=head["position"],
            opted_out_included=opted_out_included, consented_included=0, recorded_by="older-build")
        now = datetime.now(timezone.utc)
        entry = encode_entry(position=position, event_id=uuid4(), event_type="DataUseRecorded",
                             aggregate_id=data_use_aggregate_id("SDE-NORTH", use_id), aggregate_version=1,
                             recorded_at=format_recorded_at(now), payload=payload)
        leaf = leaf_hash(entry)
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "INSERT INTO ledger_events (position, event_id, event_type, aggregate_id, aggregate_version,"
            " recorded_at, entry, leaf_hash, chain_hash) VALUES ($1, $2, 'DataUseRecorded', $3, 1, $4, $5, $6, $7)",
            position, uuid4(), data_use_aggregate_id("SDE-NORTH", use_id), now, entry, leaf,
            chain_hash(bytes(head["chain_hash"]), leaf))
        await conn.execute("INSERT INTO cohorts VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                           bytes.fromhex(cohort_id), len(stems), encoding, members)
        await tiles.extend(conn, position - 1, position)
        await conn.execute("UPDATE ledger_head SET position = $1, chain_hash = $2", position,
                           chain_hash(bytes(head["chain_hash"]), leaf))
    finally:
        await conn.close()
    return position



async def test_a_grant_recorded_with_a_line_break_does_not_break_filter_answers(client, app_store, make_token):
    """Requests can no longer carry control characters; a grant an older build
    recorded with one still gets a well-formed header."""
    body = grant("G-OLD", opt_out_exemption={"basis": "s251-cag", "reference": "CAG 1\r\nX-Evil: 1"})
    payload = msgspec.convert({**body, "recorded_by": "older-build"}, AccessGranted)
    receipt = (await app_store.append([NewEvent(uuid4(), "AccessGranted", grant_aggregate_id("G-OLD"), 1,
                                                payload)])).receipts[0]
    r = await client.post(f"/v1/opt-out-filter?grant_id=G-OLD&min_position={receipt.position}",
                          data=nhs_numbers(1, seed=87)[0], headers={**auth(make_token("sde", org="SDE-NORTH")),
                                                                    "Content-Type": "text/plain"})
    assert r.status == 200 and r.headers["Ledger-Exemption"] == "s251-cag; reference=CAG 1  X-Evil: 1"
    assert "X-Evil" not in r.headers

"""Every domain rule and unhappy path through HTTP on loopback.

Each refusal is checked the same way: an RFC 9457 problem with the right
status, and the ledger head exactly where it was (nothing written).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from contracts.api import SMALL_BODY
from samples import auth, choice, data_use, grant, head_position, nhs_numbers

NHS = "9434765919"
PROBLEM_FIELDS = {"type", "title", "status", "detail"}


async def refused(client, database, method: str, path: str, status: int, **kwargs: Any) -> dict[str, Any]:
    before = await head_position(database)
    r = await client.request(method, path, **kwargs)
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/problem+json", (r.content_type, text)
    problem = json.loads(text)
    assert PROBLEM_FIELDS <= problem.keys(), problem
    assert problem["status"] == status
    assert all(isinstance(problem[k], str) and problem[k] for k in ("type", "title", "detail"))
    assert await head_position(database) == before, "a refused request wrote to the ledger"
    return problem


async def written(client, method: str, path: str, status: int = 201, **kwargs: Any) -> dict[str, Any]:
    r = await client.request(method, path, **kwargs)
    assert r.status == status, await r.text()
    return await r.json()


@pytest.fixture
def tokens(make_token):
    return {
        "app": make_token("patient-app"),
        "dac": make_token("dac"),
        "sde": make_token("sde", org="SDE-NORTH"),
        "other_sde": make_token("sde", org="SDE-SOUTH"),
        "sde_no_org": make_token("sde"),
        "auditor": make_token("auditor"),
    }


def iso(delta: timedelta) -> str:
    return (datetime.now(timezone.utc) + delta).isoformat()


# --- input shape ---------------------------------------------------------------


async def test_wrong_check_digit_in_path(client, database, tokens):
    problem = await refused(client, database, "POST", "/v1/patients/9434765918/opt-out", 422,
                            json=choice(), headers=auth(tokens["app"]))
    assert problem["errors"][0]["path"] == "path.nhs"
    await refused(client, database, "GET", "/v1/patients/943476591X/choices", 422, headers=auth(tokens["app"]))


async def test_wrong_check_digit_in_body(client, database, tokens):
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    problem = await refused(client, database, "POST", "/v1/data-uses", 422,
                            json=data_use("u1", nhs_numbers=[NHS, "9434765918"]), headers=auth(tokens["sde"]))
    assert "nhs_numbers[1]" in problem["errors"][0]["path"]


# Each group of cases shares one database: they must all leave it untouched.
BAD_CHOICES = [
    {"channel": "app", "actor": {"kind": "patient"}},  # missing scope
    {"scope": "national", "actor": {"kind": "patient"}},  # missing channel
    choice(colour="blue"),  # extra field
    choice(actor={"kind": "patient", "shoe_size": 9}),  # extra nested field
    choice(scope=1),  # wrong type
    choice(actor="patient"),
    choice(scope="regional"),  # unknown codes
    choice(channel="fax"),
    choice(actor={"kind": "robot"}),
    choice(actor={"kind": "proxy", "proxy_role": "friend"}),
    choice(actor={"kind": "proxy"}),  # proxy without a role
    choice(actor={"kind": "patient", "proxy_role": "parent"}),
    [choice()],  # an array, not an object
    None,
]


async def test_choice_bodies_that_break_the_schema(client, database, tokens):
    for body in BAD_CHOICES:
        problem = await refused(client, database, "POST", f"/v1/patients/{NHS}/opt-out", 422, data=json.dumps(body),
                                headers=auth(tokens["app"], **{"Content-Type": "application/json"}))
        assert problem["errors"], (body, problem)


BAD_GRANTS = [
    {"purpose": {"code": "marketing", "description": "d", "patient_benefit": "b"}},
    {"legal_basis": "vibes"},
    {"commercial": "no"},
    {"datasets": []},
    {"datasets": ["hes-apc", "hes-apc"]},
    {"grant_id": "G1\n"},
    {"grant_id": "has space"},
    {"valid_from": "yesterday"},
    {"valid_from": "2026-01-01T00:00:00"},  # no offset
    {"opt_out_exemption": {"basis": "because", "reference": "x"}},
]


async def test_grant_bodies_that_break_the_schema(client, database, tokens):
    for overrides in BAD_GRANTS:
        await refused(client, database, "POST", "/v1/grants", 422, json=grant(**overrides),
                      headers=auth(tokens["dac"]))


BAD_DATA_USES = [
    {"purpose": "marketing"},
    {"access_method": "email"},
    {"nhs_numbers": []},
    {},  # neither cohort_id nor nhs_numbers
    {"nhs_numbers": [NHS], "cohort_id": "a" * 64},  # both
    {"nhs_numbers": [9434765919]},
    {"nhs_numbers": ["٩٤٣٤٧٦٥٩١٩"]},
]


async def test_data_use_bodies_that_break_the_schema(client, database, tokens):
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    for overrides in BAD_DATA_USES:
        await refused(client, database, "POST", "/v1/data-uses", 422,
                      json=data_use("u1", **overrides), headers=auth(tokens["sde"]))


MALFORMED = [
    (b'{"scope": "national",', "malformed-json"),
    (b"\xff\xfe{}", "malformed-json"),
    (b"", "malformed-json"),
    (b'{"scope": "national", "scope": "type-1", "channel": "app", "actor": {"kind": "patient"}}', "duplicate-key"),
    (b'{"scope": "national", "channel": "app", "actor": {"kind": "patient", "kind": "proxy"}}', "duplicate-key"),
]


async def test_malformed_json_is_400(client, database, tokens):
    for raw, slug in MALFORMED:
        problem = await refused(client, database, "POST", f"/v1/patients/{NHS}/opt-out", 400, data=raw,
                                headers=auth(tokens["app"], **{"Content-Type": "application/json"}))
        assert problem["type"].endswith(slug), (raw, problem)


async def test_hostile_json_is_refused_not_a_server_error(client, database, tokens):
    for raw in (
        b'{"scope": ' + b"1" * 5000 + b"}",
        b'{"scope": "national", "channel": "app", "actor": {"kind": "patient"}, "x": ' + b"1" * 5000 + b"}",
        b"[" * 5000 + b"]" * 5000,
    ):
        await refused(client, database, "POST", f"/v1/patients/{NHS}/opt-out", 422, data=raw,
                      headers=auth(tokens["app"], **{"Content-Type": "application/json"}))


async def test_oversized_body_is_413(client, database, tokens):
    body = json.dumps(choice(actor={"kind": "patient", "id": "x" * SMALL_BODY})).encode()
    assert len(body) > SMALL_BODY
    headers = auth(tokens["app"], **{"Content-Type": "application/json"})
    await refused(client, database, "POST", f"/v1/patients/{NHS}/opt-out", 413, data=body, headers=headers)

    async def chunked():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    await refused(client, database, "POST", f"/v1/patients/{NHS}/opt-out", 413, data=chunked(), headers=headers)


async def test_bulk_endpoint_takes_more_than_the_small_limit(client, database, tokens):
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    cohort = nhs_numbers(6000)
    body = json.dumps(data_use("big", nhs_numbers=cohort)).encode()
    assert len(body) > SMALL_BODY
    r = await client.post("/v1/data-uses", data=body,
                          headers=auth(tokens["sde"], **{"Content-Type": "application/json"}))
    assert r.status == 201, await r.text()


async def test_wrong_media_type_is_415(client, database, tokens):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/problem+json", None):
        headers = auth(tokens["app"])
        if content_type:
            headers["Content-Type"] = content_type
        await refused(client, database, "POST", f"/v1/patients/{NHS}/opt-out", 415,
                      data=json.dumps(choice()).encode(), headers=headers)


async def test_unknown_route_and_wrong_method_are_problems(client, database, tokens):
    await refused(client, database, "GET", "/v1/nothing-here", 404)
    await refused(client, database, "POST", "/v1/patients", 404, headers=auth(tokens["app"]))
    r = await client.delete("/v1/grants", headers=auth(tokens["dac"]))
    assert r.status == 405 and r.content_type == "application/problem+json"
    assert "POST" in r.headers["Allow"]
    await refused(client, database, "PUT", f"/v1/patients/{NHS}/opt-out", 405, json=choice())


async def test_authentication_and_roles(client, database, tokens, make_token):
    path = f"/v1/patients/{NHS}/opt-out"
    await refused(client, database, "POST", path, 401, json=choice())
    await refused(client, database, "POST", path, 401, json=choice(), headers={"Authorization": "Basic abc"})
    await refused(client, database, "POST", path, 401, json=choice(), headers=auth("not.a.token"))
    await refused(client, database, "POST", path, 401, json=choice(), headers=auth(make_token("patient-app", aud="x")))
    await refused(client, database, "POST", path, 403, json=choice(), headers=auth(tokens["dac"]))
    own = make_token("patient-app", nhs_number="4010232137")
    await refused(client, database, "POST", path, 403, json=choice(), headers=auth(own))
    assert (await client.post("/v1/patients/4010232137/opt-out", json=choice(), headers=auth(own))).status == 201


# --- idempotency and "already in force" ----------------------------------------


async def test_idempotent_replay_and_conflict(client, database, tokens):
    headers = auth(tokens["app"], **{"Idempotency-Key": "req-1"})
    path = f"/v1/patients/{NHS}/opt-out"
    r = await client.post(path, json=choice(), headers=headers)
    assert r.status == 201 and "Idempotent-Replayed" not in r.headers
    first = await r.json()
    before = await head_position(database)
    again = await client.post(path, json=choice(), headers=headers)
    assert again.status in (200, 201) and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == first
    assert await head_position(database) == before
    problem = await refused(client, database, "POST", path, 409, json=choice(channel="phone"), headers=headers)
    assert "Idempotency" in problem["detail"]
    await refused(client, database, "POST", f"/v1/patients/{NHS}/opt-in", 409, json=choice(), headers=headers)
    await refused(client, database, "POST", path, 400, json=choice(), headers=auth(tokens["app"], **{"Idempotency-Key": "x" * 201}))


async def test_choice_already_in_force_returns_its_receipt(client, database, tokens):
    path = f"/v1/patients/{NHS}/opt-out"
    first = await written(client, "POST", path, json=choice(), headers=auth(tokens["app"]))
    assert await written(client, "POST", path, 200, json=choice(channel="post"), headers=auth(tokens["app"])) == first
    assert await head_position(database) == 1
    # Opting in when never opted out: the "opted-in" state is recorded once.
    t1 = await written(client, "POST", f"/v1/patients/{NHS}/opt-in", json=choice(scope="type-1"),
                       headers=auth(tokens["app"]))
    assert await written(client, "POST", f"/v1/patients/{NHS}/opt-in", 200, json=choice(scope="type-1"),
                         headers=auth(tokens["app"])) == t1


# --- consents ------------------------------------------------------------------------


async def test_consent_rules(client, database, tokens):
    app = auth(tokens["app"])
    consent = {"grant_id": "DARS-2026-0001", "actor": {"kind": "patient"}}
    problem = await refused(client, database, "POST", f"/v1/patients/{NHS}/consents", 422, json=consent, headers=app)
    assert problem["type"].endswith("unknown-grant")
    await refused(client, database, "DELETE", f"/v1/patients/{NHS}/consents/DARS-2026-0001", 404, headers=app)

    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    given = await written(client, "POST", f"/v1/patients/{NHS}/consents", json=consent, headers=app)
    assert await written(client, "POST", f"/v1/patients/{NHS}/consents", 200, json=consent, headers=app) == given
    withdrawn = await written(client, "DELETE", f"/v1/patients/{NHS}/consents/DARS-2026-0001", headers=app)
    assert withdrawn["event_type"] == "StudyConsentWithdrawn"
    assert await written(client, "DELETE", f"/v1/patients/{NHS}/consents/DARS-2026-0001", 200,
                         headers=app) == withdrawn

    await written(client, "POST", "/v1/grants/DARS-2026-0001/revoke", json={"reason": "ended"},
                  headers=auth(tokens["dac"]))
    problem = await refused(client, database, "POST", f"/v1/patients/{NHS}/consents", 422, json=consent, headers=app)
    assert problem["type"].endswith("grant-revoked")


# --- grants ----------------------------------------------------------------------------


GRANT_RULES = [
    ({"exclusive": True}, "exclusive-grant"),
    ({"purpose": {"code": "research", "description": "d", "patient_benefit": ""}}, "no-patient-benefit"),
    ({"purpose": {"code": "research", "description": "d", "patient_benefit": "   "}}, "no-patient-benefit"),
    ({"valid_from": "2027-01-01T00:00:00+00:00", "valid_until": "2027-01-01T00:00:00+00:00"}, "invalid-dates"),
    ({"valid_from": "2027-01-01T01:00:00+01:00", "valid_until": "2027-01-01T00:00:00Z"}, "invalid-dates"),
    ({"valid_from": "2027-06-01T00:00:00Z", "valid_until": "2027-01-01T00:00:00Z"}, "invalid-dates"),
    ({"valid_from": "2020-01-01T00:00:00Z", "valid_until": "2021-01-01T00:00:00Z"}, "invalid-dates"),
]


async def test_grant_rules(client, database, tokens):
    for overrides, slug in GRANT_RULES:
        problem = await refused(client, database, "POST", "/v1/grants", 422, json=grant(**overrides),
                                headers=auth(tokens["dac"]))
        assert problem["type"].endswith(slug), (overrides, problem)
        assert problem["errors"][0]["path"].startswith("$.")


async def test_grant_ids_are_unique_and_revocation_is_idempotent(client, database, tokens):
    dac = auth(tokens["dac"])
    await written(client, "POST", "/v1/grants", json=grant(), headers=dac)
    await refused(client, database, "POST", "/v1/grants", 409, json=grant(commercial=True), headers=dac)
    await refused(client, database, "POST", "/v1/grants/NO-SUCH/revoke", 404, json={"reason": "x"}, headers=dac)
    await refused(client, database, "POST", "/v1/grants/DARS-2026-0001/revoke", 422, json={"reason": ""}, headers=dac)
    first = await written(client, "POST", "/v1/grants/DARS-2026-0001/revoke", json={"reason": "ended"}, headers=dac)
    again = await written(client, "POST", "/v1/grants/DARS-2026-0001/revoke", 200, json={"reason": "other"},
                          headers=dac)
    assert again == first
    view = await written(client, "GET", "/v1/grants/DARS-2026-0001", 200, headers=dac)
    assert view["status"] == "revoked" and view["revoke_reason"] == "ended"
    await refused(client, database, "GET", "/v1/grants/DARS-2026-0001", 403, headers=auth(tokens["other_sde"]))
    await refused(client, database, "GET", "/v1/grants/NO-SUCH", 404, headers=dac)


# --- data uses -------------------------------------------------------------------------


async def test_data_use_needs_an_active_grant_of_the_callers_organisation(client, database, tokens):
    dac, sde = auth(tokens["dac"]), auth(tokens["sde"])
    cohort = nhs_numbers(5)
    await refused(client, database, "POST", "/v1/data-uses", 422, json=data_use("u", nhs_numbers=cohort), headers=sde)
    await written(client, "POST", "/v1/grants", json=grant(), headers=dac)
    await written(client, "POST", "/v1/grants", headers=dac, json=grant(
        "FUTURE-1", valid_from=iso(timedelta(days=10)), valid_until=iso(timedelta(days=20))))
    await written(client, "POST", "/v1/grants", json=grant("REVOKED-1"), headers=dac)
    await written(client, "POST", "/v1/grants/REVOKED-1/revoke", json={"reason": "breach"}, headers=dac)

    cases = [
        (data_use("u", "FUTURE-1", nhs_numbers=cohort), "grant-not-yet-valid"),
        (data_use("u", "REVOKED-1", nhs_numbers=cohort), "grant-revoked"),
        (data_use("u", purpose="planning", nhs_numbers=cohort), "purpose-outside-grant"),
        (data_use("u", datasets=["hes-apc", "mental-health"], nhs_numbers=cohort), "datasets-outside-grant"),
        (data_use("u", occurred_at=iso(timedelta(hours=1)), nhs_numbers=cohort), "invalid-dates"),
        (data_use("u", occurred_at=iso(-timedelta(days=2)), nhs_numbers=cohort), "invalid-dates"),
        (data_use("u", cohort_id="0" * 64), "unknown-cohort"),
    ]
    for body, slug in cases:
        problem = await refused(client, database, "POST", "/v1/data-uses", 422, json=body, headers=sde)
        assert problem["type"].endswith(slug), (slug, problem)
    # Another organisation's grant is a question of rights, not of the request: 403.
    problem = await refused(client, database, "POST", "/v1/data-uses", 403,
                            json=data_use("u", nhs_numbers=cohort), headers=auth(tokens["other_sde"]))
    assert "another organisation" in problem["detail"]
    await refused(client, database, "POST", "/v1/data-uses", 403,
                  json=data_use("u", nhs_numbers=cohort), headers=auth(tokens["sde_no_org"]))
    await refused(client, database, "POST", "/v1/data-uses", 403,
                  json=data_use("u", nhs_numbers=cohort), headers=dac)

    first = await written(client, "POST", "/v1/data-uses", json=data_use("u", nhs_numbers=cohort), headers=sde)
    await refused(client, database, "POST", "/v1/data-uses", 409, json=data_use("u", nhs_numbers=cohort[:2]),
                  headers=sde)
    assert first["event_type"] == "DataUseRecorded"


async def test_data_use_under_a_grant_that_has_just_expired(client, database, tokens):
    # A grant valid for two seconds: wait (bounded) until the service itself
    # reports it expired, then check the refusal; no assertion on the clock.
    await written(client, "POST", "/v1/grants", headers=auth(tokens["dac"]), json=grant(
        "SHORT-1", valid_from=iso(-timedelta(minutes=1)), valid_until=iso(timedelta(seconds=2))))
    occurred = iso(timedelta(0))
    for _ in range(100):
        view = await written(client, "GET", "/v1/grants/SHORT-1", 200, headers=auth(tokens["dac"]))
        if view["status"] == "expired":
            break
        await asyncio.sleep(0.1)
    assert view["status"] == "expired"
    problem = await refused(client, database, "POST", "/v1/data-uses", 422, headers=auth(tokens["sde"]),
                            json=data_use("late", "SHORT-1", occurred_at=iso(timedelta(0)), nhs_numbers=nhs_numbers(3)))
    assert problem["type"].endswith("grant-expired")
    # A use that occurred while the grant was in force, reported after it ended,
    # is judged at its `occurred_at` (issue 8): it is recorded as it happened.
    await written(client, "POST", "/v1/data-uses", headers=auth(tokens["sde"]),
                  json=data_use("in-time", "SHORT-1", occurred_at=occurred, nhs_numbers=nhs_numbers(3)))
    # An ended project no longer collects consent either; one not yet started may.
    consent = {"grant_id": "SHORT-1", "actor": {"kind": "patient"}}
    problem = await refused(client, database, "POST", f"/v1/patients/{NHS}/consents", 422, json=consent,
                            headers=auth(tokens["app"]))
    assert problem["type"].endswith("grant-expired")
    await written(client, "POST", "/v1/grants", headers=auth(tokens["dac"]), json=grant(
        "LATER-1", valid_from=iso(timedelta(days=30)), valid_until=iso(timedelta(days=400))))
    await written(client, "POST", f"/v1/patients/{NHS}/consents", headers=auth(tokens["app"]),
                  json={"grant_id": "LATER-1", "actor": {"kind": "patient"}})


async def test_data_use_cannot_claim_a_filter_position_beyond_the_head(client, database, tokens):
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    head = await head_position(database)
    problem = await refused(client, database, "POST", "/v1/data-uses", 422, headers=auth(tokens["sde"]),
                            json=data_use("u-future", nhs_numbers=nhs_numbers(3), opt_out_state_position=head + 50))
    assert problem["type"].endswith("position-in-future")
    assert problem["errors"][0]["path"] == "$.opt_out_state_position"


async def test_opted_out_patients_in_a_cohort(client, database, tokens, make_token):
    dac, sde, app = auth(tokens["dac"]), auth(tokens["sde"]), auth(tokens["app"])
    cohort = nhs_numbers(40, seed=7)
    out, consenting = cohort[3], cohort[11]
    await written(client, "POST", "/v1/grants", json=grant(), headers=dac)
    await written(client, "POST", "/v1/grants", headers=dac, json=grant(
        "S251-1", opt_out_exemption={"basis": "s251-cag", "reference": "CAG 10-02(d)/2026"}))
    await written(client, "POST", f"/v1/patients/{out}/opt-out", json=choice(), headers=app)
    await written(client, "POST", f"/v1/patients/{consenting}/opt-out", json=choice(scope="type-1"), headers=app)
    await written(client, "POST", f"/v1/patients/{consenting}/consents", headers=app,
                  json={"grant_id": "DARS-2026-0001", "actor": {"kind": "patient"}})

    r = await client.post("/v1/data-uses", json=data_use("u1", nhs_numbers=cohort), headers=sde)
    text = await r.text()
    assert r.status == 422 and r.content_type == "application/problem+json"
    assert "1 patient(s)" in json.loads(text)["detail"]
    for number in (out, consenting):
        assert number not in text and f"{number[:3]} {number[3:6]}" not in text

    # The patient who consented to this grant may be included; the other may not.
    receipt = await written(client, "POST", "/v1/data-uses", headers=sde,
                            json=data_use("u1", nhs_numbers=[n for n in cohort if n != out]))
    payload = (await written(client, "GET", f"/v1/events/{receipt['position']}", 200,
                             headers=auth(tokens["auditor"])))["payload"]
    assert payload["cohort_size"] == 39 and payload["consented_included"] == 1
    assert payload["opted_out_included"] == 1 and "exemption_applied" not in payload

    # Under the s251 exemption both opted-out patients are included and counted.
    receipt = await written(client, "POST", "/v1/data-uses", headers=sde,
                            json=data_use("u2", "S251-1", nhs_numbers=cohort))
    payload = (await written(client, "GET", f"/v1/events/{receipt['position']}", 200,
                             headers=auth(tokens["auditor"])))["payload"]
    assert payload["cohort_size"] == 40 and payload["opted_out_included"] == 2
    assert payload["exemption_applied"]["basis"] == "s251-cag"

    # After opting back in, the patient is no longer excluded.
    await written(client, "POST", f"/v1/patients/{out}/opt-in", json=choice(), headers=app)
    await written(client, "POST", "/v1/data-uses", json=data_use("u3", nhs_numbers=cohort), headers=sde)


async def test_stored_cohort_is_reused_by_id(client, database, tokens):
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    cohort = nhs_numbers(10)
    receipt = await written(client, "POST", "/v1/data-uses", json=data_use("u1", nhs_numbers=cohort),
                            headers=auth(tokens["sde"]))
    payload = (await written(client, "GET", f"/v1/events/{receipt['position']}", 200,
                             headers=auth(tokens["auditor"])))["payload"]
    again = await written(client, "POST", "/v1/data-uses", json=data_use("u2", cohort_id=payload["cohort_id"]),
                          headers=auth(tokens["sde"]))
    assert again["event_type"] == "DataUseRecorded" and again["position"] > receipt["position"]
    # A patient of that stored cohort opts out: reusing the id is now refused.
    await written(client, "POST", f"/v1/patients/{cohort[0]}/opt-out", json=choice(), headers=auth(tokens["app"]))
    await refused(client, database, "POST", "/v1/data-uses", 422, json=data_use("u3", cohort_id=payload["cohort_id"]),
                  headers=auth(tokens["sde"]))


async def test_event_reads_refuse_bad_positions(client, database, tokens):
    auditor = auth(tokens["auditor"])
    await refused(client, database, "GET", "/v1/events/1", 404, headers=auditor)
    await refused(client, database, "GET", "/v1/events/abc", 400, headers=auditor)
    await refused(client, database, "GET", "/v1/events?limit=0", 400, headers=auditor)
    await refused(client, database, "GET", "/v1/events?after=-1", 400, headers=auditor)
    await refused(client, database, "GET", "/v1/events", 403, headers=auth(tokens["app"]))
    # Only plain ASCII digits: Python's int() would also take "١", "1_0", "+1".
    await written(client, "POST", f"/v1/patients/{NHS}/opt-out", json=choice(), headers=auth(tokens["app"]))
    assert (await client.get("/v1/events/1", headers=auditor)).status == 200
    for alias in ("%D9%A1", "+1", "0_1", "%201"):
        await refused(client, database, "GET", f"/v1/events/{alias}", 400, headers=auditor)
    for query in ("limit=1_0", "limit=%D9%A1", "after=+0", "limit= 5"):
        await refused(client, database, "GET", f"/v1/events?{query}", 400, headers=auditor)


# --- racing requests --------------------------------------------------------------


async def test_racing_identical_opt_outs_record_one_event(client, database, tokens):
    responses = await asyncio.gather(*(
        client.post(f"/v1/patients/{NHS}/opt-out", json=choice(), headers=auth(tokens["app"])) for _ in range(12)
    ))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 11 + [201], statuses
    assert len({json.dumps(await r.json(), sort_keys=True) for r in responses}) == 1
    assert await head_position(database) == 1


async def test_racing_grants_with_one_id_record_one(client, database, tokens):
    responses = await asyncio.gather(*(
        client.post("/v1/grants", json=grant(approved_by=f"panel {i}"), headers=auth(tokens["dac"]))
        for i in range(8)
    ))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [409] * 7, statuses
    for r in responses:
        if r.status == 409:
            assert r.content_type == "application/problem+json"
    assert await head_position(database) == 1


async def test_racing_data_uses_with_one_id_record_one(client, database, tokens):
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    cohort = nhs_numbers(20)
    responses = await asyncio.gather(*(
        client.post("/v1/data-uses", json=data_use("same", nhs_numbers=cohort[i:]), headers=auth(tokens["sde"]))
        for i in range(6)
    ))
    assert sorted(r.status for r in responses) == [201] + [409] * 5
    assert await head_position(database) == 2


async def test_racing_retries_with_one_idempotency_key(client, database, tokens):
    headers = auth(tokens["app"], **{"Idempotency-Key": "race-1"})
    same = await asyncio.gather(*(
        client.post(f"/v1/patients/{NHS}/opt-out", json=choice(), headers=headers) for _ in range(8)
    ))
    assert all(r.status in (200, 201) for r in same)
    assert len({json.dumps(await r.json(), sort_keys=True) for r in same}) == 1
    assert await head_position(database) == 1
    others = await asyncio.gather(*(
        client.post("/v1/patients/4010232137/opt-out", json=choice(scope=scope), headers=headers)
        for scope in ("national", "type-1") * 3
    ))
    assert {r.status for r in others} == {409}
    assert await head_position(database) == 1


async def test_racing_identical_data_uses_record_one_and_answer_like_opt_outs(client, database, tokens):
    """The same data use sent twice used to be 409 while a repeated opt-out
    is 200: now a repeat of the same release answers 200 with its receipt."""
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    body = data_use("same", nhs_numbers=nhs_numbers(20))
    responses = await asyncio.gather(*(
        client.post("/v1/data-uses", json=body, headers=auth(tokens["sde"])) for _ in range(6)))
    assert sorted(r.status for r in responses) == [200] * 5 + [201]
    assert len({json.dumps(await r.json(), sort_keys=True) for r in responses}) == 1
    assert await head_position(database) == 2
    # Named by cohort_id instead of inline numbers, it is still the same release.
    cohort = await written(client, "POST", "/v1/cohorts", json=nhs_numbers(20), headers=auth(tokens["sde"]))
    by_id = {k: v for k, v in body.items() if k != "nhs_numbers"} | {"cohort_id": cohort["cohort_id"]}
    again = await written(client, "POST", "/v1/data-uses", 200, json=by_id, headers=auth(tokens["sde"]))
    assert again == await responses[0].json()


@pytest.mark.parametrize(("change", "named"), [
    ({"nhs_numbers": nhs_numbers(19)}, "cohort"),
    ({"occurred_at": iso(-timedelta(hours=1))}, "occurred_at"),
    ({"access_method": "extract", "datasets": ["gp-prescribing"]}, "datasets, cohort"),
    ({"opt_out_state_position": 1}, "opt_out_state_position"),
])
async def test_a_use_id_already_recorded_for_another_release_is_409_naming_the_difference(
        client, database, tokens, change, named):
    await written(client, "POST", "/v1/grants", json=grant(), headers=auth(tokens["dac"]))
    body = data_use("u-1", nhs_numbers=nhs_numbers(20))  # occurred now: after the grant was recorded
    await written(client, "POST", "/v1/data-uses", json=body, headers=auth(tokens["sde"]))
    problem = await refused(client, database, "POST", "/v1/data-uses", 409, json={**body, **change},
                            headers=auth(tokens["sde"]))
    assert problem["type"].endswith("already-exists") and "'u-1'" in problem["detail"]
    assert named.split(",")[0] in problem["detail"]


def test_the_openapi_document_says_how_repeats_are_answered():
    from contracts.api import openapi

    paths = openapi("test")["paths"]
    for path in ("/v1/data-uses", "/v1/patients/{nhs}/opt-out"):
        assert "already recorded the answer is 200 with its existing receipt" in paths[path]["post"]["description"]
    assert "409 `already-exists`" in paths["/v1/data-uses"]["post"]["description"]


@pytest.mark.parametrize(("path", "body", "allowed"), [
    (f"/v1/patients/{NHS}/opt-out", choice(scope="type1"), "allowed: commercial, national, non-planning, non-research, type-1"),
    (f"/v1/patients/{NHS}/opt-out", choice(actor={"kind": "proxy", "proxy_role": "aunt"}),
     "allowed: court-deputy, lasting-power-of-attorney, parent"),
    ("/v1/grants", grant(purpose={"code": "marketing", "description": "d", "patient_benefit": "b"}),
     "allowed: clinical-audit, commissioning, planning, public-health, research, service-evaluation"),
])
async def test_an_invalid_enum_value_lists_the_allowed_ones(client, database, tokens, path, body, allowed):
    headers = auth(tokens["dac" if path == "/v1/grants" else "app"])
    problem = await refused(client, database, "POST", path, 422, json=body, headers=headers)
    assert allowed in problem["detail"] and allowed in problem["errors"][0]["message"], problem

"""Receipts for data uses (issue 12, items 1–2): every data use commits to its
cohort, and any patient can get the proof that they were in it — or not —
checked here with code written only from contracts/LEDGER-FORMAT.md §8
(tests/test_cohort_commitment_spec.py's independent verifier)."""

from __future__ import annotations

import hashlib
import json

from aiohttp.test_utils import TestClient

from samples import auth, choice, data_use, grant, nhs_numbers
from test_cohort_commitment_spec import check, secret_hash, tag_of


async def _use(client: TestClient, make_token, use_id: str, members: list[str], after: int) -> int:
    r = await client.post("/v1/data-uses", json=data_use(use_id, "G-1", nhs_numbers=members,
                                                          opt_out_state_position=after),
                          headers=auth(make_token("sde", org="SDE-NORTH")))
    assert r.status == 201, await r.text()
    return (await r.json())["position"]


def _verified(receipt: dict) -> bool:
    """Check a served receipt with the independent §8 code alone; True if it proves membership."""
    cohort = receipt["cohort"]
    entry = json.loads(receipt["entry"])
    commitment = entry["payload"]["cohort_commitment"]
    assert hashlib.sha256(b"\x00" + receipt["entry"].encode()).hexdigest() == receipt["leaf_hash"]
    secret = bytes.fromhex(cohort["secret"])
    assert secret_hash(secret) == cohort["secret_hash"]
    tag = tag_of(secret, cohort["context"])
    assert tag.hex() == cohort["tag"]
    found = check(cohort["proof"], tag, commitment["size"], bytes.fromhex(commitment["root"]))
    assert found is not None, "the proof does not check"
    return found


async def test_a_patient_proves_they_were_in_a_use_and_another_that_they_were_not(client: TestClient, make_token):
    r = await client.post("/v1/grants", json=grant("G-1"), headers=auth(make_token("dac")))
    granted = (await r.json())["position"]
    patients = nhs_numbers(200, seed=91)
    inside, opted_out = patients[:150], patients[150]
    await client.post(f"/v1/patients/{opted_out}/opt-out", json=choice(), headers=auth(make_token("patient-app")))
    first = await _use(client, make_token, "release-1", inside, granted + 1)

    async def receipt(nhs: str, position: int) -> dict:
        r = await client.get(f"/v1/patients/{nhs}/receipts/{position}",
                             headers=auth(make_token("patient-app", nhs_number=nhs)))
        assert r.status == 200, await r.text()
        assert r.headers["Ledger-Read-Recorded"]
        return await r.json()

    mine = await receipt(inside[7], first)
    assert mine["cohort"]["member"] is True and _verified(mine) is True
    # Asked for only now, the secret was committed after this use: the proof checks but cannot be relied on.
    assert mine["cohort"]["provable"] is False and mine["cohort"]["secret_position"] > first
    theirs = await receipt(opted_out, first)
    assert theirs["cohort"]["member"] is False and _verified(theirs) is False

    # Once committed, every later use is provable, in or out.
    second = await _use(client, make_token, "release-2", inside[:50], first)
    later = await receipt(inside[7], second)
    assert later["cohort"]["provable"] is True and _verified(later) is True
    absent = await receipt(inside[120], second)
    assert absent["cohort"]["member"] is False and _verified(absent) is False
    assert absent["cohort"]["provable"] is False  # their secret was committed by this very request
    again = await receipt(inside[120], second)
    assert again["cohort"]["secret_position"] == absent["cohort"]["secret_position"]  # committed once

    # The commitment names no one: the public entry holds only the root and the size.
    r = await client.get("/v1/public-entries")
    use = next(e for e in (await r.json())["entries"] if e["position"] == second)
    payload = json.loads(use["entry"])["payload"]
    assert payload["cohort_commitment"]["size"] == 50 and len(payload["cohort_commitment"]["root"]) == 64
    assert not any(n in use["entry"] for n in inside)


async def test_the_patient_page_checks_a_use_receipt(client: TestClient, make_token):
    r = await client.post("/v1/grants", json=grant("G-1"), headers=auth(make_token("dac")))
    granted = (await r.json())["position"]
    members = nhs_numbers(20, seed=92)
    nhs = members[3]
    token = make_token("patient-app", nhs_number=nhs)
    r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(scope="commercial"),
                          headers=auth(make_token("patient-app")))
    own = (await r.json())["position"]
    r = await client.get(f"/v1/patients/{nhs}/receipts/{own}", headers=auth(token))
    assert r.status == 200
    use = await _use(client, make_token, "release-9", members, own)
    first = await (await client.get(f"/v1/patients/{nhs}/receipts/{use}", headers=auth(token))).json()
    assert first["cohort"]["provable"] is False
    later = await _use(client, make_token, "release-10", members, use)
    html = await (await client.post("/patient", data={"token": token, "nhs_number": nhs, "action": "receipt",
                                                       "position": str(later)})).text()
    assert "you were among the 20 patients this use committed to" in html and "The receipt checks out" in html


async def test_a_patient_proves_their_opt_out_took_them_out_of_a_filtered_release(client: TestClient, make_token):
    r = await client.post("/v1/grants", json=grant("G-1"), headers=auth(make_token("dac")))
    granted = (await r.json())["position"]
    patients = nhs_numbers(30, seed=93)
    app = auth(make_token("patient-app"))
    for nhs in patients[:3]:
        r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=app)
    last = (await r.json())["position"]
    r = await client.post(f"/v1/opt-out-filter?grant_id=G-1&min_position={max(last, granted)}",
                          json={"nhs_numbers": patients}, headers=auth(make_token("sde", org="SDE-NORTH")))
    assert r.status == 200 and (await r.json())["removed"] == 3
    call = int(r.headers["Ledger-Read-Recorded"])

    async def receipt(nhs: str) -> dict:
        r = await client.get(f"/v1/patients/{nhs}/receipts/{call}",
                             headers=auth(make_token("patient-app", nhs_number=nhs)))
        assert r.status == 200, await r.text()
        return await r.json()

    removed, kept = await receipt(patients[1]), await receipt(patients[10])
    for got, was_removed in ((removed, True), (kept, False)):
        cohort = got["cohort"]
        payload = json.loads(got["entry"])["payload"]
        assert payload["removed_commitment"]["size"] == 3 and cohort["context"] == f"filter-call:{payload['call_id']}"
        secret = bytes.fromhex(cohort["secret"])
        found = check(cohort["proof"], tag_of(secret, cohort["context"]), 3,
                      bytes.fromhex(payload["removed_commitment"]["root"]))
        assert found is was_removed and cohort["member"] is was_removed
    assert not any(n in removed["entry"] for n in patients)

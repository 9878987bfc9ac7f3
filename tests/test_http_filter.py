"""The opt-out filter, cohorts, history and register through HTTP."""

from __future__ import annotations

import asyncio
import csv
import io

import pytest
from aiohttp.test_utils import TestClient, TestServer

from contracts.disclosure import suppressed
from contracts import cohort as cohorts
from samples import auth, choice, data_use, grant, head_position, nhs_numbers
from conftest import app_config
from service.http.app import create_app

DAT = "application/vnd.nhs.mesh.dat"


async def opt_out(client, make_token, nhs: str, scope: str = "national") -> int:
    r = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(scope), headers=auth(make_token("patient-app")))
    assert r.status == 201, await r.text()
    return (await r.json())["position"]


async def test_filter_in_every_media_type_keeps_order_and_duplicates(client, make_token):
    numbers = nhs_numbers(6, seed=21)
    position = await opt_out(client, make_token, numbers[2])
    await opt_out(client, make_token, numbers[4], scope="type-1")
    sde = auth(make_token("sde", org="SDE-NORTH"))
    sent = [numbers[5], numbers[2], numbers[0], numbers[0], numbers[4], numbers[1], numbers[5]]
    expected = [numbers[5], numbers[0], numbers[0], numbers[1], numbers[5]]

    r = await client.post(f"/v1/opt-out-filter?min_position={position + 1}",
                          json={"nhs_numbers": sent}, headers=sde)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["nhs_numbers"] == expected
    assert body["removed"] == 2 and body["as_of"] >= position + 1 and body["checkpoint"] == 0

    spaced = "\r\n".join(f"{n[:3]} {n[3:6]} {n[6:]}" for n in sent) + "\r\n"
    r = await client.post("/v1/opt-out-filter", data=spaced, headers={**sde, "Content-Type": "text/plain"})
    assert r.status == 200 and r.content_type == "text/plain"
    assert (await r.text()).splitlines() == expected
    assert r.headers["Ledger-Removed"] == "2" and int(r.headers["Ledger-As-Of"]) >= position + 1
    assert r.headers["Ledger-Checkpoint"] == "0"

    dat = "".join(f"{n},\n" for n in sent)
    r = await client.post("/v1/opt-out-filter", data=dat, headers={**sde, "Content-Type": DAT})
    assert r.status == 200 and r.content_type == DAT
    assert await r.text() == "".join(f"{n},\n" for n in expected)
    assert r.headers["Ledger-Removed"] == "2"


@pytest.mark.parametrize("media, body, answer", [
    ("application/json", b'{"nhs_numbers": []}', None),
    ("text/plain", b"", b""),
    ("application/vnd.nhs.mesh.dat", b"", b""),
])
async def test_empty_input_gives_empty_answer(client, make_token, media, body, answer):
    r = await client.post("/v1/opt-out-filter", data=body,
                          headers={**auth(make_token("sde", org="SDE-NORTH")), "Content-Type": media})
    assert r.status == 200, await r.text()
    if answer is None:
        assert (await r.json())["nhs_numbers"] == [] and (await r.json())["removed"] == 0
    else:
        assert await r.read() == answer and r.headers["Ledger-Removed"] == "0"


async def test_invalid_lines_are_listed_and_nothing_is_filtered(client, make_token):
    numbers = nhs_numbers(3, seed=4)
    sde = auth(make_token("sde", org="SDE-NORTH"))
    text = "\n".join([numbers[0], "9434765918", "", numbers[1], "12345", "abc"]) + "\n"
    r = await client.post("/v1/opt-out-filter", data=text, headers={**sde, "Content-Type": "text/plain"})
    assert r.status == 422
    problem = await r.json()
    assert [e["path"] for e in problem["errors"]] == ["line 2", "line 5", "line 6"]
    assert "9434765918" not in await r.text()

    r = await client.post("/v1/opt-out-filter", json={"nhs_numbers": [numbers[0], "9434765918"]}, headers=sde)
    assert r.status == 422 and [e["path"] for e in (await r.json())["errors"]] == ["$.nhs_numbers[1]"]

    missing_comma = f"{numbers[0]},\n{numbers[1]}\n"
    r = await client.post("/v1/opt-out-filter", data=missing_comma, headers={**sde, "Content-Type": DAT})
    assert r.status == 422 and [e["path"] for e in (await r.json())["errors"]] == ["line 2"]

    r = await client.post("/v1/opt-out-filter", data=b"x", headers={**sde, "Content-Type": "text/csv"})
    assert r.status == 415


async def test_read_your_writes_the_receipt_position_is_honoured_by_the_next_call(client, make_token):
    sde = auth(make_token("sde", org="SDE-NORTH"))
    numbers = nhs_numbers(40, seed=8)
    for n in numbers[:20]:
        position = await opt_out(client, make_token, n)
        r = await client.post(f"/v1/opt-out-filter?min_position={position}", json={"nhs_numbers": [n]}, headers=sde)
        body = await r.json()
        assert body["nhs_numbers"] == [] and body["removed"] == 1 and body["as_of"] >= position


async def test_min_position_not_reached_answers_503_with_retry_after(database, verifier, make_token):
    app = create_app(app_config(pool_size=4, filter_wait=0.3), database, verifier)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        head = await head_position(database)
        r = await client.post(f"/v1/opt-out-filter?min_position={head + 5}", json={"nhs_numbers": []},
                              headers=auth(make_token("sde", org="SDE-NORTH")))
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert (await r.json())["type"].endswith("not-yet-reflected")


async def test_filter_is_grant_aware(client, make_token):
    dac, app_token = auth(make_token("dac")), auth(make_token("patient-app"))
    sde = auth(make_token("sde", org="SDE-NORTH"))
    a, b, c = nhs_numbers(3, seed=30)
    assert (await client.post("/v1/grants", json=grant("G-PLAIN"), headers=dac)).status == 201
    exempt = grant("G-EXEMPT", opt_out_exemption={"basis": "s251-cag", "reference": "CAG 21/0001"})
    assert (await client.post("/v1/grants", json=exempt, headers=dac)).status == 201
    await opt_out(client, make_token, a)
    await opt_out(client, make_token, b)
    r = await client.post(f"/v1/patients/{b}/consents", json={"grant_id": "G-PLAIN", "actor": {"kind": "patient"}},
                          headers=app_token)
    position = (await r.json())["position"]

    body = await (await client.post(f"/v1/opt-out-filter?grant_id=G-PLAIN&min_position={position}",
                                    json={"nhs_numbers": [a, b, c]}, headers=sde)).json()
    assert body["nhs_numbers"] == [b, c] and body["removed"] == 1 and body["consented_kept"] == 1
    body = await (await client.post("/v1/opt-out-filter", json={"nhs_numbers": [a, b, c]}, headers=sde)).json()
    assert body["nhs_numbers"] == [c] and body["removed"] == 2
    r = await client.post("/v1/opt-out-filter?grant_id=G-EXEMPT", data=f"{a}\n{b}\n{c}\n",
                          headers={**sde, "Content-Type": "text/plain"})
    assert (await r.text()).split() == [a, b, c] and r.headers["Ledger-Removed"] == "0"
    assert r.headers["Ledger-Exemption"] == "s251-cag; reference=CAG 21/0001"
    r = await client.post("/v1/opt-out-filter?grant_id=NOPE", json={"nhs_numbers": [a]}, headers=sde)
    assert r.status == 422
    r = await client.post("/v1/opt-out-filter", json={"nhs_numbers": [a]}, headers=auth(make_token("patient-app")))
    assert r.status == 403


async def test_cohorts_are_content_addressed_in_every_media_type(client, make_token, database):
    sde = auth(make_token("sde", org="SDE-NORTH"))
    numbers = nhs_numbers(30, seed=12)
    before = await head_position(database)
    ids = set()
    r = await client.post("/v1/cohorts", json=list(reversed(numbers)) + numbers[:3], headers=sde)
    assert r.status == 201, await r.text()
    ids.add((await r.json())["cohort_id"])
    assert (await r.json())["size"] == 30
    r = await client.post("/v1/cohorts", data="\n".join(numbers), headers={**sde, "Content-Type": "text/plain"})
    ids.add((await r.json())["cohort_id"])
    r = await client.post("/v1/cohorts", data="".join(f"{n},\n" for n in numbers), headers={**sde, "Content-Type": DAT})
    ids.add((await r.json())["cohort_id"])
    assert ids == {cohorts.cohort_id(cohorts.normalise([int(n[:9]) for n in numbers]))}
    # The ledger records once that this organisation stored the cohort (CohortStored).
    assert await head_position(database) == before + 1

    r = await client.post("/v1/cohorts", data=f"{numbers[0]}\n12\n", headers={**sde, "Content-Type": "text/plain"})
    assert r.status == 422 and (await r.json())["errors"][0]["path"] == "line 2"
    r = await client.post("/v1/cohorts", json=[], headers=sde)
    assert r.status == 422


async def test_history_and_register_after_a_data_use_by_cohort_id(client, make_token, database):
    dac, sde = auth(make_token("dac")), auth(make_token("sde", org="SDE-NORTH"))
    app_token = auth(make_token("patient-app"))
    numbers = nhs_numbers(30, seed=13)
    opted, consenting, outsider = numbers[0], numbers[1], nhs_numbers(1, seed=99, prefix=998)[0]
    assert (await client.post("/v1/grants", json=grant("G-1"), headers=dac)).status == 201
    await opt_out(client, make_token, opted)
    await opt_out(client, make_token, consenting)
    await client.post(f"/v1/patients/{consenting}/consents", json={"grant_id": "G-1", "actor": {"kind": "patient"}},
                      headers=app_token)
    cohort = (await (await client.post("/v1/cohorts", json=numbers, headers=sde)).json())["cohort_id"]
    r = await client.post("/v1/data-uses", json=data_use("use-1", "G-1", cohort_id=cohort), headers=sde)
    assert r.status == 422 and "1 patient(s)" in (await r.json())["detail"]
    allowed = (await (await client.post("/v1/opt-out-filter?grant_id=G-1", json={"nhs_numbers": numbers},
                                         headers=sde)).json())["nhs_numbers"]
    assert opted not in allowed and consenting in allowed
    cohort = (await (await client.post("/v1/cohorts", json=allowed, headers=sde)).json())["cohort_id"]
    r = await client.post("/v1/data-uses", json=data_use("use-1", "G-1", cohort_id=cohort), headers=sde)
    assert r.status == 201, await r.text()
    use_position = (await r.json())["position"]

    def own(nhs: str) -> dict[str, str]:
        # The patient's own token: their reads are recorded but not listed back to them.
        return auth(make_token("patient-app", nhs_number=nhs))

    async def history_of(nhs: str) -> dict:
        for _ in range(100):
            page = await (await client.get(f"/v1/patients/{nhs}/history", headers=own(nhs))).json()
            if page["as_of"] >= use_position:
                return page
            import asyncio
            await asyncio.sleep(0.05)
        raise AssertionError("projection did not catch up")

    page = await history_of(consenting)
    kinds = [i["kind"] for i in page["items"]]
    assert kinds == ["data-use", "consent", "choice"]
    use = page["items"][0]
    assert use["organisation"]["code"] == "SDE-NORTH" and use["purpose"]["label"] == "research"
    assert use["legal_basis"]["code"] == "public-task-research" and use["datasets"] == ["hes-apc"]
    assert use["consent_applied"] is True and "consented" in use["opt_out"]
    assert [i["kind"] for i in (await history_of(opted))["items"]] == ["choice"]
    assert [i["kind"] for i in (await history_of(numbers[5]))["items"]] == ["data-use"]
    assert (await history_of(outsider))["items"] == []
    first = await (await client.get(f"/v1/patients/{consenting}/history?limit=1", headers=own(consenting))).json()
    second = await (await client.get(f"/v1/patients/{consenting}/history?limit=2&cursor={first['next_cursor']}",
                                     headers=own(consenting))).json()
    assert [i["position"] for i in first["items"] + second["items"]] == [i["position"] for i in page["items"]]
    assert second["next_cursor"] is None
    r = await client.get(f"/v1/patients/{consenting}/history", headers=auth(make_token("sde", org="SDE-NORTH")))
    assert r.status == 403

    register = await (await client.get("/v1/register")).json()
    (row,) = register["grants"]
    assert row["grant_id"] == "G-1" and row["uses"] == 1 and row["patients_covered"] == suppressed(len(allowed))
    assert row["opt_outs_applied"] is True and row["organisation"]["name"]
    text = await (await client.get("/v1/register", headers={"Accept": "text/csv"})).text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["grant_id"] == "G-1" and rows[0]["patients_covered"] == str(suppressed(len(allowed)))
    assert (await client.get("/v1/register?format=csv")).content_type == "text/csv"
    assert not any(n in text or n in str(register) for n in numbers)


async def test_openapi_documents_the_bulk_media_types(client, make_token):
    doc = await (await client.get("/openapi.json")).json()
    for path in ("/v1/cohorts", "/v1/opt-out-filter"):
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "text/plain", DAT}
    assert DAT in doc["paths"]["/v1/opt-out-filter"]["post"]["responses"]["200"]["content"]
    # A bulk body that is not JSON at all is a documented 400 (schemathesis found it undocumented).
    for path in ("/v1/cohorts", "/v1/opt-out-filter"):
        assert "400" in doc["paths"][path]["post"]["responses"]
    r = await client.post("/v1/cohorts", data=b"[", headers={**auth(make_token("sde", org="SDE-NORTH")),
                                                            "Content-Type": "application/json"})
    assert r.status == 400 and r.content_type == "application/problem+json"
    assert doc["paths"]["/v1/register"]["get"]["security"] == []
    assert doc["paths"]["/v1/patients/{nhs}/history"]["get"]["x-roles"] == ["patient-app"]


async def test_history_shows_who_else_viewed_the_patients_data(client, make_token):
    """Issue 5: reads of a patient's data by anyone but the patient appear in their history."""
    nhs = nhs_numbers(1, seed=21)[0]
    backend = auth(make_token("patient-app", subject="nhs-app-backend"))
    own = auth(make_token("patient-app", nhs_number=nhs))
    await opt_out(client, make_token, nhs)
    viewed = await client.get(f"/v1/patients/{nhs}/choices", headers=backend)
    read_position = int(viewed.headers["Ledger-Read-Recorded"])
    assert (await client.get(f"/v1/patients/{nhs}/choices", headers=own)).status == 200
    for _ in range(100):
        page = await (await client.get(f"/v1/patients/{nhs}/history", headers=own)).json()
        if page["as_of"] >= read_position:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("projection did not catch up")
    access = [i for i in page["items"] if i["kind"] == "access"]
    assert [i["position"] for i in access] == [read_position]  # the patient's own reads are not listed
    assert access[0]["actor"] == "nhs-app-backend" and "viewed by nhs-app-backend" in access[0]["summary"]
    assert [i["kind"] for i in page["items"]] == ["access", "choice"]

"""Bad input never writes: every write path this work added answers a refused request with a problem
and leaves the ledger (and the subscriptions) exactly as they were."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from aiohttp.test_utils import TestClient

from samples import auth, grant
from service.http.keys import OUTBOX, STORE


async def test_refused_writes_change_nothing(client: TestClient, make_token):
    dac = auth(make_token("dac", org="DAC-ORG"))
    assert (await client.post("/v1/grants", json=grant("G-1"), headers=dac)).status == 201
    backend = make_token("patient-app", subject="backend-z")
    # A public literal address: accepted without resolving a name (nothing is delivered to it here).
    r = await client.post("/v1/subscriptions", json={"url": "https://93.184.215.14/hooks",
                                                      "events": ["record.read"], "description": "x"},
                          headers=auth(backend))
    assert r.status == 201, await r.text()
    sub = await r.json()
    head, _ = await client.server.app[STORE].head()
    now = datetime.now(timezone.utc).isoformat()
    refused = [
        ("POST", "/v1/grants", grant("G-ins", organisation={"code": "X", "name": "X", "category": "insurance"}), dac),
        ("POST", "/v1/grants/G-1/approvals", {"approval": "cag", "reference": "r", "organisation_name": "n"},
         auth(make_token("cag", org="CAG"))),                                      # not needed by this grant
        ("POST", "/v1/grants/G-1/outputs", {"kind": "product", "identifier": "p", "title": "t", "benefit": 3}, dac),
        ("POST", "/v1/grants/G-1/value", {"amount": 10, "currency": "GBP", "period_from": now,
                                          "period_until": (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()},
         dac),
        ("POST", "/v1/grants/G-1/allocations", {"amount": 1, "currency": "GBP", "care_service": "s"}, dac),
        ("POST", "/v1/grants/G-1/value", {"amount": "ten", "currency": "GBP", "period_from": now,
                                          "period_until": now}, dac),
        ("POST", "/v1/subscriptions", {"url": "http://127.0.0.1/hooks", "events": ["record.read"],
                                       "description": "x"}, auth(backend)),
        ("POST", "/v1/subscriptions", {"url": "https://example.org/x", "events": ["record.read"],
                                       "description": "x", "extra": 1}, auth(backend)),
    ]
    for method, path, body, headers in refused:
        r = await client.request(method, path, json=body, headers=headers)
        assert r.status in (400, 403, 404, 409, 422) and r.content_type == "application/problem+json", (path, r.status)
    r = await client.put(f"/v1/subscriptions/{sub['id']}/patients", data=b"9434765918\n",
                         headers={**auth(backend), "Content-Type": "text/plain"})
    assert r.status == 422
    assert (await (await client.get(f"/v1/subscriptions/{sub['id']}", headers=auth(backend))).json())["patients"] == 0
    assert (await client.server.app[STORE].head())[0] == head
    assert len(await client.server.app[OUTBOX].owned("backend-z")) == 1

"""No surprises (issue 13): patient app backends subscribe, and receive signed
notifications of uses of their patients' data, opt-outs set aside, choices
made by someone else, reads by someone else, and newly approved grants — in
ledger order, de-duplicable, surviving failures."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import AUDIENCE, ISSUER, app_config
from live_server import LiveServer
from samples import auth, choice, data_use, grant, nhs_numbers
from service.http.app import create_app
from service.notify.addresses import AddressRefused, GuardedResolver, check_url, networks
from webhook_receiver import Receiver

ALL = ["data-use.included", "data-use.opt-out-overridden", "choice.changed", "record.read", "grant.approved"]


@pytest.fixture
async def ledger(database, verifier) -> AsyncIterator[TestClient]:
    config = app_config(webhook_allow=("127.0.0.0/8",), webhook_retry_base=0.05, webhook_timeout=1.0,
                        projection_poll_interval=0.05)
    async with TestClient(TestServer(create_app(config, database, verifier), host="127.0.0.1")) as c:
        yield c


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def _subscribe(client: TestClient, token: str, receiver: Receiver, patients: list[str],
                     events: list[str] = ALL) -> dict:
    r = await client.post("/v1/subscriptions", json={"url": receiver.url, "events": events,
                                                      "description": "Alerts for the MyHealth app"},
                          headers=auth(token))
    assert r.status == 201, await r.text()
    sub = await r.json()
    receiver.secret = sub["secret"]
    r = await client.put(f"/v1/subscriptions/{sub['id']}/patients", json=patients, headers=auth(token))
    assert r.status == 200 and (await r.json())["patients"] == len(set(patients)), await r.text()
    return sub


async def test_a_backend_hears_of_every_kind_of_event_signed_and_in_order(ledger: TestClient, receiver: Receiver,
                                                                         make_token):
    backend = make_token("patient-app", subject="myhealth-backend")
    dac, sde = auth(make_token("dac")), auth(make_token("sde", org="SDE-NORTH"))
    a, b, c, d, e, outsider = nhs_numbers(6, seed=61)
    sub = await _subscribe(ledger, backend, receiver, [a, b, c, d, e])
    assert "secret" not in await (await ledger.get(f"/v1/subscriptions/{sub['id']}", headers=auth(backend))).json()

    app = auth(make_token("patient-app"))
    await ledger.post(f"/v1/patients/{a}/opt-out", json=choice(channel="phone"), headers=app)      # notified
    await ledger.post(f"/v1/patients/{b}/opt-out", json=choice(), headers=app)                    # their own, in the app
    await ledger.post(f"/v1/patients/{c}/opt-out", json=choice(actor={"kind": "proxy", "proxy_role": "parent"}),
                      headers=app)                                                                  # notified
    await ledger.get(f"/v1/patients/{d}/choices", headers=auth(make_token("patient-app", subject="other-app")))
    await ledger.get(f"/v1/patients/{e}/choices", headers=auth(make_token("patient-app", nhs_number=e)))  # own read
    r = await ledger.post("/v1/grants", json=grant("G-1"), headers=dac)
    g1 = (await r.json())["position"]
    await ledger.post("/v1/grants", json=grant("G-EX", legal_basis="section-251", opt_out_exemption={
        "basis": "s251-cag", "reference": "21/CAG/0042"}), headers=dac)
    r = await ledger.post("/v1/data-uses", json=data_use("u-1", "G-1", nhs_numbers=[d, e, outsider],
                                                          opt_out_state_position=g1 + 1), headers=sde)
    assert r.status == 201, await r.text()
    r = await ledger.post("/v1/data-uses", json=data_use("u-2", "G-EX", nhs_numbers=[a, d],
                                                          opt_out_state_position=g1 + 1), headers=sde)
    assert r.status == 201, await r.text()

    got = await receiver.wait_for(8)
    await asyncio.sleep(0.5)
    assert receiver.refused == [] and len(receiver.unique()) == 8
    kinds = [(n["type"], n["data"].get("nhs_number")) for n in got]
    assert kinds[:5] == [("choice.changed", a), ("choice.changed", c), ("record.read", d), ("grant.approved", None),
                         ("grant.approved", None)]
    assert [n["type"] for n in got[5:]] == ["data-use.included", "data-use.included", "data-use.opt-out-overridden"]
    positions = [n["data"]["position"] for n in got]
    assert positions == sorted(positions)
    included = got[5]["data"]
    assert included["use_id"] == "u-1" and included["organisation_code"] == "SDE-NORTH"
    assert sorted((p["nhs_number"], p["applied"]) for p in included["patients"]) == sorted(
        [(d, "no-opt-out"), (e, "no-opt-out")])
    assert sorted((p["nhs_number"], p["applied"]) for p in got[6]["data"]["patients"]) == sorted(
        [(a, "exemption"), (d, "no-opt-out")])
    assert got[7]["data"]["patients"] == [a] and got[7]["data"]["exemption"]["reference"] == "21/CAG/0042"
    assert got[0]["data"]["channel"] == "phone" and got[1]["data"]["actor"]["kind"] == "proxy"

    # The same notifications as a pull feed, and the delivery log.
    r = await ledger.get(f"/v1/subscriptions/{sub['id']}/events", headers=auth(backend))
    feed = await r.json()
    assert r.headers["Ledger-Read-Recorded"] and [i["webhook_id"] for i in feed["events"]] == [n["id"] for n in got]
    assert feed["events"][5]["body"]["data"] == included
    log = await (await ledger.get(f"/v1/subscriptions/{sub['id']}/deliveries", headers=auth(backend))).json()
    assert all(x["delivered_at"] and x["attempts"] == 1 for x in log["deliveries"])


async def test_subscriptions_belong_to_their_backend(ledger: TestClient, receiver: Receiver, make_token):
    mine, theirs = make_token("patient-app", subject="backend-1"), make_token("patient-app", subject="backend-2")
    sub = await _subscribe(ledger, mine, receiver, nhs_numbers(2, seed=62))
    path = f"/v1/subscriptions/{sub['id']}"
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/pause"), ("POST", "/resume"),
                           ("GET", "/deliveries"), ("GET", "/events")):
        assert (await ledger.request(method, path + suffix, headers=auth(theirs))).status == 404, (method, suffix)
    assert (await ledger.put(path + "/patients", json=nhs_numbers(1, seed=63), headers=auth(theirs))).status == 404
    assert (await (await ledger.get("/v1/subscriptions", headers=auth(theirs))).json())["subscriptions"] == []
    assert [s["id"] for s in (await (await ledger.get("/v1/subscriptions", headers=auth(mine))).json())[
        "subscriptions"]] == [sub["id"]]
    patient = make_token("patient-app", nhs_number=nhs_numbers(1, seed=64)[0])
    r = await ledger.get("/v1/subscriptions", headers=auth(patient))
    assert r.status == 403 and "backend" in (await r.json())["detail"]
    r = await ledger.delete(path, headers=auth(mine))
    assert r.status == 200 and (await r.json())["status"] == "deleted"
    assert (await ledger.get(path, headers=auth(mine))).status == 404


async def test_endpoints_on_internal_addresses_are_refused(client: TestClient, make_token):
    backend = auth(make_token("patient-app"))
    for url in ("http://127.0.0.1:8080/hooks", "http://10.0.0.7/hooks", "http://169.254.169.254/latest/meta-data",
                "http://[::1]/hooks", "http://localhost/hooks", "http://user:pw@example.org/hooks",
                "http://192.168.1.1/"):
        r = await client.post("/v1/subscriptions", json={"url": url, "events": ["record.read"], "description": "x"},
                              headers=backend)
        problem = await r.json()
        assert r.status == 422 and problem["type"].endswith("url-refused"), (url, problem)
    r = await client.post("/v1/subscriptions", json={"url": "ftp://example.org/x", "events": ["record.read"],
                                                      "description": "x"}, headers=backend)
    assert r.status == 422
    r = await client.post("/v1/subscriptions", json={"url": "https://example.org/x", "events": ["everything"],
                                                      "description": "x"}, headers=backend)
    assert r.status == 422


async def test_a_paused_subscription_keeps_its_backlog_and_delivers_it_in_order_on_resume(
        ledger: TestClient, receiver: Receiver, make_token):
    backend = make_token("patient-app", subject="backend-p")
    patients = nhs_numbers(5, seed=65)
    sub = await _subscribe(ledger, backend, receiver, patients, ["choice.changed"])
    await ledger.post(f"/v1/subscriptions/{sub['id']}/pause", headers=auth(backend))
    app = auth(make_token("patient-app"))
    for nhs in patients:
        await ledger.post(f"/v1/patients/{nhs}/opt-out", json=choice(channel="post"), headers=app)
    for _ in range(100):
        view = await (await ledger.get(f"/v1/subscriptions/{sub['id']}", headers=auth(backend))).json()
        if view["pending"] == 5:
            break
        await asyncio.sleep(0.05)
    assert view["pending"] == 5 and receiver.received == []
    await ledger.post(f"/v1/subscriptions/{sub['id']}/resume", headers=auth(backend))
    got = await receiver.wait_for(5)
    assert [n["data"]["nhs_number"] for n in got] == patients


async def test_a_failing_then_slow_receiver_gets_everything_once_in_order(ledger: TestClient, receiver: Receiver,
                                                                         make_token):
    backend = make_token("patient-app", subject="backend-f")
    patients = nhs_numbers(6, seed=66)
    sub = await _subscribe(ledger, backend, receiver, patients, ["choice.changed"])
    receiver.fail_next, receiver.stall_next, receiver.stall = 3, 1, 2.0  # beyond the 1 s delivery timeout
    app = auth(make_token("patient-app"))
    for nhs in patients:
        await ledger.post(f"/v1/patients/{nhs}/opt-out", json=choice(channel="gp-practice"), headers=app)
    got = await receiver.wait_for(6)
    assert [n["data"]["nhs_number"] for n in got] == patients
    log = await (await ledger.get(f"/v1/subscriptions/{sub['id']}/deliveries", headers=auth(backend))).json()
    assert log["deliveries"][0]["attempts"] >= 4 and all(x["delivered_at"] for x in log["deliveries"])


async def test_a_subscription_failing_for_the_retry_window_is_marked_and_keeps_its_backlog(
        database, verifier, receiver: Receiver, make_token):
    config = app_config(webhook_allow=("127.0.0.0/8",), webhook_retry_base=0.05, webhook_retry_window=0.5,
                        projection_poll_interval=0.05)
    async with TestClient(TestServer(create_app(config, database, verifier), host="127.0.0.1")) as ledger:
        backend = make_token("patient-app", subject="backend-w")
        patients = nhs_numbers(3, seed=67)
        sub = await _subscribe(ledger, backend, receiver, patients, ["choice.changed"])
        receiver.fail_next = 10_000
        app = auth(make_token("patient-app"))
        for nhs in patients:
            await ledger.post(f"/v1/patients/{nhs}/opt-out", json=choice(channel="post"), headers=app)
        for _ in range(200):
            view = await (await ledger.get(f"/v1/subscriptions/{sub['id']}", headers=auth(backend))).json()
            if view["status"] == "failing":
                break
            await asyncio.sleep(0.05)
        assert view["status"] == "failing" and view["pending"] == 3
        assert receiver.received == []
        receiver.fail_next = 0
        await asyncio.sleep(0.5)
        assert receiver.received == []  # a failing subscription waits for its owner
        await ledger.post(f"/v1/subscriptions/{sub['id']}/resume", headers=auth(backend))
        got = await receiver.wait_for(3)
        assert [n["data"]["nhs_number"] for n in got] == patients


async def test_deliveries_resume_after_the_service_is_killed_without_losing_or_reordering_any(
        database, signing_key, make_token, receiver: Receiver, tmp_path):
    """`consent-ledger serve` SIGKILLed mid-delivery, then started again: every notification arrives,
    in order, and what arrived twice carries the same webhook-id."""
    env = {"CONSENT_LEDGER_WEBHOOK_ALLOW": "127.0.0.0/8", "CONSENT_LEDGER_PROJECTION_POLL": "0.05"}

    def serve(name: str) -> LiveServer:
        (tmp_path / name).mkdir()
        server = LiveServer(database_url=database.owner_dsn, signing_key=signing_key, issuer=ISSUER,
                            audience=AUDIENCE, workdir=tmp_path / name, extra_env=env)
        server.wait_ready()
        return server

    first = serve("first")
    backend = make_token("patient-app", subject="backend-k")
    patients = nhs_numbers(40, seed=68)
    try:
        async with aiohttp.ClientSession(first.url) as session:
            r = await session.post("/v1/subscriptions", json={"url": receiver.url, "events": ["choice.changed"],
                                                               "description": "kill test"}, headers=auth(backend))
            sub = await r.json()
            receiver.secret = sub["secret"]
            await session.put(f"/v1/subscriptions/{sub['id']}/patients", json=patients, headers=auth(backend))
            receiver.delay = 0.05
            app = auth(make_token("patient-app"))
            for nhs in patients:
                r = await session.post(f"/v1/patients/{nhs}/opt-out", json=choice(channel="phone"), headers=app)
                assert r.status == 201
        await receiver.wait_for(8)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    finally:
        first.stop()
    assert len(receiver.unique()) < len(patients), "everything was delivered before the kill: it proved nothing"
    second = serve("second")
    try:
        got = await receiver.wait_for(len(patients), seconds=60)
    finally:
        second.stop()
    assert [n["data"]["nhs_number"] for n in got] == patients
    assert receiver.refused == []


async def test_the_patient_set_takes_every_bulk_format_and_refuses_bad_numbers(ledger: TestClient, receiver: Receiver,
                                                                              make_token):
    backend = make_token("patient-app", subject="backend-b")
    sub = await _subscribe(ledger, backend, receiver, nhs_numbers(1, seed=69))
    path, numbers = f"/v1/subscriptions/{sub['id']}/patients", nhs_numbers(5, seed=70)
    for content_type, body in (("text/plain", "\n".join(numbers) + "\n"),
                               ("application/vnd.nhs.mesh.dat", "".join(f"{n},\n" for n in numbers))):
        r = await ledger.put(path, data=body.encode(), headers={**auth(backend), "Content-Type": content_type})
        assert r.status == 200 and (await r.json())["patients"] == 5, await r.text()
    r = await ledger.put(path, data=b"9434765918\n", headers={**auth(backend), "Content-Type": "text/plain"})
    problem = await r.json()
    assert r.status == 422 and problem["errors"][0]["path"].startswith("line 1"), problem
    assert (await (await ledger.get(f"/v1/subscriptions/{sub['id']}", headers=auth(backend))).json())["patients"] == 5


async def test_a_delivery_connects_only_to_addresses_the_guard_allows():
    """Names are checked as a delivery connects (so one that resolves inward later is refused too)."""
    refusing = GuardedResolver(networks(()))
    with pytest.raises(OSError, match="private, loopback or link-local"):
        await refusing.resolve("localhost", 80)
    allowing = GuardedResolver(networks(("127.0.0.0/8", "::1/128")))
    assert {r["host"] for r in await allowing.resolve("localhost", 80)} <= {"127.0.0.1", "::1"}
    with pytest.raises(AddressRefused):
        await check_url("http://10.1.2.3/hooks", networks(()), resolve=False)  # literal addresses: checked here
    await check_url("http://localhost/hooks", networks(()), resolve=False)  # names: left to the resolver
    await refusing.close()
    await allowing.close()

"""Approvals by several parties (issue 14, item 2): a grant is proposed until
each approval its policy requires is recorded, each by its own role and a
distinct organisation; until then the filter and the data-use check treat it
as not in force, and the register shows what is pending."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import app_config
from contracts import approvals
from samples import auth, data_use, grant, nhs_numbers, settled, verified_register
from service import config
from service.config import ConfigError
from service.http.app import create_app


@pytest.fixture
async def governed(database, verifier) -> AsyncIterator[TestClient]:
    """The service with the production approval policy."""
    app = create_app(app_config(approvals=approvals.PRODUCTION_POLICY, statistics_seconds=0), database, verifier)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


def _approval(kind: str, reference: str = "REF-1", name: str = "Approving body") -> dict:
    return {"approval": kind, "reference": reference, "organisation_name": name}


async def test_a_commercial_research_grant_is_in_force_only_once_every_party_approved(
        governed: TestClient, make_token):
    proposer = auth(make_token("dac", org="NHSE-DARS"))
    sde = auth(make_token("sde", org="SDE-NORTH"))
    r = await governed.post("/v1/grants", json=grant("G-1", commercial=True), headers=proposer)
    assert r.status == 201, await r.text()
    view = await (await governed.get("/v1/grants/G-1", headers=proposer)).json()
    assert view["status"] == "proposed"
    assert view["grant"]["requires"] == ["dac-decision", "ethics", "lay-panel", "board-fairness"]
    assert view["pending"] == ["dac-decision", "ethics", "lay-panel", "board-fairness"]

    numbers = nhs_numbers(12, seed=51)
    r = await governed.post("/v1/opt-out-filter", params={"grant_id": "G-1"}, json={"nhs_numbers": numbers},
                            headers=sde)
    assert r.status == 422 and (await r.json())["type"].endswith("grant-proposed")
    r = await governed.post("/v1/data-uses", json=data_use("u-1", "G-1", nhs_numbers=numbers), headers=sde)
    problem = await r.json()
    assert r.status == 422 and problem["type"].endswith("grant-proposed"), problem
    assert "still needed dac-decision, ethics, lay-panel, board-fairness" in problem["detail"]

    parties = [("dac-decision", "dac", "IGARD"), ("ethics", "ethics-committee", "REC-NE"),
               ("lay-panel", "lay-panel", "CITIZENS-PANEL"), ("board-fairness", "board", "NHSE-BOARD")]
    last = 0
    for kind, role, org in parties:
        r = await governed.post("/v1/grants/G-1/approvals", json=_approval(kind, f"{org}/2026/1", org),
                                headers=auth(make_token(role, org=org)))
        assert r.status == 201, await r.text()
        last = (await r.json())["position"]
        status = (await (await governed.get("/v1/grants/G-1", headers=proposer)).json())["status"]
        assert status == ("active" if kind == "board-fairness" else "proposed")
    # The same approval sent again is the same receipt.
    r = await governed.post("/v1/grants/G-1/approvals", json=_approval("board-fairness", "NHSE-BOARD/2026/1",
                                                                        "NHSE-BOARD"),
                            headers=auth(make_token("board", org="NHSE-BOARD")))
    assert r.status == 200 and (await r.json())["position"] == last

    r = await governed.post("/v1/opt-out-filter", params={"grant_id": "G-1", "min_position": str(last)},
                            json={"nhs_numbers": numbers}, headers=sde)
    assert r.status == 200 and (await r.json())["nhs_numbers"] == numbers
    r = await governed.post("/v1/data-uses", json=data_use("u-2", "G-1", nhs_numbers=numbers,
                                                            opt_out_state_position=last), headers=sde)
    assert r.status == 201, await r.text()

    # The register shows who approved what, and when; and the public can check it against the log.
    register = await (await governed.get("/v1/register")).json()
    (row,) = register["grants"]
    assert row["status"] == "active" and row["pending"] == []
    assert [(a["approval"], a["organisation"]["code"]) for a in row["approvals"]] == [
        (kind, org) for kind, _, org in parties]
    page = await (await governed.get("/register/G-1")).text()
    assert "research ethics committee" in page and "REC-NE/2026/1" in page and "Still needed" not in page


async def test_approvals_from_the_wrong_party_are_refused(governed: TestClient, make_token):
    proposer = auth(make_token("dac", org="NHSE-DARS"))
    await governed.post("/v1/grants", json=grant("G-251", legal_basis="section-251", opt_out_exemption={
        "basis": "s251-cag", "reference": "21/CAG/0042"}), headers=proposer)
    view = await (await governed.get("/v1/grants/G-251", headers=proposer)).json()
    assert view["pending"] == ["dac-decision", "cag", "ethics"]

    async def approve(kind: str, role: str, org: str | None, status: int, says: str, **extra) -> None:
        r = await governed.post("/v1/grants/G-251/approvals", json={**_approval(kind), **extra},
                                headers=auth(make_token(role, org=org)))
        body = await r.json()
        assert r.status == status and (status < 300 or says in body["detail"]), body

    await approve("cag", "dac", "IGARD", 403, "recorded by the 'cag' role")            # wrong role for the kind
    await approve("dac-decision", "dac", "NHSE-DARS", 403, "may not approve its own proposal")
    await approve("dac-decision", "dac", None, 403, "needs an `org` claim")
    await approve("lay-panel", "lay-panel", "PANEL", 422, "does not need a 'lay-panel' approval")
    await approve("dac-decision", "sde", "SDE-NORTH", 403, "")                          # not an approver at all
    await approve("dac-decision", "dac", "IGARD", 201, "")
    await approve("dac-decision", "dac", "OTHER-DAC", 409, "already recorded by IGARD")
    await approve("cag", "cag", "IGARD", 403, "each approval must come from a distinct organisation")
    await approve("cag", "cag", "HRA-CAG", 201, "")
    r = await governed.post("/v1/grants/G-251/revoke", json={"reason": "withdrawn by the applicant"},
                            headers=proposer)
    assert r.status == 201
    await approve("ethics", "ethics-committee", "REC-NE", 422, "was revoked")
    await approve("ethics", "ethics-committee", "REC-NE", 422, "allowed: board-fairness, cag", approval="pension-board")
    r = await governed.post("/v1/grants/G-NONE/approvals", json=_approval("ethics"),
                            headers=auth(make_token("ethics-committee", org="REC-NE")))
    assert r.status == 404


async def test_a_proposal_needs_the_proposers_organisation(governed: TestClient, make_token):
    r = await governed.post("/v1/grants", json=grant("G-2"), headers=auth(make_token("dac")))
    assert r.status == 403 and "`org` claim" in (await r.json())["detail"]


def test_the_approval_policy_is_configuration_with_a_documented_default():
    assert config.load({"CONSENT_LEDGER_ENV": "production", "CONSENT_LEDGER_JWKS": "x"}).approvals == \
        approvals.PRODUCTION_POLICY
    assert config.load({}).approvals == ()  # development: grants are in force at once
    assert config.load({"CONSENT_LEDGER_APPROVALS": "dac-decision:all,lay-panel:commercial"}).approvals == (
        ("dac-decision", "all"), ("lay-panel", "commercial"))
    for bad, says in (("dac:all", "is not an approval"), ("cag:sometimes", "condition after ':'")):
        with pytest.raises(ConfigError, match=says):
            config.load({"CONSENT_LEDGER_APPROVALS": bad})
    assert approvals.required(approvals.PRODUCTION_POLICY, "section-251", "planning", True) == [
        "dac-decision", "cag", "lay-panel", "board-fairness"]
    assert approvals.required(approvals.PRODUCTION_POLICY, "public-task-health-care", "planning", False) == [
        "dac-decision"]


async def test_the_public_can_check_the_approvals_the_register_shows(governed: TestClient, make_token, database):
    proposer = auth(make_token("dac", org="NHSE-DARS"))
    await governed.post("/v1/grants", json=grant("G-3"), headers=proposer)
    last = 0
    for kind, role, org in (("dac-decision", "dac", "IGARD"), ("ethics", "ethics-committee", "REC-NE")):
        r = await governed.post("/v1/grants/G-3/approvals", json=_approval(kind, f"{org}-7", org),
                                headers=auth(make_token(role, org=org)))
        last = (await r.json())["position"]
    await settled(governed, last)
    honest = await verified_register(governed)
    assert honest.ok, honest.report()
    owner = await database.connect_owner()
    try:
        await owner.execute("DELETE FROM grant_approvals WHERE approval = 'ethics'")
    finally:
        await owner.close()
    tampered = await verified_register(governed)
    found = {(f.where, f.what.split(":")[0]) for f in tampered.findings}
    assert {("G-3", "status"), ("G-3", "approvals"), ("G-3", "pending")} <= found, tampered.report()

"""A register the public can verify (issue 12, item 3): public entries with
their inclusion proofs, and `verify-register` rebuilding the register from
them and catching every row the log does not support."""

from __future__ import annotations

import asyncio
import hashlib
import sys

import pytest
from aiohttp.test_utils import TestClient

from contracts import merkle, note
from live_server import ROOT
from samples import auth, data_use, grant, nhs_numbers, settled, verified_register
from service.audit.client import HttpSource, SourceError
from service.audit.register import verify_register
from service.http.keys import CHECKPOINTS


async def _ledger(client: TestClient, make_token, *, small_use: bool) -> dict[str, int]:
    dac, sde = auth(make_token("dac")), auth(make_token("sde", org="SDE-NORTH"))
    positions = {}
    for grant_id in ("G-1", "G-2", "G-3"):
        r = await client.post("/v1/grants", json=grant(grant_id), headers=dac)
        assert r.status == 201, await r.text()
        positions[grant_id] = (await r.json())["position"]
    r = await client.post("/v1/grants/G-3/revoke", json={"reason": "ethics approval lapsed"}, headers=dac)
    assert r.status == 201, await r.text()
    # The filter waits until its state includes the grants; then every use is allowed.
    r = await client.post(f"/v1/opt-out-filter?grant_id=G-1&min_position={positions['G-3']}",
                          json={"nhs_numbers": nhs_numbers(12, seed=21)}, headers=sde)
    assert r.status == 200, await r.text()
    cohorts = [nhs_numbers(12, seed=21), nhs_numbers(15, seed=22)] + ([nhs_numbers(3, seed=23)] if small_use else [])
    for i, members in enumerate(cohorts):
        r = await client.post("/v1/data-uses", json=data_use(f"use-{i}", "G-1", nhs_numbers=members), headers=sde)
        assert r.status == 201, await r.text()
        positions[f"use-{i}"] = (await r.json())["position"]
    return positions


async def test_public_entries_carry_proofs_and_leave_out_personal_data(client: TestClient, make_token):
    await client.post(f"/v1/patients/{nhs_numbers(1, seed=24)[0]}/opt-out",
                      json={"scope": "national", "channel": "app", "actor": {"kind": "patient"}},
                      headers=auth(make_token("patient-app")))
    positions = await _ledger(client, make_token, small_use=True)
    await settled(client, max(positions.values()))
    checkpoint = await (await client.get("/checkpoint")).text()
    cp = note.open_checkpoint(checkpoint, client.server.app[CHECKPOINTS].verifiers)
    page = await (await client.get("/v1/public-entries", params={"tree_size": cp.size})).json()
    assert page["tree_size"] == cp.size and page["withheld"] == 1 and page["next_after"] is None
    types = [e["event_type"] for e in page["entries"]]
    assert types == ["AccessGranted"] * 3 + ["AccessRevoked"] + ["DataUseRecorded"] * 2
    for e in page["entries"]:
        leaf = hashlib.sha256(b"\x00" + e["entry"].encode()).digest()
        assert leaf.hex() == e["leaf_hash"]
        merkle.verify_inclusion(e["position"] - 1, cp.size, leaf, [bytes.fromhex(h) for h in e["proof"]], cp.root)
        assert '"nhs_number"' not in e["entry"]
    # One entry per page, following next_after, gives the same entries (the withheld one counted on its page).
    seen, withheld, after = [], 0, 0
    while after is not None:
        one = await (await client.get("/v1/public-entries",
                                      params={"after": after, "limit": 1, "tree_size": cp.size})).json()
        seen += [e["position"] for e in one["entries"]]
        withheld += one["withheld"]
        after = one["next_after"]
    assert seen == [e["position"] for e in page["entries"]] and withheld == 1
    assert (await client.get("/v1/public-entries", params={"tree_size": cp.size + 1000})).status == 404
    assert (await client.get("/v1/public-entries", params={"limit": 0})).status == 400


async def test_verify_register_passes_the_honest_register_and_names_every_tampered_row(
        client: TestClient, make_token, database):
    positions = await _ledger(client, make_token, small_use=False)
    await settled(client, max(positions.values()))
    honest = await verified_register(client)
    assert honest.ok and honest.grants == 3 and honest.rebuilt.entries == 6, honest.report()
    assert honest.report().startswith("OK: 3 register row(s) match the log")

    # Someone with write access to the read model edits the register.
    owner = await database.connect_owner()
    try:
        await owner.execute("UPDATE grants_view SET purpose_description = 'Tampered', uses = uses + 5"
                            " WHERE grant_id = 'G-1'")
        await owner.execute("UPDATE grants_view SET revoked_position = NULL, revoked_at = NULL WHERE grant_id = 'G-3'")
        await owner.execute("DELETE FROM grants_view WHERE grant_id = 'G-2'")
        await owner.execute("CREATE TEMP TABLE fake AS SELECT * FROM grants_view WHERE grant_id = 'G-1';"
                            " UPDATE fake SET grant_id = 'G-FAKE'; INSERT INTO grants_view SELECT * FROM fake")
    finally:
        await owner.close()
    tampered = await verified_register(client)
    found = {(f.where, f.what.split(":")[0]) for f in tampered.findings}
    assert not tampered.ok
    assert ("G-1", "purpose_description") in found and ("G-1", "uses") in found
    assert ("G-3", "status") in found and ("G-3", "revoked_position") in found
    assert ("G-2", "the log records this grant (position 2) but the register does not show it") in found
    assert ("G-FAKE", "no public entry in the log records this grant") in found

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli.main", "verify-register", "--url", str(client.make_url("")),
        "--key", client.server.app[CHECKPOINTS].verifiers[0].vkey,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT)
    out = (await process.communicate())[0].decode()
    assert process.returncode == 1 and out.startswith("FAILED: ") and "G-FAKE" in out, out


async def test_a_small_use_is_withheld_and_use_counts_become_lower_bounds(client: TestClient, make_token):
    positions = await _ledger(client, make_token, small_use=True)
    await settled(client, max(positions.values()))
    outcome = await verified_register(client)
    assert outcome.ok and outcome.rebuilt.withheld == 1 and outcome.rebuilt.uses["G-1"] == 2, outcome.report()
    assert "1 data use(s) of fewer than 10 patients are not public" in outcome.report()


async def test_verify_register_refuses_a_checkpoint_signed_by_another_key(client: TestClient):
    await settled(client, 0)
    stranger = note.Signer.generate("consent-ledger.example/log").verifier
    with pytest.raises(SourceError, match="does not verify with the given key"):
        await asyncio.to_thread(verify_register, HttpSource(str(client.make_url("")), None), [stranger])

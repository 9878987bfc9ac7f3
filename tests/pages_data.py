"""A small ledger for the page tests, written through the public API: opt-outs
through two channels (one cell under the suppression threshold), an opt-in,
a research grant with a use, and a commercial grant whose text tries to
inject HTML."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

import aiohttp

from samples import auth, choice, data_use, grant, nhs_numbers

HOSTILE = "<script>alert('x')</script> & <b>bold</b>"


@dataclass
class Filled:
    patients: list[str]
    opted_out: list[str]
    opted_back_in: str
    use_position: int
    head: int


async def fill(session: aiohttp.ClientSession, base: str, make_token: Callable[..., str]) -> Filled:
    app, dac = auth(make_token("patient-app")), auth(make_token("dac"))
    sde = auth(make_token("sde", org="SDE-NORTH"))
    patients = nhs_numbers(40, seed=16)

    async def post(path: str, body: object, headers: dict[str, str], status: int = 201) -> dict:
        async with session.post(base + path, json=body, headers=headers) as r:
            assert r.status == status, await r.text()
            return await r.json()

    for nhs in patients[:12]:
        await post(f"/v1/patients/{nhs}/opt-out", choice(), app)
    for nhs in patients[12:15]:
        await post(f"/v1/patients/{nhs}/opt-out", choice(channel="phone"), app)
    await post(f"/v1/patients/{patients[0]}/opt-in", choice(), app)
    await post("/v1/grants", grant("G-RESEARCH"), dac)
    granted = await post("/v1/grants", grant("G-COMMERCIAL", org="PHARMA-1", commercial=True, purpose={
        "code": "planning", "description": HOSTILE, "patient_benefit": "Cheaper medicines"}), dac)
    allowed = (await post(f"/v1/opt-out-filter?grant_id=G-RESEARCH&min_position={granted['position']}",
                          {"nhs_numbers": patients[:30]}, sde,
                          status=200))["nhs_numbers"]
    use = await post("/v1/data-uses", data_use("release-1", "G-RESEARCH", nhs_numbers=allowed), sde)
    # The pages read projections: wait until they have applied every write above.
    for _ in range(200):
        async with session.get(base + "/v1/register") as r:
            register = await r.json()
        async with session.get(f"{base}/v1/patients/{patients[1]}/choices",
                               headers=auth(make_token("patient-app", nhs_number=patients[1]))) as r:
            choices = await r.json()
        if register["as_of"] >= use["position"] and choices["as_of"] >= use["position"]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the projections did not catch up")
    for _ in range(200):  # and until a checkpoint covers them
        async with session.get(base + "/checkpoint") as r:
            head = int((await r.text()).split("\n")[1])
        if head >= use["position"]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no checkpoint covers the writes")
    return Filled(patients, patients[1:15], patients[0], use["position"], head)

"""Sample data and small helpers shared by the tests."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

from contracts.nhs_number import NhsNumber, check_digit
from service.store.database import Database

VALID = ["9434765919", "4010232137", "9990000026"]
WRONG_CHECK_DIGIT = ["9434765918", "4857773456", "9990000027"]


def nhs_numbers(count: int, seed: int = 1, prefix: int = 999) -> list[str]:
    """Distinct valid test-range NHS numbers (starting 999)."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < count:
        stem = f"{prefix}{rng.randrange(10**6):06d}"
        if check_digit(stem) is not None:
            out.add(NhsNumber.from_stem(int(stem)))
    return sorted(out)


def auth(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def choice(scope: str = "national", **overrides: Any) -> dict[str, Any]:
    return {"scope": scope, "channel": "app", "actor": {"kind": "patient"}, **overrides}


def grant(grant_id: str = "DARS-2026-0001", org: str = "SDE-NORTH", **overrides: Any) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    body = {
        "grant_id": grant_id,
        "organisation": {"code": org, "name": "North Secure Data Environment"},
        "purpose": {
            "code": "research",
            "description": "Cardiovascular outcomes after statin switching",
            "patient_benefit": "Safer prescribing for people with heart disease",
        },
        "legal_basis": "public-task-research",
        "datasets": ["hes-apc", "gp-prescribing"],
        "commercial": False,
        "exclusive": False,
        "valid_from": (now - timedelta(days=1)).isoformat(),
        "valid_until": (now + timedelta(days=365)).isoformat(),
        "approved_by": "Independent Group Advising on the Release of Data",
    }
    body.update(overrides)
    return body


def data_use(use_id: str, grant_id: str = "DARS-2026-0001", **overrides: Any) -> dict[str, Any]:
    body = {
        "use_id": use_id,
        "grant_id": grant_id,
        "purpose": "research",
        "datasets": ["hes-apc"],
        "occurred_at": datetime.now(timezone.utc).isoformat(),
        "access_method": "sde",
    }
    body.update(overrides)
    return body


async def head_position(database: Database) -> int:
    conn = await database.connect_owner()
    try:
        return await conn.fetchval("SELECT position FROM ledger_head")
    finally:
        await conn.close()


async def settled(client: Any, position: int) -> None:
    """Until the register (the uses projection) and a signed checkpoint both reach ``position``."""
    import asyncio

    for _ in range(200):
        register = await (await client.get("/v1/register")).json()
        size = int((await (await client.get("/checkpoint")).text()).split("\n")[1])
        if register["as_of"] >= position and size >= position:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the register or the checkpoint did not catch up")


async def verified_register(client: Any) -> Any:
    """`verify-register` against the app behind ``client``, with its own log key (off the event loop)."""
    import asyncio

    from service.audit.client import HttpSource
    from service.audit.register import verify_register
    from service.http.keys import CHECKPOINTS

    keys = client.server.app[CHECKPOINTS].verifiers
    return await asyncio.to_thread(verify_register, HttpSource(str(client.make_url("")), None), keys)

"""A straightforward reference for the projections, folded in the test from
the raw ledger events, plus helpers to drive the ledger in-process."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import asyncpg
import msgspec

from contracts.bodies import ChoiceRequest, ConsentRequest, DataUseRequest, GrantRequest
from contracts.entry import Entry, decode_entry
from contracts.nhs_number import NhsNumber
from contracts.values import Actor
from samples import grant as grant_body
from service.app.caller import Caller
from service.app.ledger import Ledger
from service.app.ledger import Contended
from service.domain.errors import NotFound, RuleBroken
from service.store.event_log import StoreError

DAC = Caller(subject="dac-test", roles=frozenset({"dac"}))
APP = Caller(subject="app-test", roles=frozenset({"patient-app"}))
SDE = Caller(subject="sde-test", roles=frozenset({"sde"}), org="SDE-NORTH")


async def all_entries(conn: asyncpg.Connection) -> list[Entry]:
    return [decode_entry(r[0]) for r in await conn.fetch("SELECT entry FROM ledger_events ORDER BY position")]


@dataclass
class Reference:
    choices: dict[tuple[int, str], tuple[bool, int]] = field(default_factory=dict)
    consents: dict[tuple[int, str], int] = field(default_factory=dict)
    exempt: dict[str, bool] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    events_by_stem: dict[int, list[Entry]] = field(default_factory=dict)
    uses: list[Entry] = field(default_factory=list)
    head: int = 0

    @classmethod
    def fold(cls, entries: list[Entry]) -> "Reference":
        ref = cls()
        for e in entries:
            p = e.payload
            ref.head = e.position
            if e.event_type in ("OptOutRegistered", "OptOutWithdrawn"):
                stem = int(p.nhs_number[:9])
                ref.choices[(stem, p.scope)] = (e.event_type == "OptOutRegistered", e.position)
                ref.events_by_stem.setdefault(stem, []).append(e)
            elif e.event_type in ("StudyConsentGiven", "StudyConsentWithdrawn"):
                stem = int(p.nhs_number[:9])
                if e.event_type == "StudyConsentGiven":
                    ref.consents[(stem, p.grant_id)] = e.position
                else:
                    ref.consents.pop((stem, p.grant_id), None)
                ref.events_by_stem.setdefault(stem, []).append(e)
            elif e.event_type == "AccessGranted":
                ref.exempt[p.grant_id] = p.opt_out_exemption is not None
            elif e.event_type == "AccessRevoked":
                ref.revoked.add(p.grant_id)
            elif e.event_type == "DataUseRecorded":
                ref.uses.append(e)
        return ref

    def opted_out(self, stem: int) -> bool:
        return any(v[0] for (s, _), v in self.choices.items() if s == stem)

    def may_use(self, stem: int, grant_id: str | None) -> bool:
        if grant_id in self.revoked:
            return False
        if grant_id is not None and self.exempt.get(grant_id):
            return True
        if not self.opted_out(stem):
            return True
        return grant_id is not None and (stem, grant_id) in self.consents

    def history(self, stem: int, cohorts: dict[str, set[int]]) -> list[tuple[int, str]]:
        items = [(e.position, e.event_type) for e in self.events_by_stem.get(stem, [])]
        items += [(u.position, "DataUseRecorded") for u in self.uses if stem in cohorts[u.payload.cohort_id]]
        return sorted(items, reverse=True)


def grant_request(grant_id: str, exemption: bool) -> GrantRequest:
    body = grant_body(grant_id)
    if exemption:
        body["opt_out_exemption"] = {"basis": "s251-cag", "reference": f"CAG-{grant_id}"}
    return msgspec.convert(body, GrantRequest)


async def random_operation(rng: random.Random, ledger: Ledger, patients: list[str], grants: list[str],
                           cohorts: dict[str, set[int]], counter: list[int], allowed: Any = None) -> None:
    """One random command; refusals by ledger rules are part of the game."""
    kind = rng.choices(["choice", "consent", "withdraw", "grant", "revoke", "use"], [8, 3, 2, 1, 0.3, 2])[0]
    nhs = NhsNumber(rng.choice(patients))
    actor = {"kind": "patient"}
    try:
        if kind == "choice" or not grants and kind in ("consent", "withdraw", "revoke", "use"):
            req = msgspec.convert({"scope": rng.choice(["national", "type-1"]), "channel": "app", "actor": actor},
                                  ChoiceRequest)
            await ledger.choose(APP, nhs, rng.random() < 0.6, req, None)
        elif kind == "consent":
            req = msgspec.convert({"grant_id": rng.choice(grants), "actor": actor}, ConsentRequest)
            await ledger.give_consent(APP, nhs, req, None)
        elif kind == "withdraw":
            await ledger.withdraw_consent(APP, nhs, rng.choice(grants), Actor(kind="patient"), None)
        elif kind == "grant":
            gid = f"G-{len(grants) + 1}"
            await ledger.create_grant(DAC, grant_request(gid, exemption=rng.random() < 0.3), None)
            grants.append(gid)
        elif kind == "revoke":
            await ledger.revoke_grant(DAC, rng.choice(grants), "test", None)
        else:
            grant_id = rng.choice(grants)
            pool = allowed(patients, grant_id) if allowed is not None and rng.random() < 0.7 else patients
            if not pool:
                return
            members = rng.sample(pool, rng.randint(1, len(pool)))
            counter[0] += 1
            now = datetime.now(timezone.utc)
            req = msgspec.convert({
                "use_id": f"U-{counter[0]}", "grant_id": grant_id, "purpose": "research",
                "datasets": ["hes-apc"], "occurred_at": now.isoformat(),
                "access_method": "sde", "nhs_numbers": members,
            }, DataUseRequest, dec_hook=lambda t, v: NhsNumber(v) if t is NhsNumber else v)
            outcome = await ledger.record_data_use(SDE, req, None)
            entry = (await ledger.store.read_positions([outcome.receipt.position]))[0].entry
            cohorts[entry.payload.cohort_id] = {int(m[:9]) for m in members}
    except (RuleBroken, NotFound, StoreError, Contended):
        pass


def stems_of(numbers: list[str]) -> Any:
    import numpy as np

    return np.array([int(n[:9]) for n in numbers], dtype=np.uint32)

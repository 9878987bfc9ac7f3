"""A data use is decided on a snapshot and appended later; anything that
lands in between and would change the decision must be caught by the append
condition.  An assessor that writes the 'in-between' event while the
decision is being made makes the race deterministic."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from contracts.bodies import ChoiceRequest, DataUseRequest, GrantRequest
from contracts.nhs_number import NhsNumber
from contracts.values import Actor, Organisation, PurposeStatement
from samples import nhs_numbers
from service.app.caller import Caller
from service.app.ledger import Ledger
from service.app.assessors import LedgerOptOutAssessor
from service.domain.errors import RuleBroken

APP = Caller(subject="app", roles=frozenset({"patient-app"}))
DAC = Caller(subject="dac", roles=frozenset({"dac"}))
SDE = Caller(subject="sde", roles=frozenset({"sde"}), org="SDE-NORTH")


class MeanwhileAssessor(LedgerOptOutAssessor):
    """Assesses honestly, then (once) lets another write land before the append."""

    def __init__(self, store, meanwhile):
        super().__init__(store)
        self.meanwhile = meanwhile
        self.calls = 0

    async def assess(self, conn, stems, grant_id, terms, position):
        assessment = await super().assess(conn, stems, grant_id, terms, position)
        self.calls += 1
        if self.calls == 1:
            await self.meanwhile()
        return assessment


def _grant(grant_id: str) -> GrantRequest:
    now = datetime.now(timezone.utc)
    return GrantRequest(
        grant_id=grant_id, organisation=Organisation(code="SDE-NORTH", name="North SDE"),
        purpose=PurposeStatement(code="research", description="d", patient_benefit="b"),
        legal_basis="public-task-research", datasets=["hes-apc"], commercial=False, exclusive=False,
        valid_from=now - timedelta(days=1), valid_until=now + timedelta(days=30), approved_by="IGARD",
    )


def _use(use_id: str, cohort: list[str]) -> DataUseRequest:
    # Occurring a little ahead (within the clock skew allowed): a change recorded
    # before then applies to the use, so the in-between write must be caught.
    return DataUseRequest(use_id=use_id, grant_id="G1", purpose="research", datasets=["hes-apc"],
                          occurred_at=datetime.now(timezone.utc) + timedelta(minutes=2), access_method="sde",
                          nhs_numbers=[NhsNumber(n) for n in cohort])


async def test_an_opt_out_landing_mid_decision_is_caught(store):
    cohort = nhs_numbers(10, seed=3)
    plain = Ledger(store)
    await plain.create_grant(DAC, _grant("G1"), None)

    async def opt_out():
        await plain.choose(APP, NhsNumber(cohort[4]), True,
                           ChoiceRequest(scope="national", channel="app", actor=Actor(kind="patient")), None)

    racing = Ledger(store, MeanwhileAssessor(store, opt_out))
    with pytest.raises(RuleBroken, match="1 patient"):
        await racing.record_data_use(SDE, _use("U1", cohort), None)
    assert racing.assessor.calls == 2  # decided again on the newer state
    assert (await store.head())[0] == 2  # the grant and the opt-out; no data use


async def test_a_revocation_landing_mid_decision_is_caught(store):
    cohort = nhs_numbers(10, seed=4)
    plain = Ledger(store)
    await plain.create_grant(DAC, _grant("G1"), None)

    async def revoke():
        await plain.revoke_grant(DAC, "G1", "breach", None)

    racing = Ledger(store, MeanwhileAssessor(store, revoke))
    with pytest.raises(RuleBroken, match="revoked"):
        await racing.record_data_use(SDE, _use("U1", cohort), None)
    assert (await store.head())[0] == 2


async def test_an_unrelated_write_mid_decision_does_not_block(store):
    cohort = nhs_numbers(10, seed=5)
    plain = Ledger(store)
    await plain.create_grant(DAC, _grant("G1"), None)

    async def someone_else():
        await plain.choose(APP, NhsNumber("9434765919"), True,
                           ChoiceRequest(scope="national", channel="app", actor=Actor(kind="patient")), None)

    racing = Ledger(store, MeanwhileAssessor(store, someone_else))
    outcome = await racing.record_data_use(SDE, _use("U1", cohort), None)
    assert outcome.created and outcome.receipt.position == 3
    assert racing.assessor.calls == 1

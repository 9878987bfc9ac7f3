"""`consent-ledger demo`: realistic synthetic data through the real write path.

Test-range NHS numbers (999 000 000 0 to 999 999 999 9, valid check digits:
never issued to a real patient, and only 909,091 of them exist), opt-outs at
the national rate (~5.4%), a few proxy and type-1 choices, grants from a
data access committee, and data uses whose cohorts are filtered the way an
SDE would: through the opt-out filter, at the ledger's current state, so
choices written by anyone else since are honoured too (one grant carries a
s251 exemption and so includes opted-out patients).
"""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timedelta, timezone

import numpy as np

from contracts.bodies import ChoiceRequest, ConsentRequest, DataUseRequest, GrantRequest
from contracts.nhs_number import NhsNumber
from contracts.values import Actor, Exemption, Organisation, PurposeStatement
from service.app.caller import Caller
from service.app.transparency import load_key as load_transparency_key
from service.composition import running
from service.config import Config
from service.console.failures import CommandError
from service.console.progress import Progress
from service.domain.errors import AlreadyExists
from service.store.checkpoints import load_signers
from service.store.database import locate

OPT_OUT_RATE = 0.054
TEST_RANGE_FIRST_STEM = 999_000_000


def demo_range_stems() -> np.ndarray:
    """Every stem of the test range whose check digit exists (a remainder of 10 has none)."""
    stems = np.arange(TEST_RANGE_FIRST_STEM, 10**9, dtype=np.int64)
    digits = stems[:, None] // 10 ** np.arange(8, -1, -1) % 10
    remainder = (digits * np.arange(10, 1, -1)).sum(axis=1) % 11
    return stems[remainder != 1]


MAX_PATIENTS = 909_091  # len(demo_range_stems()), checked by the tests

_GRANTS = [
    ("DARS-NIC-100001", "SDE-NORTH", "North Secure Data Environment", "research", "public-task-research",
     "Heart failure readmissions after discharge", "Fewer avoidable readmissions", ["hes-apc", "gp-prescribing"], None),
    ("DARS-NIC-100002", "ICB-LONDON-NW", "North West London ICB", "planning", "public-task-health-care",
     "Winter bed capacity planning", "Shorter waits for emergency admission", ["hes-apc", "ecds"], None),
    ("DARS-NIC-100003", "UKHSA", "UK Health Security Agency", "public-health", "public-task-public-health",
     "Cancer registration and outcomes", "Earlier diagnosis of cancer", ["cancer-registry", "hes-apc"],
     Exemption(basis="s251-cag", reference="CAG 10-02(d)/2026")),
]


def _patients(count: int, rng: random.Random) -> list[NhsNumber]:
    if not 1 <= count <= MAX_PATIENTS:
        raise CommandError(f"--patients {count:,}: the demo takes 1 to {MAX_PATIENTS:,} patients, because it uses only "
                           f"test-range NHS numbers (starting 999, never issued to real patients) and only "
                           f"{MAX_PATIENTS:,} of those have a valid check digit")
    stems = demo_range_stems()
    return sorted(NhsNumber.from_stem(int(stems[i])) for i in rng.sample(range(len(stems)), count))


async def run_demo(config: Config, *, patients: int, seed: int) -> str:
    rng = random.Random(seed)
    people = _patients(patients, rng)
    database = await locate(config)
    app = Caller(subject="demo-patient-app", roles=frozenset({"patient-app"}))
    dac = Caller(subject="demo-dac", roles=frozenset({"dac"}))
    now = datetime.now(timezone.utc)
    signers, _ = load_signers(config)
    # The opt-out filter an SDE would call follows the ledger as the service's
    # does; the projection tables are left to the next `serve`, which catches up.
    following = dataclasses.replace(config, projection_poll_interval=0.05)
    async with running(following, database, signers=signers, projections=(),
                       transparency_key=load_transparency_key(config)) as parts:
        ledger, store, runner, optouts = parts.ledger, parts.store, parts.runner, parts.opt_out_filter
        assert runner is not None and optouts is not None
        # The demo may run again on the same data: say what was already there
        # instead of failing on the first grant or data use that exists.
        existing = {"opt-outs": 0, "grants": 0, "study consents": 0, "data uses": 0}
        opted_out = []
        with Progress("demo", len(people), unit="patients") as progress:
            for nhs in people:
                if rng.random() < OPT_OUT_RATE:
                    proxy = rng.random() < 0.1
                    actor = Actor(kind="proxy", proxy_role="parent") if proxy else Actor(kind="patient")
                    scope = "type-1" if rng.random() < 0.15 else "national"
                    channel = rng.choice(["app", "online", "phone", "post", "gp-practice"])
                    outcome = await ledger.choose(
                        app, nhs, True, ChoiceRequest(scope=scope, channel=channel, actor=actor), None
                    )
                    existing["opt-outs"] += not outcome.created
                    opted_out.append(nhs)
                progress.advance()
        for grant_id, org, org_name, purpose, basis, description, benefit, datasets, exemption in _GRANTS:
            try:
                await ledger.create_grant(dac, GrantRequest(
                    grant_id=grant_id,
                    organisation=Organisation(code=org, name=org_name),
                    purpose=PurposeStatement(code=purpose, description=description, patient_benefit=benefit),
                    legal_basis=basis, datasets=datasets, commercial=False, exclusive=False,
                    valid_from=now - timedelta(days=30), valid_until=now + timedelta(days=700),
                    approved_by="Independent Group Advising on the Release of Data",
                    opt_out_exemption=exemption,
                ), None)
            except AlreadyExists:
                existing["grants"] += 1
        # A few opted-out patients consent to the research study all the same.
        consenting = rng.sample(opted_out, k=min(3, len(opted_out)))
        for nhs in consenting:
            outcome = await ledger.give_consent(
                app, nhs, ConsentRequest(grant_id=_GRANTS[0][0], actor=Actor(kind="patient")), None
            )
            existing["study consents"] += not outcome.created
        uses = skipped = 0
        for i in range(12):
            grant_id, org, *_rest, datasets, exemption = _GRANTS[i % len(_GRANTS)]
            cohort = np.array(sorted(n.stem for n in rng.sample(people, k=max(1, len(people) // 4))),
                              dtype=np.uint32)
            # As an SDE would: the filter at the ledger's head now (POST /v1/opt-out-filter?grant_id=...).
            head, _ = await store.head()
            await runner.wait_for(head, 30.0, lambda: optouts.position)
            filtered = optouts.snapshot().filter(cohort, grant_id, optouts.terms(grant_id, datetime.now(timezone.utc)))
            if not filtered.keep.any():
                skipped += 1  # everyone in it has opted out since: an SDE would release nothing
                continue
            sde = Caller(subject=f"demo-{org.lower()}", roles=frozenset({"sde"}), org=org)
            try:
                await ledger.record_data_use(sde, DataUseRequest(
                    use_id=f"{grant_id}-use-{i + 1:03d}", grant_id=grant_id,
                    purpose=_GRANTS[i % len(_GRANTS)][3], datasets=datasets[:1],
                    # Uses are judged when they occur: after the grants were recorded.
                    occurred_at=datetime.now(timezone.utc), access_method="sde" if i % 2 else "extract",
                    nhs_numbers=[NhsNumber.from_stem(int(s)) for s in cohort[filtered.keep]],
                    opt_out_state_position=filtered.as_of or None,
                ), None)
            except AlreadyExists:
                existing["data uses"] += 1
            uses += 1
        head, _ = await store.head()
    already = ", ".join(f"{count} {what}" for what, count in existing.items() if count)
    return (
        f"demo loaded: {len(people)} patients, {len(opted_out)} opt-outs "
        f"({len(opted_out) / max(1, len(people)):.1%}), {len(_GRANTS)} grants, {len(consenting)} study consents, "
        f"{uses} data uses; ledger head at position {head}"
        + (f"; already recorded before this run: {already}" if already else "")
        + (f"; {skipped} data uses skipped: everyone in their cohort has opted out" if skipped else "")
    )

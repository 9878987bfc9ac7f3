"""`consent-ledger demo`: realistic synthetic data through the real write path.

Test-range NHS numbers (starting 999, valid check digits), opt-outs at the
national rate (~5.4%), a few proxy and type-1 choices, grants from a data
access committee, and data uses whose cohorts are filtered the way an SDE
would (one grant carries a s251 exemption and so includes opted-out patients).
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from contracts.bodies import ChoiceRequest, ConsentRequest, DataUseRequest, GrantRequest
from contracts.nhs_number import NhsNumber, check_digit
from contracts.values import Actor, Exemption, Organisation, PurposeStatement

from .commands import Caller, Ledger
from .domain import AlreadyExists
from .config import Config
from .database import locate
from .schema import migrate
from .store import EventStore

OPT_OUT_RATE = 0.054

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
    out: set[NhsNumber] = set()
    while len(out) < count:
        stem = f"999{rng.randrange(10**6):06d}"
        if check_digit(stem) is not None:
            out.add(NhsNumber.from_stem(int(stem)))
    return sorted(out)


async def run_demo(config: Config, *, patients: int, seed: int) -> str:
    rng = random.Random(seed)
    database = await locate(config)
    conn = await database.connect_owner()
    try:
        await migrate(conn)
    finally:
        await conn.close()
    pool = await database.create_pool()
    store = EventStore(pool)
    store.start()
    ledger = Ledger(store)
    app = Caller(subject="demo-patient-app", roles=frozenset({"patient-app"}))
    dac = Caller(subject="demo-dac", roles=frozenset({"dac"}))
    now = datetime.now(timezone.utc)
    try:
        people = _patients(patients, rng)
        opted_out = set()
        # The demo may run again on the same data: say what was already there
        # instead of failing on the first grant or data use that exists.
        existing = {"opt-outs": 0, "grants": 0, "study consents": 0, "data uses": 0}
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
                opted_out.add(nhs)
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
        consenting = rng.sample(sorted(opted_out), k=min(3, len(opted_out)))
        for nhs in consenting:
            outcome = await ledger.give_consent(
                app, nhs, ConsentRequest(grant_id=_GRANTS[0][0], actor=Actor(kind="patient")), None
            )
            existing["study consents"] += not outcome.created
        uses = 0
        for i in range(12):
            grant_id, org, *_rest, datasets, exemption = _GRANTS[i % len(_GRANTS)]
            cohort = rng.sample(people, k=max(1, len(people) // 4))
            if exemption is None:
                cohort = [n for n in cohort if n not in opted_out or (grant_id == _GRANTS[0][0] and n in consenting)]
            sde = Caller(subject=f"demo-{org.lower()}", roles=frozenset({"sde"}), org=org)
            try:
                await ledger.record_data_use(sde, DataUseRequest(
                    use_id=f"{grant_id}-use-{i + 1:03d}", grant_id=grant_id,
                    purpose=_GRANTS[i % len(_GRANTS)][3], datasets=datasets[:1],
                    # Uses are judged when they occur: after the grants were recorded.
                    occurred_at=datetime.now(timezone.utc), access_method="sde" if i % 2 else "extract",
                    nhs_numbers=cohort,
                ), None)
            except AlreadyExists:
                existing["data uses"] += 1
            uses += 1
        head, _ = await store.head()
    finally:
        await store.stop()
        await pool.close()
    already = ", ".join(f"{count} {what}" for what, count in existing.items() if count)
    return (
        f"demo loaded: {len(people)} patients, {len(opted_out)} opt-outs "
        f"({len(opted_out) / max(1, len(people)):.1%}), {len(_GRANTS)} grants, {len(consenting)} study consents, "
        f"{uses} data uses; ledger head at position {head}"
        + (f"; already recorded before this run: {already}" if already else "")
    )

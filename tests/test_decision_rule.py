"""The one rule, differentially: random histories of opt-outs, opt-ins,
consents, withdrawals, grants, revocations and data uses, and at every
position, for every patient and grant, the opt-out filter (following the
log), the data-use assessor (answering for an earlier position), the
history's explanation and `verify --decisions` must all agree with a plain
reference folded here from the events alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import cohort as cohorts
from contracts import decision
from contracts.decision import Reason
from contracts.entry import decode_entry, encode_entry, format_recorded_at
from contracts.events import (
    AccessGranted,
    AccessRevoked,
    DataUseRecorded,
    GrantApproved,
    OptOutRegistered,
    OptOutWithdrawn,
    StudyConsentGiven,
    StudyConsentWithdrawn,
)
from contracts.nhs_number import NhsNumber
from contracts.values import Actor, Exemption, Organisation, PurposeStatement
from projections.optout_filter import OptOutFilter
from projections.reads import _Choices
from service.audit.decisions import DecisionAudit

PATIENTS = [str(NhsNumber.from_stem(s)) for s in (999_000_002, 999_000_010, 999_000_029, 999_000_037)]
STEMS = np.array([int(p[:9]) for p in PATIENTS], dtype=np.uint32)
GRANTS = ["G-A", "G-B", "G-C"]
BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
ACTOR = Actor(kind="patient")


def at(second: int) -> datetime:
    return BASE + timedelta(seconds=second)


operation = st.one_of(
    st.tuples(st.sampled_from(["opt-out", "opt-in"]), st.integers(0, 3),
              st.sampled_from(["national", "type-1", "commercial", "non-research", "non-planning"])),
    st.tuples(st.sampled_from(["consent", "withdraw"]), st.integers(0, 3), st.sampled_from(GRANTS)),
    st.tuples(st.just("grant"), st.sampled_from(GRANTS), st.tuples(
        st.sampled_from(["public-task-research", "explicit-consent"]), st.booleans(),
        st.integers(-5, 25), st.integers(1, 30), st.booleans(), st.sampled_from(["research", "planning",
                                                                                  "public-health"]),
        st.sampled_from([(), ("dac-decision",), ("dac-decision", "ethics")]))),
    st.tuples(st.just("revoke"), st.sampled_from(GRANTS)),
    st.tuples(st.just("approve"), st.sampled_from(GRANTS), st.sampled_from(["dac-decision", "ethics"])),
    st.tuples(st.just("use"), st.sampled_from(GRANTS), st.sets(st.integers(0, 3), min_size=1)),
)


@dataclass
class Reference:
    """The ledger's meaning, folded plainly from the events."""

    scopes: dict[tuple[int, str], bool] = field(default_factory=dict)
    consents: set[tuple[int, str]] = field(default_factory=set)
    grants: dict[str, AccessGranted] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    approved: set[tuple[str, str]] = field(default_factory=set)

    def apply(self, event_type: str, p) -> None:
        if event_type in ("OptOutRegistered", "OptOutWithdrawn"):
            self.scopes[(int(p.nhs_number[:9]), p.scope)] = event_type == "OptOutRegistered"
        elif event_type == "StudyConsentGiven":
            self.consents.add((int(p.nhs_number[:9]), p.grant_id))
        elif event_type == "StudyConsentWithdrawn":
            self.consents.discard((int(p.nhs_number[:9]), p.grant_id))
        elif event_type == "AccessGranted":
            self.grants[p.grant_id] = p
        elif event_type == "AccessRevoked":
            self.revoked.add(p.grant_id)
        elif event_type == "GrantApproved":
            self.approved.add((p.grant_id, p.approval))

    def reason(self, stem: int, grant_id: str | None, instant: datetime) -> Reason:
        held = {scope for (s, scope), v in self.scopes.items() if s == stem and v}
        national = bool(held & {"national", "type-1"})
        if grant_id is None:
            return Reason.OPTED_OUT_EXCLUDED if national else Reason.NO_OPT_OUT
        g = self.grants.get(grant_id)
        proposed = g is not None and any((grant_id, kind) not in self.approved for kind in g.requires or ())
        if g is None or grant_id in self.revoked or proposed or not g.valid_from <= instant < g.valid_until:
            return Reason.GRANT_NOT_ACTIVE
        # No commercial use: commercial grants; research only / planning only: grants for anything else.
        covered = (("commercial" in held and g.commercial) or ("non-research" in held and g.purpose.code != "research")
                   or ("non-planning" in held and g.purpose.code != "planning"))
        opted_out = national or covered
        consented = (stem, grant_id) in self.consents
        if g.legal_basis == "explicit-consent":
            if not consented:
                return Reason.CONSENT_MISSING
            return Reason.OPTED_OUT_CONSENTED if opted_out else Reason.CONSENTED
        if not opted_out:
            return Reason.NO_OPT_OUT
        if consented:
            return Reason.OPTED_OUT_CONSENTED
        if g.opt_out_exemption:
            return Reason.OPTED_OUT_EXEMPT
        return Reason.OPTED_OUT_EXCLUDED if national else Reason.CHOICE_EXCLUDED


def build(ops) -> tuple[list[bytes], list[Reference], dict[str, bytes], set[int]]:
    """The entries, the reference after each of them, the cohorts, and the
    positions of data uses that included someone the rule keeps out."""
    entries: list[bytes] = []
    states = [Reference()]
    cohort_bytes: dict[str, bytes] = {}
    wrong: set[int] = set()

    def add(event_type: str, aggregate: str, payload) -> None:
        position = len(entries) + 1
        entries.append(encode_entry(position=position, event_id=uuid4(), event_type=event_type,
                                    aggregate_id=uuid4(), aggregate_version=1,
                                    recorded_at=format_recorded_at(at(position)), payload=payload))
        ref = Reference(dict(states[-1].scopes), set(states[-1].consents), dict(states[-1].grants),
                        set(states[-1].revoked), set(states[-1].approved))
        ref.apply(event_type, payload)
        states.append(ref)

    for op in ops:
        ref = states[-1]
        if op[0] in ("opt-out", "opt-in"):
            cls = OptOutRegistered if op[0] == "opt-out" else OptOutWithdrawn
            add(cls.__name__, str(op[1]), cls(nhs_number=PATIENTS[op[1]], scope=op[2], channel="app", actor=ACTOR,
                                               recorded_by="t"))
        elif op[0] in ("consent", "withdraw"):
            cls = StudyConsentGiven if op[0] == "consent" else StudyConsentWithdrawn
            add(cls.__name__, str(op[1]), cls(nhs_number=PATIENTS[op[1]], grant_id=op[2], actor=ACTOR, recorded_by="t"))
        elif op[0] == "grant" and op[1] not in ref.grants:
            basis, exempt, start, length, commercial, purpose, requires = op[2]
            add("AccessGranted", op[1], AccessGranted(
                grant_id=op[1], organisation=Organisation(code="ORG", name="Org"),
                purpose=PurposeStatement(code=purpose, description="d", patient_benefit="b"), legal_basis=basis,
                datasets=["hes-apc"], commercial=commercial, exclusive=False, valid_from=at(start),
                valid_until=at(start + length), approved_by="dac", recorded_by="t",
                opt_out_exemption=Exemption(basis="s251-cag", reference="CAG 1") if exempt else None,
                requires=list(requires) or None, proposed_by="DAC" if requires else None))
        elif (op[0] == "approve" and op[1] in ref.grants and op[2] in (ref.grants[op[1]].requires or ())
              and (op[1], op[2]) not in ref.approved and op[1] not in ref.revoked):
            add("GrantApproved", op[1], GrantApproved(grant_id=op[1], approval=op[2], organisation=Organisation(
                code=f"APPROVER-{op[2]}", name="Approver"), reference="R", recorded_by="t"))
        elif op[0] == "revoke" and op[1] in ref.grants:
            add("AccessRevoked", op[1], AccessRevoked(grant_id=op[1], reason="r", recorded_by="t"))
        elif op[0] == "use" and op[1] in ref.grants:
            members = sorted(op[2])
            stems = cohorts.normalise(STEMS[members])
            cohort_id = cohorts.cohort_id(stems)
            cohort_bytes[cohort_id] = cohorts.canonical_bytes(stems)
            instant, g = at(len(entries) + 1), ref.grants[op[1]]
            reasons = [ref.reason(int(STEMS[m]), op[1], instant) for m in members]
            claim = decision.Claim.of({r: reasons.count(r) for r in Reason},
                                      decision.Terms(status="active", legal_basis=g.legal_basis,
                                                     exemption=g.opt_out_exemption))
            if any(r not in decision.INCLUDED for r in reasons):
                wrong.add(len(entries) + 1)
            add("DataUseRecorded", op[1], DataUseRecorded(
                use_id=f"U{len(entries)}", grant_id=op[1], organisation_code="ORG", purpose=g.purpose.code,
                legal_basis=g.legal_basis, datasets=["hes-apc"], cohort_id=cohort_id, cohort_size=len(stems),
                occurred_at=instant, access_method="sde", opt_out_state_position=len(entries),
                opted_out_included=claim.opted_out_included, consented_included=claim.consented_included,
                recorded_by="t", exemption_applied=claim.exemption_applied))
    return entries, states, cohort_bytes, wrong


def history_rows(entries: list[bytes], stem: int) -> list[dict]:
    """The patient's choice rows as the choices projection stores them."""
    rows = []
    for raw in entries:
        e = decode_entry(raw)
        p = e.payload
        if e.event_type.startswith(("OptOut", "StudyConsent")) and int(p.nhs_number[:9]) == stem:
            rows.append({"position": e.position, "event_type": e.event_type, "scope": getattr(p, "scope", None),
                         "grant_id": getattr(p, "grant_id", None)})
    return rows


@settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=30))
def test_filter_assessor_history_and_verify_agree_with_the_events(ops):
    entries, states, cohort_bytes, wrong = build(ops)
    decoded = [decode_entry(raw) for raw in entries]
    final = OptOutFilter()
    final.follow(decoded)
    following = OptOutFilter()
    histories = {int(s): _Choices(history_rows(entries, int(s))) for s in STEMS}
    for position in range(len(entries) + 1):
        following.follow(decoded[:position])
        instant = at(position)
        ref = states[position]
        for grant_id in [None, *GRANTS]:
            expected = np.array([ref.reason(int(s), grant_id, instant) for s in STEMS], dtype=np.uint8)
            # The filter: the state followed up to here, answering now.
            terms = following.terms(grant_id, instant)
            assert (following.assess(STEMS, grant_id, terms) == expected).all(), (position, grant_id)
            keep = following.filter(STEMS, grant_id, terms).keep
            assert (keep == decision.included(expected)).all()
            # The assessor: the final state, answering for this earlier position.
            terms = final.terms(grant_id, instant, position)
            assert (final.assess(STEMS, grant_id, terms, position) == expected).all(), (position, grant_id)
            # The history: the patient's own rows, through the rule.
            if grant_id is not None:
                for stem, want in zip(STEMS, expected):
                    held = histories[int(stem)].at(position, grant_id)
                    assert decision.decide(held, terms)[0] == want
    # verify --decisions names exactly the uses that let someone in whom the rule keeps out.
    audit = DecisionAudit(cohort_bytes.get)
    for position, raw in enumerate(entries, 1):
        audit.add(position, raw)
    audit.finish()
    assert {f.position for f in audit.findings} == wrong
    assert all(f.what == "decision" for f in audit.findings)

"""Domain rules, as eventsourcing Aggregates.

Each aggregate is rebuilt from its ledger entries; a command either raises a
rule error, returns the position of the event that already put the asked-for
state in force, or triggers exactly one new event.  The events carry the
contract payloads from ``contracts.events`` as ``data``; their class names
are the ledger event types.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Self
from uuid import UUID, uuid5

import msgspec
from eventsourcing.domain import Aggregate

from contracts import events as ev
from contracts.bodies import (
    AllocationRequest,
    ChoiceRequest,
    ConsentRequest,
    DataUseRequest,
    GrantRequest,
    OutputRequest,
    ValueRequest,
)
from contracts.codes import NEVER_ALLOWED_RECIPIENTS
from contracts.decision import GrantStatus, Terms, grant_status
from contracts.values import Actor, Imported, utc
from service.domain.errors import AlreadyExists, NotFound, NotPermitted, RuleBroken

_NAMESPACE = UUID("6c1b3f0e-4a53-5d0c-9a7e-2f1c7b0d8e11")

# Clocks of callers and the ledger differ a little; more than this is an error.
CLOCK_SKEW = timedelta(minutes=5)
# A committee's approval may be recorded a while after its meeting: a grant may
# start up to this long before it is recorded (README, "Grants and dates").
BACKDATING_ALLOWANCE = timedelta(days=90)
# ... and ends at most this long after it is recorded; longer studies are renewed.
MAX_GRANT_LENGTH = timedelta(days=5 * 365 + 1)


def patient_aggregate_id(nhs_number: str) -> UUID:
    return uuid5(_NAMESPACE, f"patient/{nhs_number}")


def grant_aggregate_id(grant_id: str) -> UUID:
    return uuid5(_NAMESPACE, f"grant/{grant_id}")


def data_use_aggregate_id(organisation: str, use_id: str) -> UUID:
    """Per organisation: one organisation's ``use_id`` never collides with, or
    reveals, another's."""
    return uuid5(_NAMESPACE, f"data-use/{organisation}/{use_id}")



class LedgerAggregate(Aggregate):
    """An aggregate whose first event is an ordinary ledger event (no
    separate 'created' event), so a blank instance stands for 'no history'."""

    EVENTS: ClassVar[dict[str, type[Aggregate.Event]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.EVENTS = {
            name: value
            for name, value in vars(cls).items()
            if isinstance(value, type) and issubclass(value, Aggregate.Event) and name in ev.EVENT_TYPES
        }

    @classmethod
    def blank(cls, aggregate_id: UUID) -> Self:
        agg = object.__new__(cls)
        agg.__base_init__(aggregate_id, 0, datetime.now(timezone.utc))
        agg._init_state()
        return agg

    def _init_state(self) -> None:
        raise NotImplementedError

    def replay(self, event_type: str, version: int, recorded_at: datetime, data: Any, position: int) -> None:
        cls = self.EVENTS[event_type]
        cls(
            originator_id=self.id,
            originator_version=version,
            timestamp=recorded_at,
            data=data,
            position=position,
        ).mutate(self)

    def _trigger(self, data: Any) -> None:
        """Record the event whose payload is ``data``: its type is the payload's contract class."""
        self.trigger_event(self.EVENTS[type(data).__name__], data=data, position=None)


class LedgerEvent(Aggregate.Event):
    data: Any
    position: int | None


@dataclass(frozen=True)
class ChoiceState:
    state: str  # "opted-out" | "opted-in"
    position: int | None
    since: datetime


@dataclass(frozen=True)
class ConsentRecord:
    position: int | None
    given_at: datetime


class Patient(LedgerAggregate):
    scopes: dict[str, ChoiceState]
    consents: dict[str, ConsentRecord]
    withdrawn: dict[str, int | None]
    secret_committed: tuple[int | None, str] | None  # (position, secret_hash) of its TransparencySecretCommitted

    def _init_state(self) -> None:
        self.scopes = {}
        self.consents = {}
        self.withdrawn = {}
        self.secret_committed = None

    class TransparencySecretCommitted(LedgerEvent):
        def apply(self, patient: Patient) -> None:
            patient.secret_committed = (self.position, self.data.secret_hash)

    def commit_secret(self, nhs_number: str, secret_hash: str, recorded_by: str) -> int | None:
        """Commit the patient's transparency secret once; the position of the commitment if it exists."""
        if self.secret_committed is not None:
            return self.secret_committed[0]
        self._trigger(ev.TransparencySecretCommitted(nhs_number=nhs_number, secret_hash=secret_hash,
                                                     recorded_by=recorded_by))
        return None

    class OptOutRegistered(LedgerEvent):
        def apply(self, patient: Patient) -> None:
            patient.scopes[self.data.scope] = ChoiceState("opted-out", self.position, self.timestamp)

    class OptOutWithdrawn(LedgerEvent):
        def apply(self, patient: Patient) -> None:
            patient.scopes[self.data.scope] = ChoiceState("opted-in", self.position, self.timestamp)

    class StudyConsentGiven(LedgerEvent):
        def apply(self, patient: Patient) -> None:
            patient.consents[self.data.grant_id] = ConsentRecord(self.position, self.timestamp)
            patient.withdrawn.pop(self.data.grant_id, None)

    class StudyConsentWithdrawn(LedgerEvent):
        def apply(self, patient: Patient) -> None:
            patient.consents.pop(self.data.grant_id, None)
            patient.withdrawn[self.data.grant_id] = self.position

    def choose(self, nhs_number: str, opt_out: bool, request: ChoiceRequest, recorded_by: str) -> int | None:
        """Set the scope's choice; the existing position if it is already in force."""
        wanted = "opted-out" if opt_out else "opted-in"
        current = self.scopes.get(request.scope)
        if current is not None and current.state == wanted:
            return current.position
        cls = ev.OptOutRegistered if opt_out else ev.OptOutWithdrawn
        self._trigger(cls(
            nhs_number=nhs_number,
            scope=request.scope,
            channel=request.channel,
            actor=request.actor,
            recorded_by=recorded_by,
        ))
        return None

    def give_consent(self, nhs_number: str, request: ConsentRequest, recorded_by: str) -> int | None:
        current = self.consents.get(request.grant_id)
        if current is not None:
            return current.position
        self._trigger(ev.StudyConsentGiven(
            nhs_number=nhs_number, grant_id=request.grant_id, actor=request.actor, recorded_by=recorded_by
        ))
        return None

    def import_choice(self, nhs_number: str, scope: str, opt_out: bool, imported: Imported, recorded_by: str) -> bool:
        """A choice carried over from an earlier register: recorded only while
        the ledger holds no choice for this scope, so a later choice is never
        overridden and importing the same register again writes nothing."""
        if scope in self.scopes:
            return False
        cls = ev.OptOutRegistered if opt_out else ev.OptOutWithdrawn
        self._trigger(cls(nhs_number=nhs_number, scope=scope, channel="import", actor=Actor(kind="patient"),
                          recorded_by=recorded_by, imported=imported))
        return True

    def import_consent(self, nhs_number: str, grant_id: str, imported: Imported, recorded_by: str) -> bool:
        """A study consent carried over: only if none was given or withdrawn here."""
        if grant_id in self.consents or grant_id in self.withdrawn:
            return False
        self._trigger(ev.StudyConsentGiven(nhs_number=nhs_number, grant_id=grant_id, actor=Actor(kind="patient"),
                                           recorded_by=recorded_by, imported=imported))
        return True

    def withdraw_consent(self, nhs_number: str, grant_id: str, actor: Actor, recorded_by: str) -> int | None:
        if grant_id in self.consents:
            self._trigger(ev.StudyConsentWithdrawn(
                nhs_number=nhs_number, grant_id=grant_id, actor=actor, recorded_by=recorded_by
            ))
            return None
        if grant_id in self.withdrawn:
            return self.withdrawn[grant_id]
        raise NotFound(f"the patient has no consent to grant {grant_id!r} to withdraw")


class Grant(LedgerAggregate):
    granted: ev.AccessGranted | None
    granted_position: int | None
    granted_at: datetime | None
    revoked: ev.AccessRevoked | None
    revoked_position: int | None
    revoked_at: datetime | None
    approvals: dict[str, tuple[int, ev.GrantApproved]]
    outputs: list[ev.OutputRecorded]
    received: dict[str, int]  # currency -> minor units
    allocated: dict[str, int]

    def _init_state(self) -> None:
        self.granted = None
        self.granted_position = None
        self.granted_at = None
        self.revoked = None
        self.revoked_position = None
        self.revoked_at = None
        self.approvals = {}
        self.outputs = []
        self.received = {}
        self.allocated = {}

    class AccessGranted(LedgerEvent):
        def apply(self, grant: Grant) -> None:
            grant.granted = self.data
            grant.granted_position = self.position
            grant.granted_at = self.timestamp

    class AccessRevoked(LedgerEvent):
        def apply(self, grant: Grant) -> None:
            grant.revoked = self.data
            grant.revoked_position = self.position
            grant.revoked_at = self.timestamp

    class GrantApproved(LedgerEvent):
        def apply(self, grant: Grant) -> None:
            grant.approvals[self.data.approval] = (self.position, self.data)

    class OutputRecorded(LedgerEvent):
        def apply(self, grant: Grant) -> None:
            grant.outputs.append(self.data)

    class ValueReceived(LedgerEvent):
        def apply(self, grant: Grant) -> None:
            grant.received[self.data.currency] = grant.received.get(self.data.currency, 0) + self.data.amount

    class ValueAllocated(LedgerEvent):
        def apply(self, grant: Grant) -> None:
            grant.allocated[self.data.currency] = grant.allocated.get(self.data.currency, 0) + self.data.amount

    @property
    def exists(self) -> bool:
        return self.granted is not None

    @property
    def pending(self) -> list[str]:
        """The approvals the grant still needs."""
        assert self.granted is not None
        return [k for k in self.granted.requires or () if k not in self.approvals]

    def status(self, now: datetime) -> GrantStatus:
        assert self.granted is not None
        return grant_status(self.granted.valid_from, self.granted.valid_until, self.revoked is not None, now,
                            pending=bool(self.pending))

    def terms(self, position: int, instant: datetime) -> Terms:
        """The grant as the ledger stood at ``position``, for a use at ``instant``."""
        return Terms.at(self.granted, self.granted_position, self.revoked_position, position, instant,
                        {kind: at for kind, (at, _) in self.approvals.items()})

    def grant(self, request: GrantRequest, recorded_by: str, now: datetime, requires: list[str] | None = None,
              proposer: str | None = None) -> None:
        """Record the grant; with ``requires``, as proposed by organisation ``proposer`` until each is approved."""
        if self.exists:
            raise AlreadyExists(f"grant {request.grant_id!r} already exists")
        if requires and proposer is None:
            raise NotPermitted(f"this grant needs approvals ({', '.join(requires)}) and a party may not approve its "
                               "own proposal: propose it with a token that has an `org` claim")
        if request.exclusive:
            raise RuleBroken(
                "exclusive access to patient data is not allowed: set `exclusive` to false",
                code="exclusive-grant", path="$.exclusive",
            )
        if request.organisation.category in NEVER_ALLOWED_RECIPIENTS:
            raise RuleBroken(
                f"this service's policy never allows access for {request.organisation.category} organisations "
                f"(never: {', '.join(NEVER_ALLOWED_RECIPIENTS)})",
                code="recipient-not-allowed", path="$.organisation.category",
            )
        if not request.purpose.patient_benefit.strip():
            raise RuleBroken(
                "a grant must state its benefit to patients or the health and care system",
                code="no-patient-benefit", path="$.purpose.patient_benefit",
            )
        valid_from, valid_until = utc(request.valid_from), utc(request.valid_until)
        if valid_until <= valid_from:
            raise RuleBroken("`valid_until` must be later than `valid_from`", code="invalid-dates", path="$.valid_until")
        if valid_until <= now:
            raise RuleBroken("`valid_until` is already in the past", code="invalid-dates", path="$.valid_until")
        if valid_from < now - BACKDATING_ALLOWANCE:
            raise RuleBroken(f"`valid_from` may be at most {BACKDATING_ALLOWANCE.days} days before the grant is "
                             "recorded", code="invalid-dates", path="$.valid_from")
        if valid_until > now + MAX_GRANT_LENGTH:
            raise RuleBroken("`valid_until` may be at most 5 years after the grant is recorded; renew a longer "
                             "project with a new grant", code="invalid-dates", path="$.valid_until")
        self._trigger(ev.AccessGranted(
            grant_id=request.grant_id,
            organisation=request.organisation,
            purpose=request.purpose,
            legal_basis=request.legal_basis,
            datasets=list(request.datasets),
            commercial=request.commercial,
            exclusive=request.exclusive,
            valid_from=valid_from,
            valid_until=valid_until,
            approved_by=request.approved_by,
            recorded_by=recorded_by,
            opt_out_exemption=request.opt_out_exemption,
            requires=list(requires) if requires else None,
            proposed_by=proposer if requires else None,
            benefits=[msgspec.structs.replace(b, due=utc(b.due)) for b in request.benefits]
            if request.benefits else None,
            commercial_terms=request.commercial_terms,
        ))

    def record_output(self, grant_id: str, request: OutputRequest, recorded_by: str) -> None:
        g = self._recorded(grant_id)
        if request.benefit is not None and request.benefit >= len(g.benefits or ()):
            raise RuleBroken(f"grant {grant_id!r} promises {len(g.benefits or ())} benefit(s): `benefit` is their "
                             "index, from 0", code="unknown-benefit", path="$.benefit")
        if any(o.kind == request.kind and o.identifier == request.identifier for o in self.outputs):
            raise AlreadyExists(f"output {request.identifier!r} ({request.kind}) is already recorded for {grant_id!r}")
        self._trigger(ev.OutputRecorded(grant_id=grant_id, kind=request.kind, identifier=request.identifier,
                                        title=request.title, benefit=request.benefit, recorded_by=recorded_by))

    def receive_value(self, grant_id: str, request: ValueRequest, recorded_by: str) -> None:
        self._recorded(grant_id)
        start, end = utc(request.period_from), utc(request.period_until)
        if end <= start:
            raise RuleBroken("`period_until` must be later than `period_from`", code="invalid-dates",
                             path="$.period_until")
        self._trigger(ev.ValueReceived(grant_id=grant_id, amount=request.amount, currency=request.currency,
                                       period_from=start, period_until=end, recorded_by=recorded_by))

    def allocate_value(self, grant_id: str, request: AllocationRequest, recorded_by: str) -> None:
        self._recorded(grant_id)
        received, allocated = self.received.get(request.currency, 0), self.allocated.get(request.currency, 0)
        if allocated + request.amount > received:
            raise RuleBroken(f"only {received} {request.currency} (minor units) was received under {grant_id!r} and "
                             f"{allocated} is already allocated: {request.amount} more would allocate value never "
                             "received", code="allocation-exceeds-value", path="$.amount")
        self._trigger(ev.ValueAllocated(grant_id=grant_id, amount=request.amount, currency=request.currency,
                                        care_service=request.care_service, recorded_by=recorded_by))

    def _recorded(self, grant_id: str) -> ev.AccessGranted:
        if self.granted is None:
            raise NotFound(f"no grant {grant_id!r}")
        return self.granted

    def approve(self, grant_id: str, approval: str, organisation: ev.Organisation, reference: str,
                recorded_by: str) -> int | None:
        """Record one party's approval; the earlier position if that party already recorded this one."""
        if not self.exists:
            raise NotFound(f"no grant {grant_id!r}")
        g = self.granted
        assert g is not None
        if self.revoked is not None:
            raise RuleBroken(f"grant {grant_id!r} was revoked (position {self.revoked_position}): it cannot be "
                             "approved", code="grant-revoked", path="$.approval")
        if approval not in (g.requires or ()):
            needs = ", ".join(g.requires or ()) or "no approval"
            raise RuleBroken(f"grant {grant_id!r} does not need a {approval!r} approval (it needs: {needs})",
                             code="approval-not-required", path="$.approval")
        if approval in self.approvals:
            at, earlier = self.approvals[approval]
            if earlier.organisation.code == organisation.code and earlier.reference == reference:
                return at
            raise AlreadyExists(f"the {approval!r} approval of grant {grant_id!r} was already recorded by "
                                f"{earlier.organisation.code} (position {at})")
        if organisation.code == g.proposed_by:
            raise NotPermitted(f"{organisation.code} proposed grant {grant_id!r} and may not approve its own proposal")
        for kind, (at, earlier) in self.approvals.items():
            if earlier.organisation.code == organisation.code:
                raise NotPermitted(f"{organisation.code} already approved grant {grant_id!r} ({kind}, position {at}); "
                                   "each approval must come from a distinct organisation")
        self._trigger(ev.GrantApproved(grant_id=grant_id, approval=approval, organisation=organisation,
                                       reference=reference, recorded_by=recorded_by))
        return None

    def revoke(self, grant_id: str, reason: str, recorded_by: str) -> int | None:
        if not self.exists:
            raise NotFound(f"no grant {grant_id!r}")
        if self.revoked is not None:
            return self.revoked_position
        self._trigger(ev.AccessRevoked(grant_id=grant_id, reason=reason, recorded_by=recorded_by))
        return None

    def check_use(self, request: DataUseRequest, organisation: str, now: datetime) -> None:
        """What the grant alone decides about a data use, whenever it occurred;
        whether the grant was in force at ``occurred_at`` is the rule's (``terms``)."""
        if not self.exists:
            raise RuleBroken(f"no grant {request.grant_id!r} is recorded", code="unknown-grant", path="$.grant_id")
        g = self.granted
        assert g is not None
        if g.organisation.code != organisation:
            raise NotPermitted("the grant belongs to another organisation: an SDE may only record uses under its own")
        if request.purpose != g.purpose.code:
            raise RuleBroken(f"the grant covers purpose {g.purpose.code!r}, not {request.purpose!r}",
                             code="purpose-outside-grant", path="$.purpose")
        outside = sorted(set(request.datasets) - set(g.datasets))
        if outside:
            raise RuleBroken(f"datasets outside the grant: {', '.join(outside)}", code="datasets-outside-grant",
                             path="$.datasets")
        if utc(request.occurred_at) > now + CLOCK_SKEW:
            raise RuleBroken("`occurred_at` is in the future", code="invalid-dates", path="$.occurred_at")


class DataUse(LedgerAggregate):
    recorded: ev.DataUseRecorded | None
    position: int | None

    def _init_state(self) -> None:
        self.recorded = None
        self.position = None

    class DataUseRecorded(LedgerEvent):
        def apply(self, use: DataUse) -> None:
            use.recorded = self.data
            use.position = self.position

    def repeated(self, request: DataUseRequest, cohort_id: str, organisation: str) -> int:
        """The position of this use, already recorded, if ``request`` describes
        the same release (answered like a repeated opt-out); AlreadyExists,
        naming what differs, if it describes another one under the same id."""
        r = self.recorded
        assert r is not None and self.position is not None
        if organisation != r.organisation_code:  # another organisation learns no more than that the id is taken
            raise AlreadyExists(f"data use {r.use_id!r} is already recorded")
        given = {
            "grant_id": (request.grant_id, r.grant_id),
            "purpose": (request.purpose, r.purpose),
            "datasets": (list(request.datasets), r.datasets),
            "cohort": (cohort_id, r.cohort_id),
            "occurred_at": (utc(request.occurred_at), r.occurred_at),
            "access_method": (request.access_method, r.access_method),
            "opt_out_state_position": (request.opt_out_state_position, r.caller_filter_position),
        }
        differs = [name for name, (new, old) in given.items() if new != old]
        if differs:
            raise AlreadyExists(f"data use {r.use_id!r} is already recorded (position {self.position}) with another "
                                f"{', '.join(differs)}: a use_id names one release; give a new release its own")
        return self.position

    def record(self, payload: ev.DataUseRecorded) -> None:
        if self.recorded is not None:
            raise AlreadyExists(f"data use {payload.use_id!r} is already recorded")
        self._trigger(payload)

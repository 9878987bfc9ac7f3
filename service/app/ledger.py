"""The application service: load aggregates, apply a command, append.

Every write follows one path (``_execute``): decide on the aggregate's
history (held in memory from recent writes, else read from the ledger), and
append with the aggregate's version as the optimistic-concurrency check,
deciding again from the ledger if the history was stale; the writer answers
an idempotent retry with its original receipts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import NamedTuple, TypeVar
from uuid import UUID, uuid4

import asyncpg
import numpy as np

from contracts import approvals as approval_policy
from contracts import cohort as cohorts
from contracts import cohort_commitment as cc
from contracts import events as ev
from contracts.bodies import (
    AllocationRequest,
    ApprovalRequest,
    ChoiceRequest,
    Choices,
    ConsentRequest,
    ConsentState,
    DataUseRequest,
    GrantApproval,
    GrantRequest,
    GrantView,
    OutputRequest,
    Receipt,
    ScopeChoice,
    ValueRequest,
)
from contracts.codes import APPROVER_ROLES, OptOutScope, values
from contracts.decision import Claim
from contracts.entry import format_recorded_at
from contracts.nhs_number import NhsNumber
from contracts.values import Actor, Organisation, utc
from service.app.assessors import LedgerOptOutAssessor, OptOutAssessor
from service.app.caller import Caller
from service.app.data_use_rules import (
    data_use_condition,
    excluded,
    not_in_force,
)
from service.app.recent_histories import HeldEvent, RecentHistories
from service.app.transparency import Transparency, data_use_context
from service.domain.aggregates import (
    DataUse,
    Grant,
    LedgerAggregate,
    Patient,
    data_use_aggregate_id,
    grant_aggregate_id,
    patient_aggregate_id,
)
from service.domain.errors import AlreadyExists, NotFound, NotPermitted, RuleBroken
from service.domain.imports import ImportedChoice
from service.store import cohorts as stored_cohorts
from service.store.event_log import (
    ConditionFailed,
    IdempotencyKey,
    NewEvent,
    StoredEvent,
    VersionConflict,
)
from service.store.event_store import EventStore

A = TypeVar("A", bound=LedgerAggregate)

_ATTEMPTS = 5


class Outcome(NamedTuple):
    receipt: Receipt
    created: bool
    replayed: bool = False


class Contended(Exception):
    """Concurrent writers kept invalidating the decision; the caller may retry."""


def _replay(agg: LedgerAggregate, stored: StoredEvent) -> None:
    e = stored.entry
    agg.replay(
        e.event_type,
        e.aggregate_version,
        datetime.fromisoformat(e.recorded_at),
        e.payload,
        e.position,
    )


def _rebuilt(cls: type[A], aggregate_id: UUID, history: tuple[HeldEvent, ...]) -> A:
    agg = cls.blank(aggregate_id)
    for e in history:
        agg.replay(e.event_type, e.version, e.recorded_at, e.payload, e.position)
    return agg


def _new_events(agg: LedgerAggregate) -> list[NewEvent]:
    return [
        NewEvent(
            event_id=uuid4(),
            event_type=type(event).__name__,
            aggregate_id=agg.id,
            aggregate_version=event.originator_version,
            payload=event.data,
        )
        for event in agg.collect_events()
    ]


class Ledger:
    def __init__(self, store: EventStore, assessor: OptOutAssessor | None = None, recent: RecentHistories | None = None,
                 approvals: tuple[tuple[str, str], ...] = (), transparency: Transparency | None = None):
        self.store = store
        self.assessor = assessor or LedgerOptOutAssessor(store)
        self.recent = recent if recent is not None else RecentHistories()
        self.approvals = approvals  # the policy (contracts/approvals.py): which approvals a new grant needs
        self.transparency = transparency or Transparency()

    # --- loading --------------------------------------------------------------

    async def _load(self, conn: asyncpg.Connection, cls: type[A], aggregate_id: UUID) -> A:
        agg = cls.blank(aggregate_id)
        for stored in await self.store.aggregate_events(conn, aggregate_id):
            _replay(agg, stored)
        return agg

    async def load(self, cls: type[A], aggregate_id: UUID) -> A:
        agg = cls.blank(aggregate_id)
        for stored in await self.store.history(aggregate_id):
            _replay(agg, stored)
        return agg

    async def receipt_at(self, position: int) -> Receipt:
        (stored,) = await self.store.read_positions([position])
        return stored.receipt()

    # --- the one write path ---------------------------------------------------

    async def _execute(
        self,
        cls: type[A],
        aggregate_id: UUID,
        decide: Callable[[A], int | None],
        idempotency: IdempotencyKey | None,
    ) -> Outcome:
        # First decided on the history this process holds (or none): no read
        # before the write. The writer refuses an append whose version shows
        # that history was stale, and a decision that writes nothing or is
        # refused is only believed when made on the ledger's own history.
        history, fresh = self.recent.get(aggregate_id), False
        for _ in range(_ATTEMPTS):
            agg = _rebuilt(cls, aggregate_id, history)
            try:
                existing = decide(agg)
            except (RuleBroken, NotFound, AlreadyExists, NotPermitted):
                if fresh:
                    if idempotency is not None and (earlier := await self.store.find_idempotent(idempotency)):
                        return Outcome(earlier.receipts[0], created=True, replayed=True)
                    raise
                existing, new = None, []
            else:
                new = _new_events(agg)
            if not new:
                if not fresh:
                    history, fresh = await self._history(aggregate_id), True
                    continue
                if idempotency is not None and (earlier := await self.store.find_idempotent(idempotency)):
                    return Outcome(earlier.receipts[0], created=True, replayed=True)
                assert existing is not None
                return Outcome(await self.receipt_at(existing), created=False)
            try:
                result = await self.store.append(new, idempotency=idempotency)
            except VersionConflict:
                history, fresh = await self._history(aggregate_id), True
                continue
            if not result.replayed:
                self.recent.extend(aggregate_id, history, [
                    HeldEvent(e.event_type, e.aggregate_version, datetime.fromisoformat(r.recorded_at), e.payload,
                              r.position)
                    for e, r in zip(new, result.receipts, strict=True)
                ])
            return Outcome(result.receipts[0], created=True, replayed=result.replayed)
        raise Contended("the record kept changing while this request was applied; retry")

    async def _history(self, aggregate_id: UUID) -> tuple[HeldEvent, ...]:
        """The aggregate's history as the ledger holds it, kept for the next write."""
        stored = await self.store.history(aggregate_id)
        history = tuple(
            HeldEvent(s.entry.event_type, s.entry.aggregate_version, datetime.fromisoformat(s.entry.recorded_at),
                      s.entry.payload, s.entry.position)
            for s in stored
        )
        self.recent.put(aggregate_id, history)
        return history

    # --- patients -------------------------------------------------------------

    async def choose(
        self, caller: Caller, nhs: NhsNumber, opt_out: bool, request: ChoiceRequest, idem: IdempotencyKey | None
    ) -> Outcome:
        return await self._execute(
            Patient, patient_aggregate_id(nhs),
            lambda p: p.choose(str(nhs), opt_out, request, caller.subject), idem,
        )

    async def give_consent(
        self, caller: Caller, nhs: NhsNumber, request: ConsentRequest, idem: IdempotencyKey | None
    ) -> Outcome:
        grant = await self.load(Grant, grant_aggregate_id(request.grant_id))
        if not grant.exists:
            raise RuleBroken(f"no grant {request.grant_id!r} is recorded", code="unknown-grant", path="$.grant_id")
        status = grant.status(datetime.now(timezone.utc))
        # A project that has not started yet may already collect consent; an ended one may not.
        if status in ("revoked", "expired"):
            raise RuleBroken(f"the grant is {status}; consent is only for current projects",
                             code=f"grant-{status}", path="$.grant_id")
        return await self._execute(
            Patient, patient_aggregate_id(nhs),
            lambda p: p.give_consent(str(nhs), request, caller.subject), idem,
        )

    async def withdraw_consent(
        self, caller: Caller, nhs: NhsNumber, grant_id: str, actor: Actor, idem: IdempotencyKey | None
    ) -> Outcome:
        return await self._execute(
            Patient, patient_aggregate_id(nhs),
            lambda p: p.withdraw_consent(str(nhs), grant_id, actor, caller.subject), idem,
        )

    async def transparency_secret(self, caller: Caller, nhs: NhsNumber) -> tuple[bytes, Receipt]:
        """The patient's transparency secret and the receipt of its commitment in the log (written now,
        the first time)."""
        secret = self.transparency.secret(nhs.stem)
        outcome = await self._execute(
            Patient, patient_aggregate_id(nhs),
            lambda p: p.commit_secret(str(nhs), cc.secret_hash(secret), caller.subject), None)
        return secret, outcome.receipt

    async def choices(self, nhs: NhsNumber) -> Choices:
        async with self.store.snapshot() as conn:
            as_of, _ = await self.store.head(conn)
            patient = await self._load(conn, Patient, patient_aggregate_id(nhs))
        scopes: dict[str, ScopeChoice] = {}
        for scope in values(OptOutScope):
            c = patient.scopes.get(scope)
            scopes[scope] = (
                ScopeChoice(state="not-recorded")
                if c is None
                else ScopeChoice(state=c.state, since=format_recorded_at(c.since), position=c.position)
            )
        consents = [
            ConsentState(grant_id=g, given_at=format_recorded_at(c.given_at), position=c.position or 0)
            for g, c in sorted(patient.consents.items())
        ]
        return Choices(nhs_number=str(nhs), as_of=as_of, scopes=scopes, consents=consents)

    async def import_choices(self, caller: Caller, choices: Sequence[ImportedChoice]) -> list[Receipt | None]:
        """Record each imported choice the ledger does not already cover, all
        in one append (the bundle is written whole or not at all); per choice
        its receipt, or None where the ledger already held a choice for that
        patient and scope (or that consent)."""
        for grant_id in sorted({c.grant_id for c in choices if c.grant_id}):
            if not (await self.load(Grant, grant_aggregate_id(grant_id))).exists:
                raise RuleBroken(f"no grant {grant_id!r} is recorded: record the grant before importing "
                                 "consents to it", code="unknown-grant", path="policy")
        ids = {patient_aggregate_id(c.nhs_number) for c in choices}
        for _ in range(_ATTEMPTS):
            async with self.store.snapshot() as conn:
                head, _ = await self.store.head(conn)
                stored = await self.store.aggregates_events(conn, ids, head)
            patients = {i: Patient.blank(i) for i in ids}
            for s in stored:
                _replay(patients[UUID(s.entry.aggregate_id)], s)
            events: list[NewEvent] = []
            owners: list[int] = []
            for n, c in enumerate(choices):
                patient = patients[patient_aggregate_id(c.nhs_number)]
                if c.kind == "consent":
                    assert c.grant_id is not None
                    patient.import_consent(str(c.nhs_number), c.grant_id, c.imported, caller.subject)
                else:
                    assert c.scope is not None
                    patient.import_choice(str(c.nhs_number), c.scope, c.kind == "opt-out", c.imported,
                                          caller.subject)
                fresh = _new_events(patient)
                events += fresh
                owners += [n] * len(fresh)
            if not events:
                return [None] * len(choices)
            try:
                result = await self.store.append(events)
            except VersionConflict:
                continue
            receipts: list[Receipt | None] = [None] * len(choices)
            for owner, receipt in zip(owners, result.receipts, strict=True):
                receipts[owner] = receipt
            return receipts
        raise Contended("the patients' records kept changing while the import was applied; retry")

    # --- grants ---------------------------------------------------------------

    async def create_grant(self, caller: Caller, request: GrantRequest, idem: IdempotencyKey | None) -> Outcome:
        now = datetime.now(timezone.utc)

        requires = approval_policy.required(self.approvals, request.legal_basis, request.purpose.code,
                                            request.commercial)

        def decide(g: Grant) -> None:
            g.grant(request, caller.subject, now, requires, caller.org)

        return await self._execute(Grant, grant_aggregate_id(request.grant_id), decide, idem)

    async def approve_grant(self, caller: Caller, grant_id: str, request: ApprovalRequest,
                            idem: IdempotencyKey | None) -> Outcome:
        role = APPROVER_ROLES[request.approval]
        if role not in caller.roles:
            raise NotPermitted(f"a {request.approval!r} approval is recorded by the {role!r} role, which this token "
                               "does not have")
        assert caller.org is not None  # the operation is organisation-scoped
        organisation = Organisation(code=caller.org, name=request.organisation_name)
        return await self._execute(
            Grant, grant_aggregate_id(grant_id),
            lambda g: g.approve(grant_id, request.approval, organisation, request.reference, caller.subject), idem)

    async def revoke_grant(self, caller: Caller, grant_id: str, reason: str, idem: IdempotencyKey | None) -> Outcome:
        return await self._execute(
            Grant, grant_aggregate_id(grant_id), lambda g: g.revoke(grant_id, reason, caller.subject), idem
        )

    async def record_output(self, caller: Caller, grant_id: str, request: OutputRequest,
                            idem: IdempotencyKey | None) -> Outcome:
        return await self._execute(Grant, grant_aggregate_id(grant_id),
                                   lambda g: g.record_output(grant_id, request, caller.subject), idem)

    async def receive_value(self, caller: Caller, grant_id: str, request: ValueRequest,
                            idem: IdempotencyKey | None) -> Outcome:
        return await self._execute(Grant, grant_aggregate_id(grant_id),
                                   lambda g: g.receive_value(grant_id, request, caller.subject), idem)

    async def allocate_value(self, caller: Caller, grant_id: str, request: AllocationRequest,
                             idem: IdempotencyKey | None) -> Outcome:
        return await self._execute(Grant, grant_aggregate_id(grant_id),
                                   lambda g: g.allocate_value(grant_id, request, caller.subject), idem)

    async def grant_view(self, grant_id: str) -> GrantView:
        async with self.store.snapshot() as conn:
            as_of, _ = await self.store.head(conn)
            grant = await self._load(conn, Grant, grant_aggregate_id(grant_id))
        if not grant.exists:
            raise NotFound(f"no grant {grant_id!r}")
        assert grant.granted is not None and grant.granted_position is not None
        return GrantView(
            grant=grant.granted,
            status=grant.status(datetime.now(timezone.utc)),
            approvals=[GrantApproval(approval=kind, organisation=a.organisation, reference=a.reference, position=at)
                       for kind, (at, a) in grant.approvals.items()],
            pending=grant.pending,
            position=grant.granted_position,
            revoked_at=format_recorded_at(grant.revoked_at) if grant.revoked_at else None,
            revoke_reason=grant.revoked.reason if grant.revoked else None,
            as_of=as_of,
        )

    # --- data uses ------------------------------------------------------------

    async def load_cohort(self, cohort_id: str, organisation: str) -> np.ndarray:
        """A stored cohort, for an organisation that stored it or recorded a use of it.
        Anyone else is told it does not exist: a cohort_id must reveal nothing."""
        found = await self.store.cohort_members(cohort_id, holder=organisation)
        if found is None:
            raise RuleBroken(
                f"your organisation has stored no cohort {cohort_id}: POST it to /v1/cohorts first",
                code="unknown-cohort", path="$.cohort_id",
            )
        return await asyncio.to_thread(cohorts.decode_members, *found)

    async def store_cohort(self, caller: Caller, cohort: cohorts.EncodedCohort, request_id: str | None) -> None:
        """Store a cohort once, content-addressed, and record in the ledger that
        the caller's organisation stored it."""
        assert caller.org is not None
        if not await self.store.holds_cohort(cohort.cohort_id, caller.org):
            event = ev.CohortStored(cohort_id=cohort.cohort_id, size=len(cohort.stems), organisation_code=caller.org,
                                    recorded_by=caller.subject, request_id=request_id)
            await self.store.append([NewEvent.alone(event)],
                                   side_write=stored_cohorts.stored_with(cohort, caller.org))

    async def record_data_use(
        self, caller: Caller, request: DataUseRequest, idem: IdempotencyKey | None,
        cohort: cohorts.EncodedCohort | None = None,
    ) -> Outcome:
        """``cohort``: the request's inline NHS numbers, encoded off the event
        loop by the caller (``request`` then names it by ``cohort_id``); it is
        stored with the data use, and only if the use is recorded."""
        if idem is not None:
            earlier = await self.store.find_idempotent(idem)
            if earlier is not None:
                return Outcome(earlier.receipts[0], created=True, replayed=True)
        organisation = caller.org
        assert organisation is not None, "data uses are organisation-scoped operations"
        if request.nhs_numbers is not None:
            numbers = np.fromiter((n.stem for n in request.nhs_numbers), dtype=np.int64)
            cohort = await asyncio.to_thread(cohorts.encode_cohort, numbers)
        if cohort is not None:
            stems, cohort_id, side_write = cohort.stems, cohort.cohort_id, stored_cohorts.stored_with(cohort, organisation)
        else:
            assert request.cohort_id is not None
            stems, cohort_id = await self.load_cohort(request.cohort_id, organisation), request.cohort_id
            side_write = None
        occurred = utc(request.occurred_at)
        commitment = await self.transparency.commit(stems, data_use_context(organisation, request.use_id))
        for _ in range(_ATTEMPTS):
            now = datetime.now(timezone.utc)
            async with self.store.snapshot() as conn:
                head, _ = await self.store.head(conn)
                claimed = request.opt_out_state_position
                if claimed is not None and claimed > head:
                    raise RuleBroken(
                        f"`opt_out_state_position` {claimed} is beyond the ledger head ({head}): "
                        "give the `as_of` of the filter call you applied",
                        code="position-in-future", path="$.opt_out_state_position",
                    )
                grant = await self._load(conn, Grant, grant_aggregate_id(request.grant_id))
                use = await self._load(conn, DataUse, data_use_aggregate_id(organisation, request.use_id))
                if use.recorded is not None:  # sent again: answered like a repeated opt-out
                    return Outcome(await self.receipt_at(use.repeated(request, cohort_id, organisation)),
                                   created=False)
                grant.check_use(request, organisation, now)
                # The state in force when the use occurred: the last position recorded by then.
                position = await self.store.position_at(conn, occurred, head)
                terms = grant.terms(position, occurred)
                if terms.status != "active":
                    raise not_in_force(grant, terms, request.grant_id)
                assessment = await self.assessor.assess(conn, stems, request.grant_id, terms, position)
            if assessment.excluded:
                raise excluded(assessment, request.grant_id, "$.nhs_numbers" if cohort is not None else "$.cohort_id")
            granted = grant.granted
            assert granted is not None
            claim = Claim.of(assessment.found, terms)
            use.record(ev.DataUseRecorded(
                use_id=request.use_id,
                grant_id=request.grant_id,
                organisation_code=granted.organisation.code,
                purpose=request.purpose,
                legal_basis=granted.legal_basis,
                datasets=list(request.datasets),
                cohort_id=cohort_id,
                cohort_size=len(stems),
                occurred_at=occurred,
                access_method=request.access_method,
                opt_out_state_position=position,
                opted_out_included=claim.opted_out_included,
                consented_included=claim.consented_included,
                recorded_by=caller.subject,
                exemption_applied=claim.exemption_applied,
                caller_filter_position=request.opt_out_state_position,
                cohort_commitment=commitment,
            ))
            # Anything recorded after `occurred_at` cannot change the decision;
            # when the use occurred at the head (now), a change landing before
            # the append still could.
            condition = data_use_condition(position, request.grant_id, stems, terms) if position == head else None
            try:
                result = await self.store.append(
                    _new_events(use), condition=condition, idempotency=idem, side_write=side_write
                )
            except (VersionConflict, ConditionFailed):
                continue
            return Outcome(result.receipts[0], created=True, replayed=result.replayed)
        raise Contended("opt-outs or the grant kept changing while this data use was checked; retry")

"""The application service: load aggregates, apply a command, append.

Every write follows one path (``_execute``): replay an idempotent retry,
otherwise load, decide, and append with the aggregate's version as the
optimistic-concurrency check, retrying the decision if another writer got
there first.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple, TypeVar
from uuid import UUID, uuid4

import asyncpg
import numpy as np

from contracts import cohort as cohorts
from contracts import events as ev
from contracts.bodies import (
    ChoiceRequest,
    Choices,
    ConsentRequest,
    ConsentState,
    DataUseRequest,
    GrantRequest,
    GrantView,
    Receipt,
    ScopeChoice,
)
from contracts.codes import OptOutScope, values
from contracts.entry import format_recorded_at
from contracts.nhs_number import NhsNumber
from contracts.values import Actor, utc

from projections.optout_filter import OptOutFilter
from projections.runner import Runner

from .domain import (
    DataUse,
    Grant,
    LedgerAggregate,
    NotFound,
    Patient,
    RuleBroken,
    data_use_aggregate_id,
    grant_aggregate_id,
    patient_aggregate_id,
)
from .store import (
    AppendCondition,
    ConditionFailed,
    EventStore,
    IdempotencyKey,
    NewEvent,
    StoredEvent,
    VersionConflict,
)

A = TypeVar("A", bound=LedgerAggregate)

_ATTEMPTS = 5


@dataclass(frozen=True)
class Caller:
    """The authenticated system making a request."""

    subject: str
    roles: frozenset[str]
    org: str | None = None
    nhs_number: str | None = None


class Outcome(NamedTuple):
    receipt: Receipt
    created: bool
    replayed: bool = False


class Contended(Exception):
    """Concurrent writers kept invalidating the decision; the caller may retry."""


def idempotency_key(caller: Caller, key: str | None, method: str, path: str, body: bytes) -> IdempotencyKey | None:
    if key is None:
        return None
    digest = hashlib.sha256(f"{method} {path}\n".encode() + body).digest()
    return IdempotencyKey(scope=caller.subject, key=key, request_hash=digest)


@dataclass(frozen=True)
class Assessment:
    """How many of a cohort were opted out at ``position``, and how many of
    those consented to the grant (consent overrides the opt-out for it)."""

    position: int
    opted_out: int
    consented: int

    @property
    def excluded(self) -> int:
        return self.opted_out - self.consented


class OptOutAssessor(ABC):
    """Answers 'who in this cohort is opted out' at some position."""

    @abstractmethod
    async def assess(self, conn: asyncpg.Connection, stems: np.ndarray, grant_id: str, as_of: int) -> Assessment:
        """Opt-out state of the cohort at a position no later than ``as_of``."""


class LedgerOptOutAssessor(OptOutAssessor):
    """Folds each cohort member's own events from the ledger: exact at any
    position, and fine for cohorts of thousands; the projection-backed
    assessor serves national-scale cohorts."""

    def __init__(self, store: EventStore):
        self.store = store

    async def assess(self, conn: asyncpg.Connection, stems: np.ndarray, grant_id: str, as_of: int) -> Assessment:
        numbers = cohort_numbers(stems)
        ids = {patient_aggregate_id(n): n for n in numbers}
        patients: dict[UUID, Patient] = {}
        for stored in await self.store.aggregates_events(conn, ids, as_of):
            e = stored.entry
            agg_id = UUID(e.aggregate_id)
            patient = patients.get(agg_id)
            if patient is None:
                patient = patients[agg_id] = Patient.blank(agg_id)
            _replay(patient, stored)
        opted_out = [p for p in patients.values() if p.opted_out]
        consented = sum(1 for p in opted_out if grant_id in p.consents)
        return Assessment(position=as_of, opted_out=len(opted_out), consented=consented)


class ProjectedOptOutAssessor(OptOutAssessor):
    """Answers from the in-memory opt-out filter: a 5M cohort is a few
    hundred milliseconds of bitmap lookups, not millions of ledger reads.

    The filter may be behind ``as_of`` (then the data use's AppendCondition
    covers the gap up to commit) or ahead of it (then it already reflects
    those events); either way the Assessment reports the position it used."""

    def __init__(self, opt_outs: OptOutFilter, runner: Runner, wait: float = 2.0):
        self.opt_outs = opt_outs
        self.runner = runner
        self.wait = wait

    async def assess(self, conn: asyncpg.Connection, stems: np.ndarray, grant_id: str, as_of: int) -> Assessment:
        await self.runner.wait_for(as_of, self.wait, lambda: self.opt_outs.position)
        position, opted_out, consented = await asyncio.to_thread(self.opt_outs.snapshot().assess, stems, grant_id)
        return Assessment(position=position, opted_out=opted_out, consented=consented)


def cohort_numbers(stems: np.ndarray) -> list[str]:
    return [NhsNumber.from_stem(int(s)) for s in stems]


def _replay(agg: LedgerAggregate, stored: StoredEvent) -> None:
    e = stored.entry
    agg.replay(
        e.event_type,
        e.aggregate_version,
        datetime.fromisoformat(e.recorded_at),
        e.payload,
        e.position,
    )


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
    def __init__(self, store: EventStore, assessor: OptOutAssessor | None = None):
        self.store = store
        self.assessor = assessor or LedgerOptOutAssessor(store)

    # --- loading --------------------------------------------------------------

    async def _load(self, conn: asyncpg.Connection, cls: type[A], aggregate_id: UUID) -> A:
        agg = cls.blank(aggregate_id)
        for stored in await self.store.aggregate_events(conn, aggregate_id):
            _replay(agg, stored)
        return agg

    async def load(self, cls: type[A], aggregate_id: UUID) -> A:
        async with self.store.pool.acquire() as conn:
            return await self._load(conn, cls, aggregate_id)

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
        if idempotency is not None:
            earlier = await self.store.find_idempotent(idempotency)
            if earlier is not None:
                return Outcome(earlier.receipts[0], created=True, replayed=True)
        for _ in range(_ATTEMPTS):
            agg = await self.load(cls, aggregate_id)
            existing = decide(agg)
            new = _new_events(agg)
            if not new:
                assert existing is not None
                return Outcome(await self.receipt_at(existing), created=False)
            try:
                result = await self.store.append(new, idempotency=idempotency)
            except VersionConflict:
                continue
            return Outcome(result.receipts[0], created=True, replayed=result.replayed)
        raise Contended("the record kept changing while this request was applied; retry")

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
        self, caller: Caller, nhs: NhsNumber, grant_id: str, idem: IdempotencyKey | None
    ) -> Outcome:
        actor = Actor(kind="patient")
        return await self._execute(
            Patient, patient_aggregate_id(nhs),
            lambda p: p.withdraw_consent(str(nhs), grant_id, actor, caller.subject), idem,
        )

    async def choices(self, nhs: NhsNumber) -> Choices:
        async with self.store.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
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

    # --- grants ---------------------------------------------------------------

    async def create_grant(self, caller: Caller, request: GrantRequest, idem: IdempotencyKey | None) -> Outcome:
        now = datetime.now(timezone.utc)

        def decide(g: Grant) -> None:
            g.grant(request, caller.subject, now)

        return await self._execute(Grant, grant_aggregate_id(request.grant_id), decide, idem)

    async def revoke_grant(self, caller: Caller, grant_id: str, reason: str, idem: IdempotencyKey | None) -> Outcome:
        return await self._execute(
            Grant, grant_aggregate_id(grant_id), lambda g: g.revoke(grant_id, reason, caller.subject), idem
        )

    async def grant_view(self, grant_id: str) -> GrantView:
        async with self.store.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                as_of, _ = await self.store.head(conn)
                grant = await self._load(conn, Grant, grant_aggregate_id(grant_id))
        if not grant.exists:
            raise NotFound(f"no grant {grant_id!r}")
        assert grant.granted is not None and grant.granted_position is not None
        return GrantView(
            grant=grant.granted,
            status=grant.status(datetime.now(timezone.utc)),
            position=grant.granted_position,
            revoked_at=format_recorded_at(grant.revoked_at) if grant.revoked_at else None,
            revoke_reason=grant.revoked.reason if grant.revoked else None,
            as_of=as_of,
        )

    # --- data uses ------------------------------------------------------------

    async def load_cohort(self, cohort_id: str) -> np.ndarray:
        async with self.store.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT encoding, members FROM cohorts WHERE cohort_id = $1", bytes.fromhex(cohort_id)
            )
        if row is None:
            raise RuleBroken(
                f"no cohort {cohort_id} is stored: POST it to /v1/cohorts first",
                code="unknown-cohort", path="$.cohort_id",
            )
        return await asyncio.to_thread(cohorts.decode_members, row["encoding"], row["members"])

    async def store_cohort(self, cohort: cohorts.EncodedCohort) -> None:
        """Store a cohort once, content-addressed."""
        async with self.store.pool.acquire() as conn:
            await _store_cohort(cohort)(conn)

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
        if request.nhs_numbers is not None:
            numbers = np.fromiter((int(n[:9]) for n in request.nhs_numbers), dtype=np.int64)
            cohort = await asyncio.to_thread(cohorts.encode_cohort, numbers)
        if cohort is not None:
            stems, cohort_id, side_write = cohort.stems, cohort.cohort_id, _store_cohort(cohort)
        else:
            assert request.cohort_id is not None
            stems, cohort_id, side_write = await self.load_cohort(request.cohort_id), request.cohort_id, None
        organisation = caller.org or ""
        for _ in range(_ATTEMPTS):
            now = datetime.now(timezone.utc)
            async with self.store.pool.acquire() as conn:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    head, _ = await self.store.head(conn)
                    claimed = request.opt_out_state_position
                    if claimed is not None and claimed > head:
                        raise RuleBroken(
                            f"`opt_out_state_position` {claimed} is beyond the ledger head ({head}): "
                            "give the `as_of` of the filter call you applied",
                            code="position-in-future", path="$.opt_out_state_position",
                        )
                    grant = await self._load(conn, Grant, grant_aggregate_id(request.grant_id))
                    use = await self._load(conn, DataUse, data_use_aggregate_id(request.use_id))
                    if use.recorded is not None:  # sent again: answered like a repeated opt-out
                        return Outcome(await self.receipt_at(use.repeated(request, cohort_id, organisation)),
                                       created=False)
                    grant.check_use(request, organisation, now)
                    assessment = await self.assessor.assess(conn, stems, request.grant_id, head)
            granted = grant.granted
            assert granted is not None
            exemption = granted.opt_out_exemption
            if assessment.excluded and exemption is None:
                raise RuleBroken(
                    f"{assessment.excluded} patient(s) in the cohort have an opt-out in force at position "
                    f"{assessment.position} and the grant records no opt-out exemption; filter the cohort with "
                    f"POST /v1/opt-out-filter?grant_id={request.grant_id}&min_position={assessment.position} "
                    "and submit the filtered cohort",
                    code="opted-out-patients-in-cohort",
                    path="$.nhs_numbers" if cohort is not None else "$.cohort_id",
                )
            use.record(ev.DataUseRecorded(
                use_id=request.use_id,
                grant_id=request.grant_id,
                organisation_code=granted.organisation.code,
                purpose=request.purpose,
                legal_basis=granted.legal_basis,
                datasets=list(request.datasets),
                cohort_id=cohort_id,
                cohort_size=len(stems),
                occurred_at=utc(request.occurred_at),
                access_method=request.access_method,
                opt_out_state_position=assessment.position,
                opted_out_included=assessment.opted_out if exemption else assessment.consented,
                consented_included=assessment.consented,
                recorded_by=caller.subject,
                exemption_applied=exemption if assessment.opted_out else None,
                caller_filter_position=request.opt_out_state_position,
            ))
            # The assessor may be ahead of the snapshot `head` the grant was
            # checked at: watch from the earlier of the two.
            condition = _data_use_condition(
                min(head, assessment.position), request.grant_id, stems, exemption is not None
            )
            try:
                result = await self.store.append(
                    _new_events(use), condition=condition, idempotency=idem, side_write=side_write
                )
            except (VersionConflict, ConditionFailed):
                continue
            return Outcome(result.receipts[0], created=True, replayed=result.replayed)
        raise Contended("opt-outs or the grant kept changing while this data use was checked; retry")


def _store_cohort(cohort: cohorts.EncodedCohort) -> Callable[[asyncpg.Connection], Any]:
    async def write(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO cohorts (cohort_id, size, encoding, members) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (cohort_id) DO NOTHING",
            bytes.fromhex(cohort.cohort_id), len(cohort.stems), cohort.encoding, cohort.members,
        )

    return write


def _in_cohort(stems: np.ndarray, nhs_number: str) -> bool:
    # In the cohort's own dtype: a Python int would make numpy cast all the
    # stems to int64 first (9 ms for 5M, per event, on the writer's loop).
    stem = stems.dtype.type(int(nhs_number[:9]))
    i = int(np.searchsorted(stems, stem))
    return i < len(stems) and int(stems[i]) == stem


def _data_use_condition(after: int, grant_id: str, stems: np.ndarray, exempt: bool) -> AppendCondition:
    """Events after the assessed position that would change the decision."""

    def violated(events: Sequence[tuple[str, Any]]) -> str | None:
        for event_type, p in events:
            if event_type == "AccessRevoked" and p.grant_id == grant_id:
                return "the grant was revoked"
            if exempt:
                continue
            if event_type == "OptOutRegistered" and _in_cohort(stems, p.nhs_number):
                return "a patient in the cohort opted out"
            if event_type == "StudyConsentWithdrawn" and p.grant_id == grant_id and _in_cohort(stems, p.nhs_number):
                return "a patient in the cohort withdrew consent"
        return None

    return AppendCondition(
        after=after,
        event_types=frozenset({"AccessRevoked", "OptOutRegistered", "StudyConsentWithdrawn"}),
        violated=violated,
    )

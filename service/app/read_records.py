"""Reads are written to the ledger before the data leaves.

A patient's choices, history and receipts, the ledger entries an auditor
pages through and the cohorts it re-checks are personal data; an opt-out
filter call reveals who of a list opted out.  Each such read appends a
``PersonalDataRead`` event through the normal store path (so it is
hash-chained like every other event) and only then is the answer sent: if
the read cannot be recorded, it is not served.

Each read is its own aggregate (a fresh id at version 1), so recording
reads never contends with the patient's own writes.

An auditor's run (verify, export) pages through the whole log: it opens a
read session first, one ``PersonalDataRead`` of kind ``audit-session`` for
the range it will read, and names it on each page (``Ledger-Read-Session``);
pages the session covers are then served without another entry.  The
ledger itself is the session store: the session is the position of that
entry, checked against the caller, the range and its age.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import numpy as np
import structlog

from contracts.bodies import READ_SESSION_SECONDS, Receipt
from contracts.codes import Purpose, ReadKind, Role
from contracts.events import CohortCommitment, OptOutFilterApplied, PersonalDataRead
from service.app.caller import Caller
from service.domain.errors import NotPermitted
from service.store.event_log import NewEvent
from service.store.event_store import EventStore

# The response header naming the ledger position where this read was recorded.
READ_HEADER = "Ledger-Read-Recorded"
# The request header naming the read session a page is read under.
SESSION_HEADER = "Ledger-Read-Session"
SESSION_KIND: ReadKind = "audit-session"


def _role(caller: Caller, allowed: frozenset[str]) -> Role:
    # The role that let the read through; several only if the token carries several.
    return sorted(caller.roles & allowed or caller.roles)[0]  # type: ignore[return-value]


def current_request_id() -> str | None:
    """The current request's id (bound by the HTTP middleware), to cross-reference logs."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


async def record_read(
    store: EventStore,
    caller: Caller,
    what: ReadKind,
    allowed: frozenset[str],
    *,
    nhs_number: str | None = None,
    first_position: int | None = None,
    last_position: int | None = None,
    entries: int = 0,
    cohort_id: str | None = None,
) -> Receipt:
    event = PersonalDataRead(
        what=what,
        role=_role(caller, allowed),
        recorded_by=caller.subject[:200],
        reader_org=caller.org,
        nhs_number=str(nhs_number) if nhs_number is not None else None,
        first_position=first_position,
        last_position=last_position,
        entries=entries,
        by_patient=nhs_number is not None and caller.nhs_number == nhs_number,
        request_id=current_request_id(),
        cohort_id=cohort_id,
    )
    result = await store.append([NewEvent.alone(event)])
    return result.receipts[0]


def submitted_sha256(stems: np.ndarray) -> str:
    """SHA-256 of a filter call's numbers: their stems as uint32 little-endian, in the order sent."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(stems, dtype="<u4"))).hexdigest()


async def record_filter_call(
    store: EventStore,
    caller: Caller,
    submitted: int,
    cohort_sha256: str,
    *,
    grant_id: str | None,
    purpose: Purpose | None,
    removed: int,
    as_of: int,
    call_id: str | None = None,
    removed_commitment: CohortCommitment | None = None,
) -> Receipt:
    """Who checked how many patients, under which grant, against which state
    (``OptOutFilterApplied``: no NHS number, only a hash of the submitted list)."""
    assert caller.org is not None
    event = OptOutFilterApplied(
        recorded_by=caller.subject[:200],
        organisation_code=caller.org,
        submitted=submitted,
        removed=removed,
        as_of=as_of,
        cohort_sha256=cohort_sha256,
        grant_id=grant_id,
        purpose=purpose,
        request_id=current_request_id(),
        call_id=call_id,
        removed_commitment=removed_commitment,
    )
    result = await store.append([NewEvent.alone(event)])
    return result.receipts[0]


def session_expiry(recorded_at: datetime) -> datetime:
    return recorded_at + timedelta(seconds=READ_SESSION_SECONDS)


class ReadSessions:
    """Checks pages against the sessions they name.  Sessions are ledger
    entries, which never change, so each is looked up once and kept (a
    few hundred bytes each; the cache is emptied when it grows large)."""

    _KEEP = 10_000

    def __init__(self, store: EventStore):
        self.store = store
        self._known: dict[int, PersonalDataRead] = {}
        self._opened: dict[int, datetime] = {}

    async def covering(self, caller: Caller, header: str, first: int, last: int) -> int:
        """The session position if ``header`` names a live session of this
        caller covering ``first``..``last``; otherwise NotPermitted (403), saying why."""
        position = int(header) if header.isascii() and header.isdigit() and len(header) <= 19 else 0
        read = await self._session(position) if position else None
        refused = f"{SESSION_HEADER} {header[:20]!r} "
        if read is None:
            raise NotPermitted(refused + "is not a read session: open one with POST /v1/read-sessions")
        if read.recorded_by != caller.subject[:200]:
            raise NotPermitted(refused + "was opened by another caller: open your own with POST /v1/read-sessions")
        assert read.first_position is not None and read.last_position is not None
        if not read.first_position <= first <= last <= read.last_position:
            raise NotPermitted(refused + f"covers positions {read.first_position}-{read.last_position}, not "
                            f"{first}-{last}: open a session for this range with POST /v1/read-sessions")
        if datetime.now(timezone.utc) >= session_expiry(self._opened[position]):
            raise NotPermitted(refused + "has expired: open a new one with POST /v1/read-sessions")
        return position

    async def _session(self, position: int) -> PersonalDataRead | None:
        if position not in self._known:
            found = await self.store.read_positions([position]) if position <= 2**62 else []
            payload = found[0].entry.payload if found else None
            if not (isinstance(payload, PersonalDataRead) and payload.what == SESSION_KIND):
                return None  # not kept: a position beyond the head may yet become a session
            if len(self._known) >= self._KEEP:
                self._known.clear()
                self._opened.clear()
            self._known[position] = payload
            self._opened[position] = datetime.fromisoformat(found[0].entry.recorded_at)
        return self._known[position]

"""Reads of personal data are written to the ledger before the data leaves.

A patient's choices, history and receipts, and the ledger entries an
auditor pages through, are personal data.  Each such read appends a
``PersonalDataRead`` event through the normal store path (so it is
hash-chained like every other event) and only then is the answer sent: if
the read cannot be recorded, it is not served.

Each read is its own aggregate (a fresh id at version 1), so recording
reads never contends with the patient's own writes.
"""

from __future__ import annotations

from uuid import uuid4

import structlog

from contracts.bodies import Receipt
from contracts.codes import ReadKind, Role
from contracts.events import PersonalDataRead

from .commands import Caller
from .store import EventStore, NewEvent

# The response header naming the ledger position where this read was recorded.
READ_HEADER = "Ledger-Read-Recorded"


def _role(caller: Caller, allowed: frozenset[str]) -> Role:
    # The role that let the read through; several only if the token carries several.
    return sorted(caller.roles & allowed or caller.roles)[0]  # type: ignore[return-value]


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
) -> Receipt:
    request_id = structlog.contextvars.get_contextvars().get("request_id")
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
        request_id=request_id if isinstance(request_id, str) else None,
    )
    result = await store.append([NewEvent(uuid4(), "PersonalDataRead", uuid4(), 1, event)])
    return result.receipts[0]

"""From the log to the outbox: the notifications each subscription asked for,
made in ledger order, committed with the subscriptions' cursors.

Like a projection, it follows the log after a tracked position (each
subscription's ``cursor``); unlike one it never rebuilds: what was made
stays made, and a new subscription starts at the head."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import structlog

from contracts import cohort as cohorts
from contracts.decision import Reason
from contracts.entry import Entry
from contracts.nhs_number import NhsNumber
from projections.optout_filter import OptOutFilter
from projections.runner import Runner
from service.notify.outbox import Made, Outbox, SubscriptionRow
from service.store.event_store import EventStore

log = structlog.get_logger("consent_ledger.notify")

# One data-use notification lists at most this many patients (a bigger overlap is sent in parts).
PART = 10_000
BATCH = 500
_APPLIED = {Reason.NO_OPT_OUT: "no-opt-out", Reason.CONSENTED: "consent", Reason.OPTED_OUT_CONSENTED: "consent",
            Reason.OPTED_OUT_EXEMPT: "exemption"}
_CHOICE_EVENTS = {"OptOutRegistered": "opt-out", "OptOutWithdrawn": "opt-in", "StudyConsentGiven": "consent",
                  "StudyConsentWithdrawn": "consent-withdrawn"}


def webhook_id(subscription_id: str, position: int, kind: str, part: int = 0) -> str:
    """Stable for a notification, whichever process makes it: a receiver de-duplicates by it."""
    return f"msg_{subscription_id}_{position}_{kind.replace('.', '-')}_{part}"


class Notifier:
    def __init__(self, outbox: Outbox, store: EventStore, optouts: OptOutFilter, runner: Runner,
                 poll: float = 0.2):
        self.outbox, self.store, self.optouts, self.runner, self.poll = outbox, store, optouts, runner, poll
        self._patients: dict[str, tuple[int, np.ndarray]] = {}

    async def run(self, beat: Callable[[], None]) -> None:
        while True:
            made = await self.step()
            beat()
            if not made:
                await asyncio.sleep(self.poll)

    async def step(self) -> int:
        """Make the notifications of the next batch of entries; how many entries it covered."""
        head, _ = await self.store.head()
        behind = [s for s in await self.outbox.followed() if s.cursor < head]
        if not behind:
            return 0
        entries = [s.entry for s in await self.store.read_after(min(s.cursor for s in behind), BATCH)]
        last = entries[-1].position
        # Who a use included, and why, is the decision state's answer: wait until it has seen the batch.
        if not await self.runner.wait_for(last, 10.0, lambda: self.optouts.position):
            return 0
        state = self.optouts.snapshot()
        patients = {sub.id: await self._patients_of(sub) for sub in behind}
        # The cohorts the batch's uses name, fetched here; decoding, intersecting and listing up to millions
        # of patients happen in a worker thread, never on the event loop that serves requests.
        uses = any(len(patients[s.id]) and {"data-use.included", "data-use.opt-out-overridden"} & set(s.events)
                   for s in behind)
        stored = {e.payload.cohort_id: await self.store.cohort_members(e.payload.cohort_id)
                  for e in entries if uses and e.event_type == "DataUseRecorded"}
        made = await asyncio.to_thread(self._make, behind, entries, patients, state, stored)
        await self.outbox.commit(made, {s.id: last for s in behind})
        if made:
            log.info("notifications made", count=len(made), through=last)
        return len(entries)

    async def _patients_of(self, sub: SubscriptionRow) -> np.ndarray:
        cached = self._patients.get(sub.id)
        if cached is None or cached[0] != sub.patients_version:
            encoding, members = await self.outbox.patients(sub.id)
            stems = cohorts.decode_members(encoding, members) if encoding and members is not None \
                else np.empty(0, dtype=np.uint32)
            self._patients[sub.id] = cached = (sub.patients_version, stems)
        return cached[1]

    def _make(self, behind: list[SubscriptionRow], entries: list[Entry], patients: dict[str, np.ndarray],
              state: OptOutFilter, stored: dict[str, tuple[str, bytes] | None]) -> list[Made]:
        cohort_cache: dict[str, np.ndarray] = {}

        def cohort(cohort_id: str) -> np.ndarray:
            if cohort_id not in cohort_cache:
                found = stored.get(cohort_id)
                cohort_cache[cohort_id] = cohorts.decode_members(*found) if found else np.empty(0, dtype=np.uint32)
            return cohort_cache[cohort_id]

        return [m for sub in behind for e in entries if e.position > sub.cursor
                for m in self._notifications(sub, e, patients[sub.id], state, cohort)]

    def _notifications(self, sub: SubscriptionRow, e: Entry, patients: np.ndarray, state: OptOutFilter,
                       cohort: Callable[[str], np.ndarray]) -> list[Made]:
        t, p = e.event_type, e.payload
        wants = set(sub.events)
        out: list[Made] = []

        def made(kind: str, data: dict[str, Any], part: int = 0) -> None:
            body = msgspec.json.encode({"type": kind, "timestamp": e.recorded_at, "data": {"position": e.position,
                                                                                             **data}})
            out.append(Made(sub.id, webhook_id(sub.id, e.position, kind, part), kind, e.position, body))

        def subscribed(nhs: str) -> bool:
            stem = int(nhs[:9])
            i = int(np.searchsorted(patients, stem))
            return i < len(patients) and int(patients[i]) == stem

        if t == "DataUseRecorded" and wants & {"data-use.included", "data-use.opt-out-overridden"} and len(patients):
            members = np.intersect1d(cohort(p.cohort_id), patients, assume_unique=True)
            if len(members):
                record = state.grants.get(p.grant_id)
                terms = record.terms(p.opt_out_state_position, p.occurred_at) if record else None
                reasons = state.assess(members, p.grant_id, terms, p.opt_out_state_position) if terms else \
                    np.full(len(members), Reason.NO_OPT_OUT, dtype=np.uint8)
                use = {"use_id": p.use_id, "grant_id": p.grant_id, "organisation_code": p.organisation_code,
                       "purpose": p.purpose, "legal_basis": p.legal_basis, "datasets": list(p.datasets),
                       "access_method": p.access_method, "occurred_at": p.occurred_at}
                if "data-use.included" in wants:
                    listed = [{"nhs_number": str(NhsNumber.from_stem(int(s))),
                               "applied": _APPLIED.get(Reason(int(r)), "not-allowed")}
                              for s, r in zip(members, reasons)]
                    parts = (len(listed) + PART - 1) // PART
                    for i in range(parts):
                        made("data-use.included", {**use, "part": i + 1, "parts": parts,
                                                   "patients": listed[i * PART:(i + 1) * PART]}, i)
                overridden = members[reasons == Reason.OPTED_OUT_EXEMPT]
                if "data-use.opt-out-overridden" in wants and len(overridden):
                    x = p.exemption_applied
                    listed = [str(NhsNumber.from_stem(int(s))) for s in overridden]
                    parts = (len(listed) + PART - 1) // PART
                    for i in range(parts):
                        made("data-use.opt-out-overridden", {
                            **use, "exemption": {"basis": x.basis, "reference": x.reference} if x else None,
                            "part": i + 1, "parts": parts, "patients": listed[i * PART:(i + 1) * PART]}, i)
        elif t in _CHOICE_EVENTS and "choice.changed" in wants and subscribed(p.nhs_number):
            by_proxy = p.actor.kind == "proxy"
            channel = getattr(p, "channel", None)
            # The patient's own change in the app is no news to them; anyone else's, or any other channel, is.
            if by_proxy or (channel is not None and channel != "app"):
                made("choice.changed", {"nhs_number": p.nhs_number, "change": _CHOICE_EVENTS[t],
                                        "scope": getattr(p, "scope", None), "grant_id": getattr(p, "grant_id", None),
                                        "channel": channel, "actor": msgspec.to_builtins(p.actor)})
        elif t == "PersonalDataRead" and "record.read" in wants and p.nhs_number and not p.by_patient \
                and subscribed(p.nhs_number):
            made("record.read", {"nhs_number": p.nhs_number, "what": p.what, "role": p.role,
                                 "reader_org": p.reader_org})
        elif t in ("AccessGranted", "GrantApproved") and "grant.approved" in wants:
            record = state.grants.get(p.grant_id)
            if record is not None and _approved_at(record, e.position):
                g = record.granted
                made("grant.approved", {"grant_id": g.grant_id, "organisation": msgspec.to_builtins(g.organisation),
                                        "purpose": msgspec.to_builtins(g.purpose), "legal_basis": g.legal_basis,
                                        "datasets": list(g.datasets), "commercial": g.commercial,
                                        "valid_from": msgspec.to_builtins(g.valid_from),
                                        "valid_until": msgspec.to_builtins(g.valid_until)})
        return out


def _approved_at(record: Any, position: int) -> bool:
    """Whether the grant became approved at exactly this position (recorded without needing approval,
    or its last required approval)."""
    needs = record.granted.requires or ()
    if not needs:
        return record.position == position
    at = [record.approved.get(k) for k in needs]
    return None not in at and max(at) == position

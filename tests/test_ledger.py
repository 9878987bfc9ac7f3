"""The application's write path (service/app/ledger.py): decisions made on
the history a process holds, corrected by the log when that history is
stale. Two Ledger objects on one database stand for two service processes,
each holding its own histories."""

from __future__ import annotations

from datetime import datetime, timezone
from uuid import uuid4

from contracts.bodies import ChoiceRequest
from contracts.events import OptOutRegistered
from contracts.nhs_number import NhsNumber
from contracts.values import Actor
from service.app.caller import Caller, idempotency_key
from service.app.ledger import Ledger
from service.app.recent_histories import HeldEvent, RecentHistories
from service.domain.aggregates import patient_aggregate_id
from service.store.event_store import EventStore

APP = Caller(subject="app", roles=frozenset({"patient-app"}))
NHS = NhsNumber("9434765919")


def national(**changes) -> ChoiceRequest:
    return ChoiceRequest(scope="national", channel="app", actor=Actor(kind="patient"), **changes)


async def national_events(store: EventStore) -> list[str]:
    return [s.entry.event_type for s in await store.history(patient_aggregate_id(NHS))]


async def test_a_process_that_never_saw_the_patient_does_not_write_a_choice_already_in_force(store: EventStore):
    first, second = Ledger(store), Ledger(store)
    written = await first.choose(APP, NHS, True, national(), None)
    assert written.created
    # `second` holds no history: it guesses "no choices", which the log corrects.
    again = await second.choose(APP, NHS, True, national(), None)
    assert not again.created and again.receipt == written.receipt
    assert await national_events(store) == ["OptOutRegistered"]


async def test_a_stale_held_history_never_hides_a_change_made_by_another_process(store: EventStore):
    first, second = Ledger(store), Ledger(store)
    await first.choose(APP, NHS, True, national(), None)           # first holds: opted out
    await second.choose(APP, NHS, False, national(), None)         # second opts back in
    # first still holds "opted out"; deciding on it alone would answer "already opted out".
    out_again = await first.choose(APP, NHS, True, national(), None)
    assert out_again.created
    assert await national_events(store) == ["OptOutRegistered", "OptOutWithdrawn", "OptOutRegistered"]


async def test_a_write_decided_on_a_stale_history_is_refused_by_the_writer_and_decided_again(store: EventStore):
    first, second = Ledger(store), Ledger(store)
    await first.choose(APP, NHS, True, national(), None)
    await second.choose(APP, NHS, False, national(), None)
    # first holds version 1 ("opted out"); an opt-in decided on it would be version 2, which exists.
    outcome = await first.choose(APP, NHS, False, national(), None)
    assert not outcome.created  # the log says the patient is already opted in
    assert await national_events(store) == ["OptOutRegistered", "OptOutWithdrawn"]


async def test_a_retried_idempotency_key_answers_with_the_first_receipt_from_any_process(store: EventStore):
    first, second = Ledger(store), Ledger(store)
    key = idempotency_key(APP, "k-1", "POST", "/v1/patients/x/opt-out", b"{}")
    written = await first.choose(APP, NHS, True, national(), key)
    await first.choose(APP, NHS, False, national(), None)  # the state moves on
    replay = await second.choose(APP, NHS, True, national(), key)
    assert replay.replayed and replay.receipt == written.receipt


async def test_a_decision_to_write_nothing_is_only_believed_when_made_on_the_log(store: EventStore):
    ledger = Ledger(store)
    # A held history that says something the log never recorded (as a stale one could).
    said = OptOutRegistered(nhs_number=str(NHS), scope="national", channel="app", actor=Actor(kind="patient"),
                            recorded_by="nobody")
    ledger.recent.put(patient_aggregate_id(NHS), (HeldEvent("OptOutRegistered", 1, datetime.now(timezone.utc), said, 999),))
    outcome = await ledger.choose(APP, NHS, True, national(), None)
    assert outcome.created and await national_events(store) == ["OptOutRegistered"]


def test_recent_histories_are_bounded_and_forget_the_least_recently_used():
    held = RecentHistories(capacity=2)
    a, b, c = uuid4(), uuid4(), uuid4()
    event = (HeldEvent("X", 1, None, None, 1),)  # type: ignore[arg-type]
    held.put(a, event)
    held.put(b, event)
    held.get(a)           # a is now the most recent
    held.put(c, event)    # b goes
    assert held.get(b) == () and held.get(a) == event and held.get(c) == event and len(held) == 2


def test_a_history_that_moved_meanwhile_is_dropped_rather_than_extended():
    held = RecentHistories()
    a = uuid4()
    one = (HeldEvent("X", 1, None, None, 1),)  # type: ignore[arg-type]
    two = one + (HeldEvent("X", 2, None, None, 2),)  # type: ignore[arg-type]
    held.put(a, two)                                  # a concurrent write in this process
    held.extend(a, one, [HeldEvent("X", 2, None, None, 3)])  # type: ignore[arg-type]
    assert held.get(a) == ()

"""Subscriptions for patient app backends: register, manage, set patients, read the delivery log and the feed."""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import replace

import msgspec
from aiohttp import web

from contracts import api, bodies
from contracts import cohort as cohorts
from contracts.entry import format_recorded_at
from contracts.events import SubscriptionChanged, SubscriptionRegistered
from service.app.caller import Caller
from service.app.read_records import READ_HEADER, record_read
from service.domain.errors import NotFound
from service.http import numbers_body
from service.http.keys import CONFIG, OUTBOX, STORE, WORKERS
from service.http.problems import invalid
from service.http.requests import (
    Handler,
    body_of,
    int_query,
    json_response,
    read_body,
    required_caller,
)
from service.notify.addresses import AddressRefused, check_url, networks
from service.notify.outbox import SubscriptionRow
from service.store.event_log import NewEvent


def _backend(caller: Caller | None) -> Caller:
    return required_caller(caller)  # a backend's: the operation table refuses a patient's token (backend_only)


async def _view(request: web.Request, row: SubscriptionRow, secret: str | None = None) -> bodies.Subscription:
    return bodies.Subscription(
        id=row.id, url=row.url, events=list(row.events), description=row.description, status=row.status,
        patients=row.patients_count, created_at=format_recorded_at(row.created_at), position=row.cursor,
        pending=await request.app[OUTBOX].pending_count(row.id), secret=secret)


async def _owned(request: web.Request, caller: Caller) -> SubscriptionRow:
    row = await request.app[OUTBOX].get(request.match_info["subscription_id"], caller.subject)
    if row is None:
        raise NotFound("no such subscription of yours")
    return row


async def _record(request: web.Request, event: object) -> None:
    await request.app[STORE].append([NewEvent.alone(event)])


async def create_subscription(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _backend(caller)
    wanted = (await body_of(request, caller, api.BY_ID["create_subscription"])).value
    try:
        await check_url(wanted.url, networks(request.app[CONFIG].webhook_allow))
    except AddressRefused as exc:
        raise invalid(str(exc), "$.url", slug="url-refused") from None
    id, secret = uuid.uuid4().hex, "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    head, _ = await request.app[STORE].head()
    row = await request.app[OUTBOX].create(id, caller.subject, wanted.url, list(wanted.events), wanted.description,
                                           secret, head)
    await _record(request, SubscriptionRegistered(subscription_id=id, owner=caller.subject[:200], url=wanted.url,
                                                  events=list(wanted.events), recorded_by=caller.subject[:200]))
    return json_response(await _view(request, row, secret), 201)


async def list_subscriptions(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _backend(caller)
    rows = await request.app[OUTBOX].owned(caller.subject)
    return json_response(bodies.Subscriptions(subscriptions=[await _view(request, r) for r in rows]))


async def get_subscription(request: web.Request, caller: Caller | None) -> web.Response:
    return json_response(await _view(request, await _owned(request, _backend(caller))))


async def _change(request: web.Request, caller: Caller | None, status: str, change: str) -> web.Response:
    caller = _backend(caller)
    row = await _owned(request, caller)
    await request.app[OUTBOX].set_status(row.id, status)
    await _record(request, SubscriptionChanged(subscription_id=row.id, change=change,
                                               recorded_by=caller.subject[:200]))
    return json_response(await _view(request, replace(row, status=status)))


async def delete_subscription(request: web.Request, caller: Caller | None) -> web.Response:
    return await _change(request, caller, "deleted", "deleted")


async def pause_subscription(request: web.Request, caller: Caller | None) -> web.Response:
    return await _change(request, caller, "paused", "paused")


async def resume_subscription(request: web.Request, caller: Caller | None) -> web.Response:
    return await _change(request, caller, "active", "resumed")


def _encoded(content_type: str, raw: bytearray) -> tuple[int, str, bytes]:
    stems = cohorts.normalise(numbers_body.parse(content_type, raw, json_list=True).stems)
    return len(stems), *cohorts.encode_members(stems)


async def put_subscription_patients(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _backend(caller)
    row = await _owned(request, caller)
    raw = await read_body(request, api.BY_ID["put_subscription_patients"].body_limit)
    count, encoding, members = await request.app[WORKERS].run(_encoded, request.content_type, raw)
    await request.app[OUTBOX].replace_patients(row.id, count, encoding, members)
    await _record(request, SubscriptionChanged(subscription_id=row.id, change="patients-replaced", patients=count,
                                               recorded_by=caller.subject[:200]))
    return json_response(await _view(request, await _owned(request, caller)))


async def list_deliveries(request: web.Request, caller: Caller | None) -> web.Response:
    row = await _owned(request, _backend(caller))
    after, limit = int_query(request, "after", 0, 0, 2**62), int_query(request, "limit", 100, 1, 1000)
    found = await request.app[OUTBOX].feed(row.id, after, limit)
    return json_response(bodies.Deliveries(deliveries=[bodies.Delivery(
        seq=r["seq"], webhook_id=r["webhook_id"], type=r["type"], position=r["position"], attempts=r["attempts"],
        delivered_at=format_recorded_at(r["delivered_at"]) if r["delivered_at"] else None,
        next_attempt_at=None if r["delivered_at"] else format_recorded_at(r["next_attempt_at"]),
        last_status=r["last_status"], last_error=r["last_error"]) for r in found],
        next_after=found[-1]["seq"] if len(found) == limit else None))


async def subscription_events(request: web.Request, caller: Caller | None) -> web.Response:
    caller = _backend(caller)
    row = await _owned(request, caller)
    after, limit = int_query(request, "after", 0, 0, 2**62), int_query(request, "limit", 100, 1, 1000)
    found = await request.app[OUTBOX].feed(row.id, after, limit)
    read = await record_read(request.app[STORE], caller, "notifications", api.PATIENT_APP, entries=len(found))
    return json_response(bodies.Feed(events=[bodies.FeedItem(
        seq=r["seq"], webhook_id=r["webhook_id"], type=r["type"], position=r["position"],
        body=msgspec.json.decode(r["body"])) for r in found],
        next_after=found[-1]["seq"] if len(found) == limit else None), headers={READ_HEADER: str(read.position)})


HANDLERS: dict[str, Handler] = {
    "create_subscription": create_subscription,
    "list_subscriptions": list_subscriptions,
    "get_subscription": get_subscription,
    "delete_subscription": delete_subscription,
    "pause_subscription": pause_subscription,
    "resume_subscription": resume_subscription,
    "put_subscription_patients": put_subscription_patients,
    "list_deliveries": list_deliveries,
    "subscription_events": subscription_events,
}

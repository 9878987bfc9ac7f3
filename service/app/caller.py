"""Who is asking: the authenticated caller, and the idempotency key of its request."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from service.store.event_log import IdempotencyKey


@dataclass(frozen=True)
class Caller:
    """The authenticated system making a request."""

    subject: str
    roles: frozenset[str]
    org: str | None = None
    nhs_number: str | None = None


def idempotency_key(caller: Caller, key: str | None, method: str, path: str, body: bytes) -> IdempotencyKey | None:
    if key is None:
        return None
    digest = hashlib.sha256(f"{method} {path}\n".encode() + body).digest()
    return IdempotencyKey(scope=caller.subject, key=key, request_hash=digest)

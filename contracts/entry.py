"""The canonical ledger entry and the hashes over it.

This module is the executable form of ``contracts/LEDGER-FORMAT.md``; an
auditor can re-implement it from that document alone.

    entry      = JCS(RFC 8785) of {aggregate_id, aggregate_version, event_id,
                 event_type, payload, position, recorded_at}
    leaf_hash  = SHA-256(0x00 || entry)          (RFC 9162 leaf hash)
    chain_hash = SHA-256(chain_hash_prev || leaf_hash), chain_hash_0 = 32 zero bytes
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import msgspec

from .events import EVENT_TYPES, Event

# Sorted keys, no whitespace, UTF-8, minimal escapes: for the value space we
# use (strings, integers, booleans, null, arrays, objects) this is JCS.
_canonical = msgspec.json.Encoder(order="sorted")
_payload_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}

GENESIS_CHAIN_HASH = bytes(32)
LEAF_PREFIX = b"\x00"


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One ledger entry exactly as the leaf hash covers it."""

    position: int
    event_id: str
    event_type: str
    aggregate_id: str
    aggregate_version: int
    recorded_at: str
    payload: Any


def format_recorded_at(moment: datetime) -> str:
    """Fixed-width RFC 3339 UTC with microseconds, e.g. 2026-11-23T06:00:00.000000Z."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_entry(
    *,
    position: int,
    event_id: UUID,
    event_type: str,
    aggregate_id: UUID,
    aggregate_version: int,
    recorded_at: str,
    payload: Event,
) -> bytes:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return _canonical.encode(
        Entry(
            position=position,
            event_id=str(event_id),
            event_type=event_type,
            aggregate_id=str(aggregate_id),
            aggregate_version=aggregate_version,
            recorded_at=recorded_at,
            payload=payload,
        )
    )


def canonical_json(value: Any) -> bytes:
    """JCS bytes of any JSON value (used to re-derive an entry from its parts)."""
    return _canonical.encode(value)


def decode_entry(data: bytes) -> Entry:
    raw = msgspec.json.decode(data, type=Entry)
    decoder = _payload_decoders.get(raw.event_type)
    if decoder is None:
        raise ValueError(f"unknown event type {raw.event_type!r}")
    payload = decoder.decode(_canonical.encode(raw.payload))
    return msgspec.structs.replace(raw, payload=payload)


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + entry).digest()


def chain_hash(previous: bytes, leaf: bytes) -> bytes:
    return hashlib.sha256(previous + leaf).digest()

"""The in-memory opt-out filter: who is opted out, at a known position.

Each service process holds, per scope, the opted-out stems as a sorted
uint32 array (3.5M stems = 14 MB) plus a small dict of changes since that
array was built; membership of a million stems is one ``searchsorted``.
The changes are merged into the array once they grow past ``_COMPACT_AT``.

It starts from a snapshot of the choices projection (read with that
projection's position in one repeatable-read transaction) and then follows
the ledger through the runner, so it can be ahead of the projection tables
but never skips an event.  A patient counts as opted out while any scope
is opted out (the rule the domain applies to data uses).  Consents are
tracked per grant, and each grant's recorded opt-out exemption, so answers
are grant-aware.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace

import asyncpg
import numpy as np

from contracts.codes import OptOutScope, values
from contracts.cohort import sorted_unique
from contracts.entry import Entry, decode_entry
from contracts.values import Exemption

from .choices import stem_of
from .runner import Follower

_COMPACT_AT = 50_000
_EMPTY = np.empty(0, dtype=np.uint32)


def _member(sorted_set: np.ndarray, stems: np.ndarray) -> np.ndarray:
    if len(sorted_set) == 0 or len(stems) == 0:
        return np.zeros(len(stems), dtype=bool)
    i = np.searchsorted(sorted_set, stems)
    i[i == len(sorted_set)] = 0
    return sorted_set[i] == stems


class Bitmap:
    """One bit per stem between the smallest and largest member: 3.5M
    opt-outs spread over 72M stems is 9 MB, and a million random lookups
    take ~10 ms where ``searchsorted`` takes ~100 ms."""

    def __init__(self, members: np.ndarray):
        self.low = int(members[0]) if len(members) else 0
        span = int(members[-1]) - self.low + 1 if len(members) else 0
        self.bits = np.zeros((span + 7) // 8, dtype=np.uint8)
        if len(members):
            rel = members.astype(np.int64) - self.low
            byte = rel >> 3
            starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
            # Members are unique, so per byte the sum of their bits is their OR.
            self.bits[byte[starts]] = np.add.reduceat((1 << (rel & 7)).astype(np.uint8), starts)
        self.span = span

    def contains(self, stems: np.ndarray) -> np.ndarray:
        rel = stems.astype(np.int64) - self.low
        inside = (rel >= 0) & (rel < self.span)
        rel = np.where(inside, rel, 0)
        return inside & ((self.bits[rel >> 3] >> (rel & 7).astype(np.uint8)) & 1).astype(bool)


class StemSet:
    """A sorted array (with a bitmap index) plus pending changes (stem -> member?)."""

    def __init__(self, base: np.ndarray = _EMPTY):
        self.base = np.asarray(base, dtype=np.uint32)
        self.index = Bitmap(self.base)
        self.changes: dict[int, bool] = {}
        self._added = self._removed = _EMPTY

    def set(self, stem: int, member: bool) -> None:
        self.changes[stem] = member
        if len(self.changes) >= _COMPACT_AT:
            self.compact()
        else:
            self._added = self._removed = None  # type: ignore[assignment]

    def compact(self) -> None:
        added = np.array(sorted(s for s, m in self.changes.items() if m), dtype=np.uint32)
        removed = np.array(sorted(s for s, m in self.changes.items() if not m), dtype=np.uint32)
        kept = self.base[~_member(removed, self.base)] if len(removed) else self.base
        self.base = sorted_unique(np.concatenate([kept, added])).astype(np.uint32)
        self.index = Bitmap(self.base)
        self.changes.clear()
        self._added = self._removed = _EMPTY

    def _pending(self) -> tuple[np.ndarray, np.ndarray]:
        if self._added is None:
            self._added = np.array(sorted(s for s, m in self.changes.items() if m), dtype=np.uint32)
            self._removed = np.array(sorted(s for s, m in self.changes.items() if not m), dtype=np.uint32)
        return self._added, self._removed

    def snapshot(self) -> "StemSet":
        """A copy later changes do not touch: the arrays are shared (they are
        replaced, never changed in place), the pending changes copied."""
        copy = StemSet.__new__(StemSet)
        copy.base, copy.index = self.base, self.index
        copy.changes = dict(self.changes)
        copy._added, copy._removed = self._added, self._removed
        return copy

    def contains(self, stems: np.ndarray) -> np.ndarray:
        mask = self.index.contains(stems) if len(self.base) else np.zeros(len(stems), dtype=bool)
        if self.changes:
            added, removed = self._pending()
            if len(removed):
                mask &= ~_member(removed, stems)
            if len(added):
                mask |= _member(added, stems)
        return mask

    def __len__(self) -> int:
        added, removed = self._pending() if self.changes else (_EMPTY, _EMPTY)
        base = self.base
        return len(base) - int(_member(base, removed).sum()) + int((~_member(base, added)).sum())

    def array(self) -> np.ndarray:
        if self.changes:
            self.compact()
        return self.base


_COPY_ROW = np.dtype([("fields", ">i2"), ("length", ">i4"), ("stem", ">i4")])


async def _copy_stems(conn: asyncpg.Connection, query: str, *args: object) -> np.ndarray:
    """One integer column via binary COPY, parsed by numpy: millions of rows
    without a Python object each (seconds and hundreds of MB saved)."""
    buffer = io.BytesIO()
    await conn.copy_from_query(query, *args, output=buffer, format="binary")
    data = buffer.getbuffer()
    header = 19 + int.from_bytes(data[15:19], "big")  # signature, flags, extension length
    rows = np.frombuffer(data[header:len(data) - 2], dtype=_COPY_ROW)
    return rows["stem"].astype(np.uint32)


@dataclass
class GrantRule:
    exemption: Exemption | None
    revoked: bool = False


@dataclass(frozen=True)
class FilterResult:
    keep: np.ndarray  # bool per input stem
    removed: int
    consented_kept: int
    exemption: Exemption | None
    as_of: int


class OptOutFilter(Follower):
    def __init__(self) -> None:
        self.position = 0
        self.scopes: dict[str, StemSet] = {s: StemSet() for s in values(OptOutScope)}
        self.consents: dict[str, StemSet] = {}
        self.grants: dict[str, GrantRule] = {}

    @classmethod
    async def load(cls, conn: asyncpg.Connection, projection: str = "choices") -> "OptOutFilter":
        """Snapshot the choices projection (and grants from the ledger) at one position."""
        f = cls()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            f.position = await conn.fetchval(
                "SELECT coalesce((SELECT position FROM projection_positions WHERE name = $1), 0)", projection
            )
            for scope in f.scopes:
                # Sorted here, not by the server: a sequential scan beats an
                # index scan in stem order over a heap in arrival order.
                f.scopes[scope] = StemSet(np.sort(await _copy_stems(
                    conn, "SELECT stem FROM patient_choices WHERE scope = $1 AND opted_out", scope
                )))
            consents: dict[str, list[int]] = {}
            for r in await conn.fetch("SELECT grant_id, stem FROM patient_consents ORDER BY grant_id, stem"):
                consents.setdefault(r[0], []).append(r[1])
            f.consents = {g: StemSet(np.array(s, dtype=np.uint32)) for g, s in consents.items()}
            # Grants are few: read their events from the ledger up to the snapshot.
            rows = await conn.fetch(
                "SELECT entry FROM ledger_events WHERE event_type IN ('AccessGranted', 'AccessRevoked')"
                " AND position <= $1 ORDER BY position",
                f.position,
            )
            f._grants([decode_entry(r[0]) for r in rows])
        return f

    def _grants(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            if e.event_type == "AccessGranted":
                self.grants[e.payload.grant_id] = GrantRule(e.payload.opt_out_exemption)
            elif e.event_type == "AccessRevoked" and e.payload.grant_id in self.grants:
                self.grants[e.payload.grant_id].revoked = True

    def follow(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            if e.position <= self.position:
                continue
            t, p = e.event_type, e.payload
            if t == "OptOutRegistered" or t == "OptOutWithdrawn":
                self.scopes[p.scope].set(stem_of(p.nhs_number), t == "OptOutRegistered")
            elif t == "StudyConsentGiven" or t == "StudyConsentWithdrawn":
                self.consents.setdefault(p.grant_id, StemSet()).set(stem_of(p.nhs_number), t == "StudyConsentGiven")
            elif t in ("AccessGranted", "AccessRevoked"):
                self._grants([e])
            self.position = e.position

    def snapshot(self) -> "OptOutFilter":
        """A copy that ``follow`` does not change, so that a worker thread can
        answer a question about millions of stems from it while the event
        loop keeps following the ledger.  Cheap: arrays are shared, the
        small pending changes and grant rules copied."""
        copy = OptOutFilter()
        copy.position = self.position
        copy.scopes = {scope: s.snapshot() for scope, s in self.scopes.items()}
        copy.consents = {grant: s.snapshot() for grant, s in self.consents.items()}
        copy.grants = {grant: replace(rule) for grant, rule in self.grants.items()}
        return copy

    # --- questions --------------------------------------------------------------

    def opted_out(self, stems: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(stems), dtype=bool)
        for s in self.scopes.values():
            mask |= s.contains(stems)
        return mask

    def consented(self, stems: np.ndarray, grant_id: str | None) -> np.ndarray:
        c = self.consents.get(grant_id) if grant_id else None
        return c.contains(stems) if c is not None else np.zeros(len(stems), dtype=bool)

    def filter(self, stems: np.ndarray, grant_id: str | None = None) -> FilterResult:
        """Which stems may be used: not opted out, or consented to the grant,
        or all of them when the grant records an opt-out exemption."""
        rule = self.grants.get(grant_id) if grant_id else None
        if rule is not None and rule.exemption is not None:
            return FilterResult(np.ones(len(stems), dtype=bool), 0, 0, rule.exemption, self.position)
        out = self.opted_out(stems)
        consented = out & self.consented(stems, grant_id)
        excluded = out & ~consented
        return FilterResult(~excluded, int(excluded.sum()), int(consented.sum()), None, self.position)

    def assess(self, stems: np.ndarray, grant_id: str) -> tuple[int, int, int]:
        """(position, opted out, of whom consented) for a sorted unique cohort."""
        out = self.opted_out(stems)
        consented = out & self.consented(stems, grant_id)
        return self.position, int(out.sum()), int(consented.sum())

    def opted_out_count(self) -> int:
        return int(len(sorted_unique(np.concatenate([s.array() for s in self.scopes.values()]))))

"""The in-memory decision state: every patient's opt-outs and consents, and
every grant, at any position, built from the ledger's own entries.

The opt-out filter and the data-use check both answer from here, through
the one rule (``contracts.decision``).  Nothing here comes from a
projection table: at start the state is read from the hash-chained entry
bytes of ``ledger_events`` (``load``), then it follows the ledger through
the runner.  So what a decision sees cannot be changed by rewriting a
read model, and the auditor's ``verify --decisions`` replays the very same
entries.

Each yes/no choice (opted out of one scope; consented to one grant) is a
``Timeline``: the current members as a sorted uint32 array with a bitmap
index (3.5M opt-outs: 14 MB + 9 MB; a million lookups ~10 ms), plus every
change as (position, stem, value) arrays, so the state at an earlier
position (a data use that occurred in the past) is the current state with
only the stems changed since then looked up again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

import asyncpg
import numpy as np

from contracts import decision
from contracts.codes import OptOutScope, values
from contracts.cohort import sorted_unique
from contracts.decision import Choices, Terms
from contracts.entry import Entry, decode_entry
from contracts.events import AccessGranted
from contracts.values import Exemption

from .choices import stem_of
from .runner import Follower

_COMPACT_AT = 50_000
_EMPTY = np.empty(0, dtype=np.uint32)
SCOPES: tuple[str, ...] = values(OptOutScope)
assert SCOPES == ("national", "type-1", "commercial", "non-research", "non-planning")  # _CLASSIFY's codes


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
            rel = members.astype(np.uint32) - np.uint32(self.low)  # uint32 throughout: 3.5M members, no int64 copies
            byte = rel >> np.uint32(3)
            starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
            bit = np.left_shift(np.uint8(1), (rel & np.uint32(7)).astype(np.uint8))
            # Members are unique, so per byte the sum of their bits is their OR.
            self.bits[byte[starts]] = np.add.reduceat(bit, starts, dtype=np.uint8)
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

    def array(self) -> np.ndarray:
        if self.changes:
            self.compact()
        return self.base


def _last_per_key(keys: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, the flag of each key's last change) for changes in position order."""
    order = np.argsort(keys, kind="stable")
    k, f = keys[order], flags[order]
    last = np.r_[k[1:] != k[:-1], True] if len(k) else np.empty(0, dtype=bool)
    return k[last], f[last]


class Timeline:
    """One yes/no choice per stem, now and at any earlier position."""

    def __init__(self, positions: np.ndarray | None = None, stems: np.ndarray | None = None,
                 flags: np.ndarray | None = None):
        self._positions = np.empty(0, np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
        self._stems = _EMPTY if stems is None else np.asarray(stems, dtype=np.uint32)
        self._flags = np.empty(0, bool) if flags is None else np.asarray(flags, dtype=bool)
        keys, last = _last_per_key(self._stems, self._flags)
        self.current = StemSet(keys[last])
        self._pending: list[tuple[int, int, bool]] = []

    def set(self, position: int, stem: int, flag: bool) -> None:
        self._pending.append((position, stem, flag))
        self.current.set(stem, flag)

    def snapshot(self) -> "Timeline":
        """A copy later changes do not touch (arrays shared: they are replaced, never changed in place)."""
        copy = Timeline.__new__(Timeline)
        copy._positions, copy._stems, copy._flags = self._positions, self._stems, self._flags
        copy._pending = list(self._pending)
        copy.current = self.current.snapshot()
        return copy

    def _log(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._pending:
            p, s, f = zip(*self._pending)
            self._positions = np.concatenate([self._positions, np.array(p, np.int64)])
            self._stems = np.concatenate([self._stems, np.array(s, np.uint32)])
            self._flags = np.concatenate([self._flags, np.array(f, bool)])
            self._pending.clear()
        return self._positions, self._stems, self._flags

    def contains(self, stems: np.ndarray, position: int | None = None) -> np.ndarray:
        """Membership now, or as it was once ``position`` was applied."""
        mask = self.current.contains(stems)
        if position is None:
            return mask
        positions, log_stems, flags = self._log()
        cut = int(np.searchsorted(positions, position, side="right"))
        if cut == len(positions):
            return mask
        changed = _member(sorted_unique(log_stems[cut:]), stems)
        if not changed.any():
            return mask
        asked = sorted_unique(stems[changed])
        before = _member(asked, log_stems[:cut])
        keys, last = _last_per_key(log_stems[:cut][before], flags[:cut][before])
        mask[changed] = _member(keys[last], stems[changed])
        return mask


@dataclass
class GrantRecord:
    granted: AccessGranted
    position: int
    recorded_at: str
    revoked_position: int | None = None
    approved: dict[str, int] = field(default_factory=dict)  # approval -> its position

    def terms(self, position: int, instant: datetime) -> Terms:
        return Terms.at(self.granted, self.position, self.revoked_position, position, instant, self.approved)


@dataclass(frozen=True)
class FilterResult:
    keep: np.ndarray  # bool per input stem
    removed: int
    consented_kept: int
    exemption: Exemption | None
    as_of: int


# --- reading the state from the ledger's entry bytes ----------------------------------

# An entry is the JCS (sorted keys) encoding of {aggregate_id, aggregate_version,
# event_id, event_type, payload, position, recorded_at}: its event type starts
# at byte 141 + (digits of aggregate_version).  JSON escaping means a quoted key
# can only be matched where it is a key.  Each row is checked against that
# layout, so an entry this code cannot read refuses the start.  Every
# expression appears once: PostgreSQL would evaluate a repeated one again.
_CLASSIFY = """
SELECT position, kind,
       CASE WHEN kind >= 0 THEN substring(entry FROM s + position('"nhs_number":"'::bytea IN substring(entry FROM s))
                                          + 13 FOR 9) ELSE '000000000'::bytea END AS digits,
       -- The scope is the payload's last member, near the end: told apart by its fifth letter
       -- (natiOnal, type-1, commErcial, non-Research, non-Planning); anything else is -1.
       CASE get_byte(tail, position('"scope":"'::bytea IN tail) + 12)
            WHEN 111 THEN 0 WHEN 45 THEN 1 WHEN 101 THEN 2 WHEN 114 THEN 3 WHEN 112 THEN 4
            ELSE -1 END::int2 AS scope
FROM (
    SELECT position, entry, s, substring(entry FROM length(entry) - 120) AS tail,
        CASE WHEN substring(entry FROM s - 14 FOR 14) <> '"event_type":"'::bytea THEN -2
             WHEN substring(entry FROM s FOR 18) = 'OptOutRegistered",'::bytea THEN 1
             WHEN substring(entry FROM s FOR 17) = 'OptOutWithdrawn",'::bytea THEN 0
             WHEN substring(entry FROM s FOR 8) IN ('StudyCon'::bytea, 'AccessGr'::bytea, 'AccessRe'::bytea,
                                                    'GrantApp'::bytea) THEN -1
             ELSE -3 END::int2 AS kind
    FROM (SELECT position, entry, 140 + position(','::bytea IN substring(entry FROM 76 FOR 12)) AS s
          FROM ledger_events WHERE position > $1 AND position <= $2) located
) classified WHERE kind <> -3
"""
_ROW = np.dtype([("fields", ">i2"), ("l1", ">i4"), ("position", ">i8"), ("l2", ">i4"), ("kind", ">i2"),
                 ("l3", ">i4"), ("digits", "S9"), ("l4", ">i4"), ("scope", ">i2")])
_DIGITS = _ROW.fields["digits"][1]
_OTHER, _MALFORMED = -1, -2


@dataclass
class _Classified:
    """The decision-relevant entries of a position range, parsed as they stream
    in (so a national set never sits in memory as raw COPY bytes)."""

    positions: list[np.ndarray]
    kinds: list[np.ndarray]
    stems: list[np.ndarray]
    scopes: list[np.ndarray]
    rest: bytes = b""
    header: bool = True

    async def take(self, chunk: bytes) -> None:
        data = self.rest + chunk
        start = 0
        if self.header:
            if len(data) < 19:
                self.rest = data
                return
            start, self.header = 19 + int.from_bytes(data[15:19], "big"), False  # signature, flags, extension
        whole = (len(data) - start) // _ROW.itemsize * _ROW.itemsize
        rows = np.frombuffer(data, dtype=_ROW, count=whole // _ROW.itemsize, offset=start)
        self.rest = data[start + whole:]
        raw = np.frombuffer(data, dtype=np.uint8, count=whole, offset=start).reshape(-1, _ROW.itemsize)
        digits = raw[:, _DIGITS:_DIGITS + 9] - np.uint8(48)
        stems = np.zeros(len(rows), dtype=np.uint32)
        for column in range(9):  # column by column in uint32: no (n, 9) int64 temporaries
            stems *= np.uint32(10)
            stems += digits[:, column]
        kinds = rows["kind"].astype(np.int8)
        if ((kinds >= 0) & (digits.max(axis=1, initial=0) > 9)).any():
            raise LedgerStateError("an opt-out entry's NHS number is not 10 digits")
        self.positions.append(rows["position"].astype(np.int64))
        self.kinds.append(kinds)
        self.stems.append(stems)
        self.scopes.append(rows["scope"].astype(np.int8))


async def _classified(pool: asyncpg.Pool, after: int, upto: int) -> _Classified:
    """Every entry in (after, upto] that decisions depend on, via binary COPY
    parsed by numpy: millions of rows without a Python object each."""
    found = _Classified([], [], [], [])  # positions, kinds, stems, scopes
    async with pool.acquire() as conn:
        async with conn.transaction(readonly=True):
            # JIT-compiling these expressions costs seconds and saves nothing.
            await conn.execute("SET LOCAL jit = off")
            await conn.copy_from_query(_CLASSIFY, after, upto, output=found.take, format="binary")
    if found.rest not in (b"", b"\xff\xff"):  # the trailer
        raise LedgerStateError("the ledger scan ended mid-row")
    return found


class LedgerStateError(RuntimeError):
    """The ledger's entries cannot be read as this version writes them: refuse to start."""


class OptOutFilter(Follower):
    def __init__(self) -> None:
        self.position = 0
        self.scopes: dict[str, Timeline] = {s: Timeline() for s in SCOPES}
        self.consents: dict[str, Timeline] = {}
        self.grants: dict[str, GrantRecord] = {}

    @classmethod
    async def load(cls, pool: asyncpg.Pool, parts: int = 2) -> "OptOutFilter":
        """The state at the ledger head, read from the entries themselves, in
        ``parts`` position ranges at once (entries at or below the head never change)."""
        f = cls()
        async with pool.acquire() as conn:
            head = await conn.fetchval("SELECT position FROM ledger_head")
        bounds = [head * i // parts for i in range(parts + 1)]
        parts_found = await asyncio.gather(*(_classified(pool, lo, hi) for lo, hi in zip(bounds, bounds[1:])))
        positions, kinds, stems, scopes = (np.concatenate([a for part in parts_found for a in getattr(part, name)] or
                                                          [np.empty(0, dtype)])
                                           for name, dtype in (("positions", np.int64), ("kinds", np.int8),
                                                               ("stems", np.uint32), ("scopes", np.int8)))
        del parts_found  # peak memory: the chunks go as soon as they are joined
        bad = positions[kinds == _MALFORMED]
        if len(bad):
            raise LedgerStateError(f"the ledger entry at position {int(bad.min())} is not laid out as this version "
                                   "writes entries; run `consent-ledger verify` before starting the service")
        other = positions[kinds == _OTHER]
        choice = kinds >= 0
        if not choice.all():
            positions, stems, kinds, scopes = positions[choice], stems[choice], kinds[choice], scopes[choice]
        if (scopes < 0).any():
            raise LedgerStateError(f"the opt-out entry at position {int(positions[scopes < 0].min())} names a scope "
                                   "this version does not know")
        opted_out = kinds == 1
        del kinds, choice
        if len(positions) > 1 and not (positions[1:] > positions[:-1]).all():  # the heap is nearly always in order
            order = np.argsort(positions, kind="stable")
            positions, stems, opted_out, scopes = positions[order], stems[order], opted_out[order], scopes[order]
        for code, scope in enumerate(SCOPES):
            mine = scopes == code
            f.scopes[scope] = (Timeline(positions, stems, opted_out) if mine.all()
                               else Timeline(positions[mine], stems[mine], opted_out[mine]))
        other = np.sort(other)
        async with pool.acquire() as conn:
            entries = [decode_entry(r[0]) for r in await conn.fetch(
                "SELECT entry FROM ledger_events WHERE position = ANY($1::bigint[]) ORDER BY position",
                other.tolist())] if len(other) else []
        consents: dict[str, list[tuple[int, int, bool]]] = {}
        for e in entries:
            if e.event_type in ("StudyConsentGiven", "StudyConsentWithdrawn"):
                consents.setdefault(e.payload.grant_id, []).append(
                    (e.position, stem_of(e.payload.nhs_number), e.event_type == "StudyConsentGiven"))
            else:
                f._grant(e)
        for grant_id, changes in consents.items():
            p, s, g = (np.array(c) for c in zip(*changes))
            f.consents[grant_id] = Timeline(p, s, g)
        f.position = head
        return f

    def _grant(self, e: Entry) -> None:
        if e.event_type == "AccessGranted":
            self.grants[e.payload.grant_id] = GrantRecord(e.payload, e.position, e.recorded_at)
        elif e.event_type == "AccessRevoked" and e.payload.grant_id in self.grants:
            record = self.grants[e.payload.grant_id]
            if record.revoked_position is None:
                record.revoked_position = e.position
        elif e.event_type == "GrantApproved" and e.payload.grant_id in self.grants:
            self.grants[e.payload.grant_id].approved.setdefault(e.payload.approval, e.position)

    def follow(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            if e.position <= self.position:
                continue
            t, p = e.event_type, e.payload
            if t == "OptOutRegistered" or t == "OptOutWithdrawn":
                self.scopes[p.scope].set(e.position, stem_of(p.nhs_number), t == "OptOutRegistered")
            elif t == "StudyConsentGiven" or t == "StudyConsentWithdrawn":
                self.consents.setdefault(p.grant_id, Timeline()).set(
                    e.position, stem_of(p.nhs_number), t == "StudyConsentGiven")
            elif t in ("AccessGranted", "AccessRevoked", "GrantApproved"):
                self._grant(e)
            self.position = e.position

    def snapshot(self) -> "OptOutFilter":
        """A copy that ``follow`` does not change, so that a worker thread can
        answer a question about millions of stems from it while the event
        loop keeps following the ledger.  Cheap: arrays are shared, the
        small pending changes and grant records copied."""
        copy = OptOutFilter()
        copy.position = self.position
        copy.scopes = {scope: s.snapshot() for scope, s in self.scopes.items()}
        copy.consents = {grant: s.snapshot() for grant, s in self.consents.items()}
        copy.grants = {grant: replace(record, approved=dict(record.approved)) for grant, record in self.grants.items()}
        return copy

    # --- questions: all answered by the one rule ------------------------------------

    def terms(self, grant_id: str | None, instant: datetime, position: int | None = None) -> Terms:
        """A grant's terms at ``position`` (default: now); no grant means opt-outs only."""
        if grant_id is None:
            return Terms(status="active")
        record = self.grants.get(grant_id)
        if record is None:
            return Terms(status="not-recorded")
        return record.terms(self.position if position is None else position, instant)

    def choices(self, stems: np.ndarray, grant_id: str | None, position: int | None = None) -> Choices:
        """Each stem's choices as of ``position`` (default: now)."""
        consents = self.consents.get(grant_id) if grant_id else None
        return Choices.of(
            {scope: s.contains(stems, position) for scope, s in self.scopes.items()},
            consents.contains(stems, position) if consents is not None else np.zeros(len(stems), dtype=bool),
        )

    def assess(self, stems: np.ndarray, grant_id: str | None, terms: Terms, position: int | None = None) -> np.ndarray:
        """The rule's reason for each stem at ``position`` (pure CPU, no I/O)."""
        return decision.decide(self.choices(stems, grant_id, position), terms)

    def filter(self, stems: np.ndarray, grant_id: str | None, terms: Terms) -> FilterResult:
        """Which stems may be used now under the grant (or with opt-outs alone)."""
        reasons = self.assess(stems, grant_id, terms)
        keep = decision.included(reasons)
        exemption = terms.exemption if not terms.opt_outs_apply else None
        return FilterResult(keep, int(len(keep) - keep.sum()),
                            int((reasons == decision.Reason.OPTED_OUT_CONSENTED).sum()), exemption, self.position)

    def opted_out_count(self) -> int:
        return int(len(sorted_unique(np.concatenate([s.current.array() for s in self.scopes.values()]))))

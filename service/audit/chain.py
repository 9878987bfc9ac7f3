"""Recompute and check the hash chain over a stream of ledger entries.

Used by the tests, the service's own checks and the auditor's verify
command: it trusts nothing but the entry bytes, and reports the first
position where anything disagrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import msgspec

from contracts.entry import GENESIS_CHAIN_HASH, chain_hash, decode_entry, leaf_hash
from contracts.merkle import CompactRange


class _Positioned(msgspec.Struct):
    position: int


# Checking the hashes needs only valid JSON and the position; typing every
# payload is the service's job, and skipping it doubles an auditor's speed.
_position_only = msgspec.json.Decoder(_Positioned)


@dataclass(frozen=True)
class Failure:
    position: int
    what: str  # "position" | "entry" | "leaf" | "chain" | "head" | "size" | "root" | "signature" | "consistency"
    detail: str

    def __str__(self) -> str:
        return f"position {self.position}: {self.what}: {self.detail}"


class ChainVerifier:
    """Feed entries in order; ``failure`` holds the first thing that was wrong.

    It also grows the RFC 9162 Merkle tree over the recomputed leaves, so
    ``root()`` is the tree head of everything accepted, and it remembers the
    root at ``mark`` entries (to compare with an earlier checkpoint)."""

    def __init__(self, *, mark: int = 0, typed: bool = True) -> None:
        self.size = 0
        self.chain = GENESIS_CHAIN_HASH
        self.failure: Failure | None = None
        self.tree = CompactRange()
        self.mark = mark
        self.mark_root: bytes | None = None
        self._typed = typed

    def add(self, position: int, entry: bytes, leaf: bytes | None, chain: bytes | None) -> bool:
        """``leaf`` and ``chain`` are what the source claims; None when it claims nothing."""
        if self.failure is not None:
            return False
        expected = self.size + 1
        if position != expected:
            return self._fail(expected, "position", f"expected entry {expected}, found {position}")
        try:
            found = decode_entry(entry).position if self._typed else _position_only.decode(entry).position
        except (msgspec.DecodeError, ValueError) as exc:
            return self._fail(position, "entry", f"entry does not decode: {exc}")
        if found != position:
            return self._fail(position, "entry", f"entry says position {found}")
        recomputed = leaf_hash(entry)
        if leaf is not None and recomputed != leaf:
            return self._fail(position, "leaf", f"leaf hash {leaf.hex()} != recomputed {recomputed.hex()}")
        linked = chain_hash(self.chain, recomputed)
        if chain is not None and linked != chain:
            return self._fail(position, "chain", f"chain hash {chain.hex()} != recomputed {linked.hex()}")
        self.size, self.chain = position, linked
        self.tree.append(recomputed)
        if position == self.mark:
            self.mark_root = self.tree.root()
        return True

    def root(self) -> bytes:
        return self.tree.root()

    def _fail(self, position: int, what: str, detail: str) -> bool:
        self.failure = Failure(position, what, detail)
        return False


async def verify_database(conn: asyncpg.Connection, batch: int = 10_000) -> ChainVerifier:
    """Verify every stored entry and that the head row matches the last one."""
    verifier = ChainVerifier()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchrow("SELECT position, chain_hash FROM ledger_head")
        cursor = conn.cursor(
            "SELECT position, entry, leaf_hash, chain_hash FROM ledger_events ORDER BY position",
            prefetch=batch,
        )
        async for r in cursor:
            if not verifier.add(r["position"], bytes(r["entry"]), bytes(r["leaf_hash"]), bytes(r["chain_hash"])):
                return verifier
        if verifier.size != head["position"] or verifier.chain != bytes(head["chain_hash"]):
            verifier.failure = Failure(
                verifier.size + 1, "head", f"head says {head['position']}, entries end at {verifier.size}"
            )
    return verifier

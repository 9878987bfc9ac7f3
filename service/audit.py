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


@dataclass(frozen=True)
class Failure:
    position: int
    what: str  # "position" | "entry" | "leaf" | "chain" | "head"
    detail: str

    def __str__(self) -> str:
        return f"position {self.position}: {self.what}: {self.detail}"


class ChainVerifier:
    """Feed entries in order; ``failure`` holds the first thing that was wrong."""

    def __init__(self) -> None:
        self.size = 0
        self.chain = GENESIS_CHAIN_HASH
        self.failure: Failure | None = None

    def add(self, position: int, entry: bytes, leaf: bytes, chain: bytes) -> bool:
        if self.failure is not None:
            return False
        expected = self.size + 1
        if position != expected:
            return self._fail(expected, "position", f"expected entry {expected}, found {position}")
        try:
            decoded = decode_entry(entry)
        except (msgspec.DecodeError, ValueError) as exc:
            return self._fail(position, "entry", f"entry does not decode: {exc}")
        if decoded.position != position:
            return self._fail(position, "entry", f"entry says position {decoded.position}")
        recomputed = leaf_hash(entry)
        if recomputed != leaf:
            return self._fail(position, "leaf", f"leaf hash {leaf.hex()} != recomputed {recomputed.hex()}")
        linked = chain_hash(self.chain, recomputed)
        if linked != chain:
            return self._fail(position, "chain", f"chain hash {chain.hex()} != recomputed {linked.hex()}")
        self.size, self.chain = position, linked
        return True

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

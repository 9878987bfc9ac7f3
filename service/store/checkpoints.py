"""Signed checkpoints: a new one at most every interval while the log grows.

Every checkpoint is signed under a PostgreSQL advisory lock after checking,
from the stored tree, that it is at least as large as the last one and
consistent with it, so no two processes (or restarts) ever sign two
checkpoints that disagree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import structlog

from contracts import merkle, note
from service.config import Config, ConfigError
from service.store.tiles import TileReader

log = structlog.get_logger(__name__)

_LOCK_KEY = 0x434B5054  # "CKPT": one signer at a time across processes
DEV_LOG_KEY_FILE = "log-signing.key"


class CheckpointRefused(Exception):
    """The stored tree disagrees with the last signed checkpoint: never sign."""


@dataclass(frozen=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: str
    signed_at: datetime


def load_signers(config: Config) -> tuple[list[note.Signer], bool]:
    """The log's signing keys, and whether the development key was generated."""
    paths = ([config.log_key_file] if config.log_key_file else []) + list(config.log_extra_key_files)
    development = False
    if not paths:
        if config.production:
            raise ConfigError("CONSENT_LEDGER_LOG_KEY must be set when CONSENT_LEDGER_ENV=production "
                              "(make one with `consent-ledger keys generate`)")
        path = config.data_dir / DEV_LOG_KEY_FILE
        if not path.exists():
            write_key(path, note.Signer.generate(config.log_origin))
        paths, development = [path], True
    signers = [note.parse_signer(p.read_text()) for p in paths]
    return signers, development


def write_key(path: Path, signer: note.Signer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=False)
    path.write_text(signer.private_text + "\n")


class CheckpointLog:
    def __init__(self, pool: asyncpg.Pool, reader: TileReader, signers: list[note.Signer], origin: str,
                 interval: float = 1.0):
        if not signers:
            raise ValueError("a checkpoint needs at least one signing key")
        self.pool, self.reader, self.signers, self.origin, self.interval = pool, reader, signers, origin, interval
        self._latest: SignedCheckpoint | None = None

    @property
    def verifiers(self) -> list[note.Verifier]:
        return [s.verifier for s in self.signers]

    async def latest(self) -> SignedCheckpoint:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT tree_size, root, note, signed_at FROM checkpoints ORDER BY tree_size DESC LIMIT 1")
        if row is None:
            return await self.sign()
        return SignedCheckpoint(row["tree_size"], bytes(row["root"]), row["note"], row["signed_at"])

    async def sign(self) -> SignedCheckpoint:
        """Sign the current head if it is new; return the latest checkpoint."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                size = await conn.fetchval("SELECT position FROM ledger_head")
                last = await conn.fetchrow(
                    "SELECT tree_size, root, note, signed_at FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
                )
                if last is not None and size <= last["tree_size"]:
                    if size < last["tree_size"]:
                        raise CheckpointRefused(
                            f"the ledger head ({size}) is behind the last checkpoint ({last['tree_size']})"
                        )
                    return SignedCheckpoint(last["tree_size"], bytes(last["root"]), last["note"], last["signed_at"])
                try:
                    root = await self.reader.root(conn, size)
                    if last is not None and last["tree_size"] > 0:
                        proof = await self.reader.consistency(conn, last["tree_size"], size)
                        merkle.verify_consistency(last["tree_size"], size, bytes(last["root"]), root, proof)
                except merkle.ProofError as exc:
                    raise CheckpointRefused(f"the stored tree is not consistent with the last checkpoint: {exc}") \
                        from None
                except LookupError as exc:  # hashes missing: the tree (or the log under it) was damaged
                    raise CheckpointRefused(f"the stored tree is incomplete: {exc}") from None
                text = note.sign(note.Checkpoint(self.origin, size, root).body(), self.signers)
                signed_at = await conn.fetchval(
                    "INSERT INTO checkpoints (tree_size, root, note) VALUES ($1, $2, $3) RETURNING signed_at",
                    size, root, text)
        log.info("checkpoint signed", tree_size=size)
        return SignedCheckpoint(size, root, text, signed_at)

    # --- witness cosignatures (C2SP tlog-cosignature lines) ---------------------------------

    async def cosigned_sizes(self) -> dict[str, int]:
        """The largest checkpoint each witness (by vkey) has cosigned for this log."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT witness, max(tree_size) AS size FROM checkpoint_cosignatures"
                                    " GROUP BY witness")
        return {r["witness"]: r["size"] for r in rows}

    async def add_cosignature(self, size: int, witness: str, line: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("INSERT INTO checkpoint_cosignatures (tree_size, witness, line) VALUES ($1, $2, $3)"
                               " ON CONFLICT DO NOTHING", size, witness, line)

    async def with_cosignatures(self, checkpoint: SignedCheckpoint) -> str:
        """The checkpoint's note with every cosignature collected for it appended."""
        async with self.pool.acquire() as conn:
            lines = await conn.fetch("SELECT line FROM checkpoint_cosignatures WHERE tree_size = $1"
                                     " ORDER BY witness", checkpoint.size)
        return checkpoint.note + "".join(r["line"] for r in lines)

    async def witnessed(self, witnesses: list[str], quorum: int) -> SignedCheckpoint | None:
        """The largest checkpoint cosigned by at least ``quorum`` of ``witnesses`` (vkeys), or None."""
        async with self.pool.acquire() as conn:
            # Walks the cosignatures' primary key backwards and stops at the first size with a quorum.
            row = await conn.fetchrow(
                "SELECT c.tree_size, c.root, c.note, c.signed_at FROM checkpoints c JOIN ("
                "  SELECT tree_size FROM checkpoint_cosignatures WHERE witness = ANY($1)"
                "  GROUP BY tree_size HAVING count(*) >= $2 ORDER BY tree_size DESC LIMIT 1"
                ") w USING (tree_size)", witnesses, quorum)
        return None if row is None else SignedCheckpoint(row["tree_size"], bytes(row["root"]), row["note"],
                                                         row["signed_at"])

    async def run(self, beat: Callable[[], None]) -> None:
        """Sign a checkpoint every interval while the log grows (run under the
        supervisor: any failure, refused or database, ends this call and is
        logged and retried there)."""
        while True:
            await self.sign()
            beat()
            await asyncio.sleep(self.interval)

"""The witness's durable record: the latest checkpoint it cosigned per log,
and the signed requests it refused as evidence against a log.

SQLite (standard library), one file in the state directory: a transaction
with ``BEGIN IMMEDIATE`` makes "check the stored size, then store the new
checkpoint" one atomic step even across processes sharing the file, and
``synchronous=FULL`` makes the new checkpoint durable before the witness
answers (tlog-witness requires both).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cosigned (
    origin TEXT PRIMARY KEY,
    size INTEGER NOT NULL CHECK (size >= 0),
    root BLOB NOT NULL CHECK (length(root) = 32),
    checkpoint TEXT NOT NULL,
    cosigned_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,
    received_at TEXT NOT NULL,
    reason TEXT NOT NULL,
    request BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class Cosigned:
    """What the witness holds for one log; size 0 and no root before its first checkpoint."""

    size: int
    root: bytes | None


NOTHING = Cosigned(0, None)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class WitnessState:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "witness.sqlite3"
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        # Switching to WAL takes an exclusive lock without waiting on the busy
        # timeout: two witness processes starting together on one state
        # directory would otherwise fail with "database is locked".
        deadline = time.monotonic() + 30
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def latest(self, origin: str) -> Cosigned:
        row = self._db.execute("SELECT size, root FROM cosigned WHERE origin = ?", (origin,)).fetchone()
        return Cosigned(row[0], bytes(row[1])) if row else NOTHING

    def advance(self, origin: str, expected: Cosigned, size: int, root: bytes, checkpoint: str) -> Cosigned | None:
        """Store the new checkpoint if the stored one is still ``expected``;
        otherwise store nothing and return what is stored now."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT size, root FROM cosigned WHERE origin = ?", (origin,)).fetchone()
            now = Cosigned(row[0], bytes(row[1])) if row else NOTHING
            if now != expected:
                db.execute("ROLLBACK")
                return now
            db.execute(
                "INSERT INTO cosigned (origin, size, root, checkpoint, cosigned_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (origin) DO UPDATE SET size = excluded.size, root = excluded.root,"
                " checkpoint = excluded.checkpoint, cosigned_at = excluded.cosigned_at",
                (origin, size, root, checkpoint, _now()),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return None

    def keep_evidence(self, origin: str, reason: str, request: bytes) -> None:
        """A log-signed request the witness refused: proof of the log's misbehaviour."""
        self._db.execute("INSERT INTO evidence (origin, received_at, reason, request) VALUES (?, ?, ?, ?)",
                         (origin, _now(), reason, request))

"""Cohort commitments and the proofs a patient checks them with
(contracts/LEDGER-FORMAT.md §8; the format is contracts/cohort_commitment.py).

Patients' transparency secrets are derived from one service key (never
stored one by one); a patient's is committed in the log, on the patient's
aggregate, the first time it is needed. Built trees are kept for the last
few uses, so a burst of receipts for one release costs one build."""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np

from contracts import cohort_commitment as cc
from contracts.events import CohortCommitment
from service.config import Config, ConfigError

TREES_KEPT = 4


def filter_call_context(call_id: str) -> str:
    """The context of a filter call's commitment to the patients it removed."""
    return f"filter-call:{call_id}"


def data_use_context(organisation: str, use_id: str) -> str:
    """The context of a data use's commitment: unique, since a use_id is unique per organisation."""
    return f"data-use:{organisation}:{use_id}"


class Transparency:
    def __init__(self, key: bytes | None = None):
        """``key``: the 32-byte secret-derivation key (from configuration); without one, a key that
        lives as long as this process (tests, embedding: no proof outlives it)."""
        self.key = key or secrets.token_bytes(32)
        self._trees: OrderedDict[str, cc.CohortTree] = OrderedDict()

    def secret(self, stem: int) -> bytes:
        return cc.derive_secrets(self.key, np.array([stem])).tobytes()

    def _build(self, stems: np.ndarray, context: str) -> cc.CohortTree:
        return cc.build(cc.member_tags(cc.derive_secrets(self.key, stems), context))

    async def commit(self, stems: np.ndarray, context: str) -> CohortCommitment:
        """The commitment to a cohort (about a second of CPU at 5M members, off the event loop)."""
        tree = await asyncio.to_thread(self._build, stems, context)
        self._keep(context, tree)
        return CohortCommitment(root=tree.root.hex(), size=tree.size)

    async def proof(self, members: Callable[[], Awaitable[np.ndarray]], context: str,
                    stem: int) -> tuple[bytes, cc.CohortProof]:
        """The patient's tag and the proof that it is, or is not, among the cohort's; ``members`` loads the
        cohort's stems, needed only when the tree is not kept."""
        tree = self._trees.get(context)
        if tree is None:
            tree = await asyncio.to_thread(self._build, await members(), context)
            self._keep(context, tree)
        tag = cc.member_tag(self.secret(stem), context)
        return tag, tree.proof(tag)

    def _keep(self, context: str, tree: cc.CohortTree) -> None:
        self._trees[context] = tree
        self._trees.move_to_end(context)
        while len(self._trees) > TREES_KEPT:
            self._trees.popitem(last=False)


KEY_FILE = "transparency.key"


def load_key(config: Config) -> bytes:
    """The secret-derivation key: CONSENT_LEDGER_TRANSPARENCY_KEY (a file of 64 hex digits), or in
    development one made once in the data directory. Lose it and no earlier commitment can be proved."""
    path = config.transparency_key_file
    if path is None:
        if config.production:
            raise ConfigError("CONSENT_LEDGER_TRANSPARENCY_KEY must be set when CONSENT_LEDGER_ENV=production "
                              "(a file holding 32 random bytes as 64 hex digits, kept like the log key)")
        path = config.data_dir / KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32) + "\n")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a transparency key (64 hex digits): {exc}") from None
    if len(key) != 32:
        raise ConfigError(f"{path}: a transparency key is 32 bytes (64 hex digits)")
    return key

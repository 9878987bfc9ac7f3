"""A choice carried over from an earlier register, as the ledger records it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from contracts.nhs_number import NhsNumber
from contracts.values import Imported


@dataclass(frozen=True)
class ImportedChoice:
    """One Consent, as the ledger records it."""

    index: int
    nhs_number: NhsNumber
    kind: Literal["opt-out", "opt-in", "consent"]
    scope: str | None  # an opt-out scope, for opt-out and opt-in
    grant_id: str | None  # for a study consent
    imported: Imported

"""The one rule: may this patient's data be used under this grant, and why.

Every decision about a patient's data goes through ``decide``: the opt-out
filter, the data-use check, the patient's history, the public register and
the auditor's ``verify --decisions`` all call it, so they cannot disagree.
It is pure and vectorised: the same call answers for one patient (arrays of
length one) or for millions (boolean masks, one element per patient).

Inputs are what the ledger says at one position and instant:

* ``Choices``: per patient, whether an opt-out of any scope is in force
  (``opted_out``) and whether they consented to this grant (``consented``).
* ``Terms``: the grant's status at the instant, its legal basis and its
  recorded opt-out exemption.

Precedence (first match wins; ``contracts/LEDGER-FORMAT.md`` §1.1):

1. the grant is not active (not yet recorded, not yet valid, expired or
   revoked)                                             -> GRANT_NOT_ACTIVE
2. the grant's legal basis is ``explicit-consent``: included only with the
   patient's consent to it                -> CONSENTED / OPTED_OUT_CONSENTED
                                                        / CONSENT_MISSING
3. no opt-out in force, and no finer choice that covers this grant
   (no commercial use: a commercial grant; research only: a purpose other
   than research; planning only: a purpose other than planning)
                                                        -> NO_OPT_OUT
4. opted out, or a finer choice covers the grant, but consented to this grant
                                                        -> OPTED_OUT_CONSENTED
5. ... but the grant records an exemption               -> OPTED_OUT_EXEMPT
6. otherwise: the national or type 1 opt-out            -> OPTED_OUT_EXCLUDED
              only a finer choice                       -> CHOICE_EXCLUDED

A finer choice is honoured exactly as an opt-out is (consent to the grant
and a recorded exemption set both aside); without a grant (opt-outs alone)
it covers nothing, since there is no use to judge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import Literal, get_args

import numpy as np

from .codes import FINER_SCOPES, NATIONAL_SCOPES
from .events import AccessGranted
from .values import Exemption

GrantStatus = Literal["active", "proposed", "revoked", "expired", "not-yet-valid", "not-recorded"]
# The statuses a grant in the register can have (one it holds is recorded).
RECORDED_STATUSES: tuple[str, ...] = tuple(s for s in get_args(GrantStatus) if s != "not-recorded")


class Reason(IntEnum):
    """Why a patient is in or out.  Values are stable (they may be stored)."""

    GRANT_NOT_ACTIVE = 0
    NO_OPT_OUT = 1
    OPTED_OUT_CONSENTED = 2
    OPTED_OUT_EXEMPT = 3
    OPTED_OUT_EXCLUDED = 4
    CONSENT_MISSING = 5
    CONSENTED = 6
    CHOICE_EXCLUDED = 7


INCLUDED = frozenset({Reason.NO_OPT_OUT, Reason.OPTED_OUT_CONSENTED, Reason.OPTED_OUT_EXEMPT, Reason.CONSENTED})
_INCLUDED = np.zeros(len(Reason), dtype=bool)
_INCLUDED[[int(r) for r in INCLUDED]] = True
_U8 = {r: np.uint8(r) for r in Reason}  # numpy scalars keep `decide`'s arrays uint8 throughout


@dataclass(frozen=True)
class Choices:
    """A patient's choices at one position, one element per patient."""

    opted_out: np.ndarray  # bool: the national or the type 1 opt-out is in force
    consented: np.ndarray  # bool: a consent to this grant is in force
    finer: Mapping[str, np.ndarray] = field(default_factory=dict)  # bool per finer scope in force

    @classmethod
    def of(cls, scopes: Mapping[str, np.ndarray], consented: np.ndarray) -> "Choices":
        """From one opted-out mask per scope: an opt-out of *either* national
        scope keeps the patient out (type 1 opt-outs are honoured for every
        dataset); the finer scopes are kept apart, for the grants they cover."""
        opted_out = np.zeros(len(consented), dtype=bool)
        for scope in NATIONAL_SCOPES:
            if scope in scopes:
                opted_out |= scopes[scope]
        finer = {scope: np.asarray(mask, dtype=bool) for scope, mask in scopes.items()
                 if scope in FINER_SCOPES and mask.any()}
        return cls(opted_out=opted_out, consented=np.asarray(consented, dtype=bool), finer=finer)


def covers(scope: str, terms: "Terms") -> bool:
    """Whether a finer choice of ``scope`` keeps the patient out of a use under these terms."""
    if scope == "commercial":
        return terms.commercial
    if scope == "non-research":
        return terms.purpose is not None and terms.purpose != "research"
    if scope == "non-planning":
        return terms.purpose is not None and terms.purpose != "planning"
    return False


@dataclass(frozen=True)
class Terms:
    """What the rule needs to know about a grant at one position and instant."""

    status: GrantStatus
    legal_basis: str | None = None
    exemption: Exemption | None = None
    commercial: bool = False
    purpose: str | None = None  # None: no grant (opt-outs alone), which no finer choice covers

    @property
    def needs_consent(self) -> bool:
        return self.legal_basis == "explicit-consent"

    @property
    def opt_outs_apply(self) -> bool:
        """Whether opted-out patients are kept out (the register's "opt-outs applied")."""
        return self.needs_consent or self.exemption is None

    @classmethod
    def at(cls, granted: AccessGranted | None, granted_position: int | None, revoked_position: int | None,
           position: int, instant: datetime, approved: Mapping[str, int] | None = None) -> "Terms":
        """The grant as the ledger stood at ``position``, for a use at ``instant``;
        ``approved``: the position of each approval recorded for it."""
        if granted is None or granted_position is None or granted_position > position:
            return cls(status="not-recorded")
        revoked = revoked_position is not None and revoked_position <= position
        status = grant_status(granted.valid_from, granted.valid_until, revoked, instant,
                              pending=bool(pending_approvals(granted, approved or {}, position)))
        return cls(status=status, legal_basis=granted.legal_basis, exemption=granted.opt_out_exemption,
                   commercial=granted.commercial, purpose=granted.purpose.code)


def pending_approvals(granted: AccessGranted, approved: Mapping[str, int], position: int) -> list[str]:
    """The approvals ``granted`` requires that were not recorded by ``position``."""
    return [k for k in granted.requires or () if approved.get(k, position + 1) > position]


def grant_status(valid_from: datetime, valid_until: datetime, revoked: bool, instant: datetime,
                 pending: bool = False) -> GrantStatus:
    """A recorded grant's status at ``instant``; valid from ``valid_from`` up to, not including,
    ``valid_until``, once no required approval is ``pending``."""
    if revoked:
        return "revoked"
    if pending:
        return "proposed"
    if instant < valid_from:
        return "not-yet-valid"
    if instant >= valid_until:
        return "expired"
    return "active"


def decide(choices: Choices, terms: Terms) -> np.ndarray:
    """The reason (a ``Reason`` value, uint8) for each patient."""
    n = len(choices.opted_out)
    if terms.status != "active":
        return np.full(n, Reason.GRANT_NOT_ACTIVE, dtype=np.uint8)
    out, consented = choices.opted_out, choices.consented
    covered = [mask for scope, mask in choices.finer.items() if covers(scope, terms)]
    if covered:
        chose = np.logical_or.reduce(covered)
        out = out | chose
    if terms.needs_consent:
        return np.where(consented, np.where(out, _U8[Reason.OPTED_OUT_CONSENTED], _U8[Reason.CONSENTED]),
                        _U8[Reason.CONSENT_MISSING])
    if terms.exemption is not None:
        otherwise = _U8[Reason.OPTED_OUT_EXEMPT]
    elif covered:
        otherwise = np.where(choices.opted_out, _U8[Reason.OPTED_OUT_EXCLUDED], _U8[Reason.CHOICE_EXCLUDED])
    else:
        otherwise = _U8[Reason.OPTED_OUT_EXCLUDED]
    if consented.any():
        otherwise = np.where(consented, _U8[Reason.OPTED_OUT_CONSENTED], otherwise)
    return np.where(out, otherwise, _U8[Reason.NO_OPT_OUT])


def decide_one(opted_out: bool, consented: bool, terms: Terms, finer: Iterable[str] = ()) -> Reason:
    """``decide`` for one patient; ``finer``: the finer scopes they have in force."""
    choices = Choices(opted_out=np.array([opted_out]), consented=np.array([consented]),
                      finer={scope: np.array([True]) for scope in finer})
    return Reason(int(decide(choices, terms)[0]))


def included(reasons: np.ndarray) -> np.ndarray:
    """Boolean mask: whose data may be used."""
    return _INCLUDED.take(reasons)


def counts(reasons: np.ndarray) -> dict[Reason, int]:
    found = np.bincount(reasons, minlength=len(Reason))
    return {r: int(found[r]) for r in Reason}


@dataclass(frozen=True)
class Claim:
    """What a ``DataUseRecorded`` entry states about the opt-outs it applied."""

    opted_out_included: int
    consented_included: int
    exemption_applied: Exemption | None

    @classmethod
    def of(cls, found: dict[Reason, int], terms: Terms) -> "Claim":
        consented = found[Reason.OPTED_OUT_CONSENTED]
        exempt = found[Reason.OPTED_OUT_EXEMPT]
        return cls(opted_out_included=consented + exempt, consented_included=consented,
                   exemption_applied=terms.exemption if exempt else None)


# Plain words for a patient's history, per reason.
WORDS: dict[Reason, str] = {
    Reason.GRANT_NOT_ACTIVE: "The project's approval was not in force at that time.",
    Reason.NO_OPT_OUT: "You had no opt-out in force at that time.",
    Reason.OPTED_OUT_CONSENTED: "You had opted out, but you consented to this project, so your data was included.",
    Reason.OPTED_OUT_EXEMPT: "Your opt-out did not apply: {exemption} (reference {reference}).",
    Reason.OPTED_OUT_EXCLUDED: "You had opted out, so your data should not have been included.",
    Reason.CONSENT_MISSING: "This project needs your consent, which you had not given at that time.",
    Reason.CONSENTED: "You consented to this project, so your data was included.",
    Reason.CHOICE_EXCLUDED: "You had asked that your data not be used this way ({choice}), so it should not have "
                            "been included.",
}

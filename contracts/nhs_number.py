"""NHS numbers: 10 digits, the last a modulus-11 check digit, in an allocated range.

Input may contain spaces or dashes (``485 777 3456``, ``485-777-3456``);
everywhere else the canonical form is the bare 10 digits.  The first nine
digits (the *stem*) determine the check digit, so compact sets of patients
store only the stem as an integer.

Only numbers in the allocated ranges are accepted (the ranges of the
``nhs-number`` package; Scottish CHI numbers start with a date of birth,
DDMMYY).  Which ranges a deployment accepts is configured at start
(``CONSENT_LEDGER_NHS_NUMBER_RANGES``, ``accept_ranges``); production leaves
out the synthetic range that test patients use.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)
_SEPARATORS = str.maketrans("", "", " -")


class InvalidNhsNumber(ValueError):
    pass


# Allocated stem ranges (a stem is the number without its check digit), inclusive.
_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "england-wales-iom": ((400_000_000, 499_999_999), (600_000_000, 799_999_999)),
    "scotland": ((10_000_000, 311_299_999),),  # CHI: DDMMYY + 3 digits, checked as a date
    "northern-ireland": ((320_000_000, 399_999_999),),
    "synthetic": ((900_000_000, 999_999_999),),  # "not to be issued": test and synthetic patients
}
RANGES: tuple[str, ...] = tuple(_RANGES)
PRODUCTION_RANGES: tuple[str, ...] = ("england-wales-iom", "scotland", "northern-ireland")
_DAYS = np.array([0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
_accepted: tuple[str, ...] = RANGES


def accept_ranges(names: Iterable[str]) -> tuple[str, ...]:
    """Set, for this process, which allocated ranges are valid (at start, from
    configuration); return the ranges accepted until now."""
    global _accepted
    chosen = tuple(names)
    unknown = sorted(set(chosen) - set(_RANGES))
    if unknown or not chosen:
        raise ValueError(f"unknown NHS number range(s) {', '.join(unknown) or '(none given)'}: "
                         f"choose from {', '.join(RANGES)}")
    previous, _accepted = _accepted, chosen
    return previous


def allocated(stems: np.ndarray) -> np.ndarray:
    """Per stem: in an accepted range (a CHI number's first six digits a real date)."""
    stems = np.asarray(stems)
    inside = np.zeros(len(stems), dtype=bool)
    for name in _accepted:
        for low, high in _RANGES[name]:
            within = (stems >= low) & (stems <= high)
            if name == "scotland" and within.any():
                where = np.flatnonzero(within)
                chi = stems[where].astype(np.int64)
                day, month, year = chi // 10_000_000, chi // 100_000 % 100, chi // 1000 % 100
                # %y reads 00-68 as 2000-2068, the rest as 1969-1999: a year divisible by 4 is a leap year.
                days = np.where((month == 2) & (year % 4 != 0), 28, _DAYS[np.clip(month, 0, 12)])
                within[where] = (month >= 1) & (month <= 12) & (day >= 1) & (day <= days)
            inside |= within
    return inside


def check_digit(stem: str) -> int | None:
    """The check digit for a 9-digit stem, or None when no digit is valid."""
    # Unrolled over the ASCII codes: every request validates a number, and the
    # obvious generator costs a few microseconds more per call. 54 = sum(_WEIGHTS).
    b = stem.encode()
    total = (b[0] * 10 + b[1] * 9 + b[2] * 8 + b[3] * 7 + b[4] * 6 + b[5] * 5 + b[6] * 4 + b[7] * 3 + b[8] * 2
             - 48 * 54)
    digit = 11 - total % 11
    if digit == 11:
        return 0
    if digit == 10:
        return None
    return digit


def _allocated_one(stem: int) -> bool:
    """``allocated`` for one stem, without numpy's per-call cost."""
    for name in _accepted:
        for low, high in _RANGES[name]:
            if low <= stem <= high:
                if name != "scotland":
                    return True
                day, month, year = stem // 10_000_000, stem // 100_000 % 100, stem // 1000 % 100
                if 1 <= month <= 12:
                    days = 28 if month == 2 and year % 4 != 0 else int(_DAYS[month])
                    if 1 <= day <= days:
                        return True
    return False


class NhsNumber(str):
    """A validated NHS number in canonical 10-digit form."""

    __slots__ = ()

    def __new__(cls, value: str) -> "NhsNumber":
        if isinstance(value, NhsNumber):
            return value
        if not isinstance(value, str):
            raise TypeError("an NHS number must be a string of 10 digits")
        digits = value.translate(_SEPARATORS)
        if len(digits) != 10 or not digits.isascii() or not digits.isdigit():
            raise InvalidNhsNumber(
                "an NHS number must be 10 digits (spaces and dashes allowed)"
            )
        if check_digit(digits[:9]) != int(digits[9]):
            raise InvalidNhsNumber("NHS number check digit is wrong")
        if not _allocated_one(int(digits[:9])):
            raise InvalidNhsNumber("this is not in an allocated NHS number range")
        return super().__new__(cls, digits)

    @property
    def stem(self) -> int:
        return int(self[:9])

    @classmethod
    def from_stem(cls, stem: int) -> "NhsNumber":
        text = f"{stem:09d}"
        digit = check_digit(text)
        if digit is None:
            raise InvalidNhsNumber(f"stem {text} has no valid check digit")
        return super().__new__(cls, text + str(digit))


def decode_hook(kind: type, value: object) -> object:
    """msgspec ``dec_hook``: fields typed NhsNumber are validated as they are decoded."""
    if kind is NhsNumber:
        return NhsNumber(value)  # type: ignore[arg-type]
    raise NotImplementedError(f"no decoder for {kind}")


SCHEMA = {
    "type": "string",
    "pattern": r"^[0-9][0-9 -]*$",
    "minLength": 10,
    "maxLength": 14,
    "description": (
        "NHS number: 10 digits with a modulus-11 check digit; spaces and dashes "
        "are accepted on input, responses use the bare 10 digits."
    ),
    "examples": ["9434765919"],
}

"""NHS numbers: 10 digits, the last a modulus-11 check digit.

Input may contain spaces or dashes (``485 777 3456``, ``485-777-3456``);
everywhere else the canonical form is the bare 10 digits.  The first nine
digits (the *stem*) determine the check digit, so compact sets of patients
store only the stem as an integer.
"""

from __future__ import annotations

_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)
_SEPARATORS = str.maketrans("", "", " -")


class InvalidNhsNumber(ValueError):
    pass


def check_digit(stem: str) -> int | None:
    """The check digit for a 9-digit stem, or None when no digit is valid."""
    total = sum(int(d) * w for d, w in zip(stem, _WEIGHTS))
    digit = 11 - total % 11
    if digit == 11:
        return 0
    if digit == 10:
        return None
    return digit


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

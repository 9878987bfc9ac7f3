"""NHS number validation: known numbers, the input forms we tolerate, and the
modulus-11 properties that make a single mistyped digit detectable."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts import cohort
from contracts.nhs_number import InvalidNhsNumber, NhsNumber, check_digit

VALID = ["9434765919", "4010232137", "9990000026"]


def _stems_without_check_digit(limit: int) -> list[str]:
    found = []
    stem = 100_000_000
    while len(found) < limit:
        if check_digit(f"{stem:09d}") is None:
            found.append(f"{stem:09d}")
        stem += 1
    return found


NO_CHECK_DIGIT = _stems_without_check_digit(3)
valid_stems = st.integers(0, 999_999_999).filter(lambda s: check_digit(f"{s:09d}") is not None)


@pytest.mark.parametrize("number", VALID)
def test_known_valid_numbers(number):
    assert NhsNumber(number) == number
    assert NhsNumber(number).stem == int(number[:9])


@pytest.mark.parametrize("given_form", ["943 476 5919", "943-476-5919", " 9434765919 ", "943-476 5919"])
def test_spaces_and_dashes_are_tolerated_and_dropped(given_form):
    assert NhsNumber(given_form) == "9434765919"
    assert str(NhsNumber(given_form)) == "9434765919"


@pytest.mark.parametrize("number", [
    "9434765918",  # wrong check digit
    "4857773456",  # wrong check digit
    *(stem + d for stem in NO_CHECK_DIGIT for d in "0123456789"),  # remainder 10: no digit is valid
    "943476591",  # 9 digits
    "94347659190",  # 11 digits
    "943476591X",
    "abcdefghij",
    "",
    "٩٤٣٤٧٦٥٩١٩",  # Arabic-Indic digits for 9434765919: isdigit() but not ASCII
    "９４３４７６５９１９",  # fullwidth digits
    "9434765919\n",
    "9434.765919",
    "+9434765919",
])
def test_invalid_numbers_are_refused(number):
    with pytest.raises(InvalidNhsNumber):
        NhsNumber(number)


def test_non_strings_are_refused():
    with pytest.raises(TypeError):
        NhsNumber(9434765919)  # type: ignore[arg-type]


def test_stem_without_check_digit_has_no_number():
    for stem in NO_CHECK_DIGIT:
        with pytest.raises(InvalidNhsNumber):
            NhsNumber.from_stem(int(stem))


@given(valid_stems)
def test_from_stem_round_trips(stem):
    number = NhsNumber.from_stem(stem)
    assert len(number) == 10 and number.isascii() and number.isdigit()
    assert NhsNumber(str(number)) == number
    assert NhsNumber(f"{number[:3]} {number[3:6]} {number[6:]}") == number
    assert number.stem == stem


@given(valid_stems, st.integers(0, 9), st.integers(1, 9))
def test_any_single_digit_change_is_detected(stem, index, delta):
    number = NhsNumber.from_stem(stem)
    digits = list(number)
    digits[index] = str((int(digits[index]) + delta) % 10)
    with pytest.raises(InvalidNhsNumber):
        NhsNumber("".join(digits))


@given(st.lists(st.integers(0, 999_999_999), min_size=1, max_size=200))
def test_vectorised_check_digits_agree_with_nhs_number(stems):
    computed = cohort.check_digits(np.array(stems, dtype=np.int64))
    for stem, digit in zip(stems, computed):
        expected = check_digit(f"{stem:09d}")
        assert int(digit) == (-1 if expected is None else expected)


@given(st.lists(valid_stems, min_size=1, max_size=200))
def test_canonical_cohort_bytes_are_sorted_unique_nhs_numbers(stems):
    normalised = cohort.normalise(np.array(stems, dtype=np.int64))
    expected = "".join(f"{NhsNumber.from_stem(s)}\n" for s in sorted(set(stems))).encode("ascii")
    assert cohort.canonical_bytes(normalised) == expected
    encoding, data = cohort.encode_members(normalised)
    assert list(cohort.decode_members(encoding, data)) == sorted(set(stems))

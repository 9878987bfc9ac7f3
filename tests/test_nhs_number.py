"""NHS number validation: known numbers, the input forms we tolerate, and the
modulus-11 properties that make a single mistyped digit detectable."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts import cohort
from contracts import bulk
from contracts.nhs_number import PRODUCTION_RANGES, RANGES, InvalidNhsNumber, NhsNumber, accept_ranges, check_digit

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
# Stems of numbers in allocated ranges (England, Wales and IoM; synthetic) with a check digit.
valid_stems = st.one_of(st.integers(400_000_000, 499_999_999), st.integers(600_000_000, 799_999_999),
                        st.integers(900_000_000, 999_999_999)).filter(lambda s: check_digit(f"{s:09d}") is not None)


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


# --- allocated ranges, cross-checked against the `nhs-number` package ---------------

def _package_says(number: str, ranges: tuple[str, ...]) -> bool:
    import nhs_number as package

    regions = {"england-wales-iom": package.REGION_ENGLAND_WALES_IOM, "scotland": package.REGION_SCOTLAND,
               "northern-ireland": package.REGION_NORTHERN_IRELAND, "synthetic": package.REGION_SYNTHETIC}
    return package.is_valid(number) and any(regions[r].contains_number(number) for r in ranges)


def _ours(number: str) -> bool:
    try:
        NhsNumber(number)
    except InvalidNhsNumber:
        return False
    return True


# Numbers with a valid check digit, drawn across every range and the CHI date rules.
numbers_with_check_digit = st.integers(0, 999_999_999).filter(
    lambda s: check_digit(f"{s:09d}") is not None).map(lambda s: f"{s:09d}{check_digit(f'{s:09d}')}")
chi_like = st.tuples(st.integers(0, 39), st.integers(0, 19), st.integers(0, 99), st.integers(0, 999)).map(
    lambda t: f"{t[0]:02d}{t[1]:02d}{t[2]:02d}{t[3]:03d}").filter(lambda s: check_digit(s) is not None).map(
    lambda s: s + str(check_digit(s)))


@pytest.mark.parametrize("ranges", [RANGES, PRODUCTION_RANGES])
@given(number=st.one_of(numbers_with_check_digit, chi_like))
def test_allocated_ranges_agree_with_the_nhs_number_package(ranges, number):
    accept_ranges(ranges)
    try:
        assert _ours(number) == _package_says(number, ranges)
        # The bulk parser applies the same ranges, vectorised.
        assert bulk.parse_lines(number.encode()).ok == _ours(number)
    finally:
        accept_ranges(RANGES)


@pytest.mark.parametrize("number, why", [
    ("0000000000", "below every range"),
    ("3113000009", "between Scotland and Northern Ireland"),
    ("3102990002", "CHI range, but 31 February is no date"),
    ("2902010001", "CHI range, 29 February 2001 is no date"),
    ("5000000005", "reserved, never issued"),
])
def test_unallocated_numbers_are_refused(number, why):
    assert check_digit(number[:9]) == int(number[9]), why
    with pytest.raises(InvalidNhsNumber, match="allocated"):
        NhsNumber(number)
    assert list(bulk.parse_lines(f"{VALID[0]}\n{number}\n".encode()).invalid_lines) == [2]


def test_production_leaves_out_the_synthetic_range():
    accept_ranges(PRODUCTION_RANGES)
    try:
        assert not _ours("9434765919") and _ours("4010232137")
    finally:
        accept_ranges(RANGES)
    with pytest.raises(ValueError, match="unknown NHS number range"):
        accept_ranges(["mars"])


@given(st.integers(0, 999_999_999), st.sampled_from([RANGES, PRODUCTION_RANGES, ("scotland",), ("synthetic",)]))
def test_one_number_is_judged_like_a_column_of_them(stem, ranges):
    """NhsNumber checks one number without numpy (it runs on every request);
    it must agree with the formula of the standard and the vectorised rule."""
    from contracts.nhs_number import _allocated_one, allocated

    text = f"{stem:09d}"
    reference = 11 - sum(int(d) * w for d, w in zip(text, (10, 9, 8, 7, 6, 5, 4, 3, 2))) % 11
    assert check_digit(text) == {11: 0, 10: None}.get(reference, reference)
    previous = accept_ranges(ranges)
    try:
        assert _allocated_one(stem) == bool(allocated(np.array([stem]))[0])
    finally:
        accept_ranges(previous)

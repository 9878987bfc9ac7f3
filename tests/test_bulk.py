"""The vectorised bulk parsers agree with the one-number-at-a-time NhsNumber
and, for JSON arrays, with a JSON decoder, also when they work in pieces."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import bulk
from contracts.nhs_number import InvalidNhsNumber, NhsNumber
from samples import VALID, WRONG_CHECK_DIGIT

line = st.one_of(
    st.sampled_from(VALID + WRONG_CHECK_DIGIT),
    st.sampled_from(VALID).map(lambda n: f"{n[:3]} {n[3:6]}-{n[6:]}"),
    st.text(alphabet="0123456789 -x,\r", max_size=14),
    st.integers(0, 10**10 - 1).map(lambda i: f"{i:010d}"),
)


def reference(lines: list[str], dat: bool) -> tuple[list[int], list[int]]:
    stems, bad = [], []
    for number, text in enumerate(lines, 1):
        text = text.rstrip("\r")
        if not text.strip(" -\r"):
            continue
        if dat:
            core = text.rstrip(" -\r")
            if not core.endswith(",") or core.count(",") != 1:
                bad.append(number)
                continue
            text = core[:-1]
        try:
            stems.append(NhsNumber(text.replace("\r", "")).stem)
        except InvalidNhsNumber:
            bad.append(number)
    return stems, bad


@settings(max_examples=300, deadline=None)
@given(st.lists(line, max_size=12), st.booleans(), st.booleans())
def test_parse_lines_matches_reference(lines, dat, trailing_newline):
    if dat:
        lines = [l if "," in l or not l else l + "," for l in lines]
    body = "\n".join(lines) + ("\n" if trailing_newline and lines else "")
    parsed = bulk.parse_lines(body.encode(), dat=dat)
    stems, bad = reference(lines, dat)
    if bad:
        assert parsed.invalid_lines.tolist() == bad
    else:
        assert parsed.ok and parsed.stems.tolist() == stems


@given(st.lists(st.sampled_from(VALID), max_size=20), st.booleans())
def test_format_then_parse_round_trips_in_order(numbers, dat):
    stems = np.array([int(n[:9]) for n in numbers], dtype=np.uint32)
    body = bulk.format_lines(stems, dat=dat)
    assert body.decode().split() == [n + ("," if dat else "") for n in numbers]
    assert bulk.parse_lines(body, dat=dat).stems.tolist() == stems.tolist()
    assert bytes(bulk.format_json_array(stems)).decode() == "[" + ",".join(f'"{n}"' for n in numbers) + "]"


@settings(max_examples=150, deadline=None)
@given(st.lists(line, max_size=30), st.booleans(), st.integers(1, 40))
def test_parse_lines_in_small_pieces_matches_reference(lines, dat, chunk):
    """Pieces end at line ends: with tiny pieces every boundary case is met."""
    if dat:
        lines = [l if "," in l or not l else l + "," for l in lines]
    body = "\n".join(lines).encode()
    parsed = bulk.parse_lines(body, dat=dat, chunk=chunk)
    whole = bulk.parse_lines(body, dat=dat)
    assert parsed.invalid_lines.tolist() == whole.invalid_lines.tolist()
    assert parsed.stems.tolist() == whole.stems.tolist()
    stems, bad = reference(lines, dat)
    assert parsed.invalid_lines.tolist() == bad or (not bad and parsed.stems.tolist() == stems)


def _escape_a_digit(text: str) -> str:
    """A JSON string literal for ``text`` with its first digit written as \\u00XX."""
    literal = json.dumps(text)
    for i, c in enumerate(literal):
        if c.isdigit():
            return literal[:i] + f"\\u{ord(c):04x}" + literal[i + 1:]
    return literal


number_string = st.one_of(
    st.sampled_from(VALID + WRONG_CHECK_DIGIT),
    st.sampled_from(VALID).map(lambda n: f"{n[:3]} {n[3:6]}-{n[6:]}"),
    st.text(alphabet="0123456789 -x,\n\"\\é٩", max_size=14),
)
element = st.one_of(
    number_string.map(lambda s: (s, json.dumps(s))),
    number_string.map(lambda s: (s, json.dumps(s, ensure_ascii=False))),
    st.sampled_from(VALID).map(lambda s: (s, _escape_a_digit(s))),
    st.sampled_from([1, -2.5, None, True, [], ["9434765919"], {"a": "b\""}]).map(lambda v: (v, json.dumps(v))),
)
separator = st.sampled_from([",", ", ", " ,\n  ", ",\t", "\r\n,"])


def json_reference(items: list) -> tuple[int | None, list[int], list[int]]:
    """(index of the first element that is not a string, invalid 1-based positions before it, stems)."""
    stems, bad = [], []
    for i, value in enumerate(items):
        if not isinstance(value, str):
            return i, bad, []
        try:
            stems.append(NhsNumber(value).stem)
        except InvalidNhsNumber:
            bad.append(i + 1)
    return None, bad, stems


@settings(max_examples=300, deadline=None)
@given(st.lists(element, max_size=25), st.lists(separator, min_size=1), st.integers(4, 64), st.booleans())
def test_json_array_scanner_agrees_with_a_json_decoder(elements, separators, chunk, padded):
    items = [value for value, _ in elements]
    pad = " \n" if padded else ""
    text = "[" + pad + "".join(
        literal + (separators[i % len(separators)] if i < len(elements) - 1 else "")
        for i, (_, literal) in enumerate(elements)) + pad + "]"
    assert json.loads(text) == items  # the generator writes real JSON
    parsed = bulk.parse_json_array(text.encode(), chunk=chunk)
    wrong, bad, stems = json_reference(items)
    if wrong is not None:
        assert parsed.not_a_string is not None and parsed.not_a_string.index == wrong
        assert json.loads(parsed.not_a_string.text) == items[wrong]
        assert parsed.invalid_lines.tolist() == [b for b in bad if b <= wrong]
    else:
        assert parsed.not_a_string is None
        assert parsed.invalid_lines.tolist() == bad
        if not bad:
            assert parsed.stems.tolist() == stems
    if bad:
        assert parsed.first_invalid.index == bad[0] - 1
        assert json.loads(parsed.first_invalid.text) == items[bad[0] - 1]


def test_json_format_is_one_buffer_that_parses_back():
    stems = np.array([int(n[:9]) for n in VALID * 3], dtype=np.uint32)
    out = bulk.format_json_array(stems, b'{"nhs_numbers":', b',"as_of":3}')
    assert json.loads(bytes(out)) == {"nhs_numbers": VALID * 3, "as_of": 3}
    assert bulk.parse_json_array(bytes(out)[len(b'{"nhs_numbers":'):-len(b',"as_of":3}')]).stems.tolist() == \
        stems.tolist()

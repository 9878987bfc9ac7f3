"""The vectorised bulk parser agrees with the one-number-at-a-time NhsNumber."""

from __future__ import annotations

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
    assert bulk.format_json_array(stems).decode() == "[" + ",".join(f'"{n}"' for n in numbers) + "]"

"""Bulk lists of NHS numbers on the wire: text/plain and MESH ``.dat``.

Filter and cohort calls carry millions of numbers, so parsing and
formatting are vectorised with numpy rather than a Python loop per number.
Each line holds one NHS number; spaces and dashes are tolerated, a trailing
CR is ignored, and in ``.dat`` every number is followed by one comma.  Blank
lines are skipped but still counted, so reported line numbers match the
caller's file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .nhs_number import allocated


TEXT = "text/plain"
DAT = "application/vnd.nhs.mesh.dat"

_NL, _CR, _SPACE, _DASH, _COMMA = 10, 13, 32, 45, 44
_ZERO = 48
_DIGIT_POWERS = 10 ** np.arange(9, -1, -1, dtype=np.int64)


@dataclass(frozen=True)
class Parsed:
    """Stems in input order (duplicates kept) or the invalid 1-based line numbers."""

    stems: np.ndarray  # uint32, one per non-blank line, input order
    invalid_lines: np.ndarray  # int64, ascending, 1-based
    # For fixed-width input: the lines themselves, (n, width) bytes, so an
    # answer can echo the caller's own lines without formatting them again.
    rows: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return len(self.invalid_lines) == 0


def _from_digit_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stems and a 'check digit wrong' mask from an (n, 10) table of digit values.

    Column by column in uint32 (a stem is < 10**9 < 2**32): no (n, 9) int64 temporaries."""
    stems = np.zeros(len(table), dtype=np.uint32)
    total = np.zeros(len(table), dtype=np.uint32)
    for column in range(9):
        digit = table[:, column].astype(np.uint32)
        stems *= np.uint32(10)
        stems += digit
        total += digit * np.uint32(10 - column)
    check = np.uint32(11) - total % np.uint32(11)
    check[check == 11] = 0
    return stems, (check != table[:, 9]) | ~allocated(stems)


def _fixed_width(raw: np.ndarray, dat: bool) -> Parsed | None:
    """The common case, every line exactly the 10 digits (+ comma) + LF or CRLF."""
    for crlf in (False, True):
        width = 11 + dat + crlf
        if len(raw) % width:
            continue
        table = raw.reshape(-1, width)
        if not (table[:, -1] == _NL).all() or (crlf and not (table[:, -2] == _CR).all()):
            continue
        if dat and not (table[:, 10] == _COMMA).all():
            continue
        digits = table[:, :10] - np.uint8(_ZERO)
        if digits.max(initial=0) > 9:
            return None
        stems, wrong = _from_digit_table(digits)
        if wrong.any():
            return Parsed(np.empty(0, np.uint32), np.flatnonzero(wrong).astype(np.int64) + 1)
        return Parsed(stems.astype(np.uint32), np.empty(0, np.int64), table)
    return None


def parse_lines(body: bytes, *, dat: bool = False) -> Parsed:
    """Parse one NHS number per line (``dat``: each followed by a comma)."""
    if body and not body.endswith(b"\n"):
        body += b"\n"
    raw = np.frombuffer(body, dtype=np.uint8)
    if len(raw) == 0:
        return Parsed(np.empty(0, np.uint32), np.empty(0, np.int64))
    fast = _fixed_width(raw, dat)
    if fast is not None:
        return fast
    is_nl = raw == _NL
    # Line index of every byte; the newline itself belongs to the line it ends.
    line_of = np.cumsum(is_nl) - is_nl
    lines = int(line_of[-1]) + 1
    ignorable = is_nl | (raw == _CR) | (raw == _SPACE) | (raw == _DASH)
    is_comma = raw == _COMMA
    kept = ~ignorable
    if dat:
        kept &= ~is_comma
    is_digit = (raw >= _ZERO) & (raw <= _ZERO + 9)
    digits_per_line = np.bincount(line_of[kept & is_digit], minlength=lines)
    other_per_line = np.bincount(line_of[kept & ~is_digit], minlength=lines)
    blank = (digits_per_line == 0) & (other_per_line == 0)
    bad = ~blank & ((digits_per_line != 10) | (other_per_line != 0))
    if dat:
        commas = np.bincount(line_of[is_comma], minlength=lines)
        # The comma must be the last meaningful character of its line.
        meaningful = ~ignorable
        idx = np.flatnonzero(meaningful)
        last = np.full(lines, -1, dtype=np.int64)
        last[line_of[idx]] = idx  # later indices overwrite earlier ones
        ends_with_comma = np.zeros(lines, dtype=bool)
        has = last >= 0
        ends_with_comma[has] = raw[last[has]] == _COMMA
        blank = blank & (commas == 0)
        bad = ~blank & ((digits_per_line != 10) | (other_per_line != 0) | (commas != 1) | ~ends_with_comma)
    digit_bytes = raw[kept & is_digit]
    digit_line = line_of[kept & is_digit]
    good_lines = ~blank & ~bad
    take = good_lines[digit_line]
    table = (digit_bytes[take] - np.uint8(_ZERO)).reshape(-1, 10)
    stems, wrong = _from_digit_table(table)
    if wrong.any():
        bad[np.flatnonzero(good_lines)[wrong]] = True
    if bad.any():
        return Parsed(np.empty(0, np.uint32), np.flatnonzero(bad).astype(np.int64) + 1)
    return Parsed(stems.astype(np.uint32), np.empty(0, np.int64))


def parse_list(numbers: list[str]) -> Parsed:
    """A JSON list of numbers, reported by 1-based list position."""
    if not numbers:
        return Parsed(np.empty(0, np.uint32), np.empty(0, np.int64))
    if any("\n" in n or "\r" in n or "," in n for n in numbers):
        bad = [i + 1 for i, n in enumerate(numbers) if "\n" in n or "\r" in n or "," in n]
        return Parsed(np.empty(0, np.uint32), np.array(bad, dtype=np.int64))
    parsed = parse_lines("\n".join(numbers).encode())
    if parsed.ok and len(parsed.stems) != len(numbers):
        # Blank strings are skipped by the line parser but are invalid list items.
        blank = [i + 1 for i, n in enumerate(numbers) if not n.strip(" -")]
        return Parsed(np.empty(0, np.uint32), np.array(blank, dtype=np.int64))
    return parsed


def number_table(stems: np.ndarray, width: int) -> np.ndarray:
    """An (n, width) uint8 table whose first 10 columns are the NHS numbers' digits."""
    rest = np.asarray(stems, dtype=np.uint32).copy()
    table = np.empty((len(rest), width), dtype=np.uint8)
    total = np.zeros(len(rest), dtype=np.uint32)
    for column in range(8, -1, -1):
        digit = rest % 10
        rest //= 10
        table[:, column] = digit
        total += digit * np.uint32(10 - column)
    check = 11 - total % 11
    check[check == 11] = 0
    table[:, 9] = check
    table[:, :10] += np.uint8(_ZERO)
    return table


def select_lines(parsed: Parsed, keep: np.ndarray, *, dat: bool = False) -> bytes:
    """The kept lines, in order: the caller's own bytes when the input was
    fixed-width in the same format, else freshly formatted."""
    if parsed.rows is not None and (parsed.rows.shape[1] - 11 - (parsed.rows[:1, -2] == _CR).all()) == dat:
        return parsed.rows[keep].tobytes()
    return format_lines(parsed.stems[keep], dat=dat)


def format_lines(stems: np.ndarray, *, dat: bool = False) -> bytes:
    """One number per line (``dat``: followed by a comma)."""
    if dat:
        table = number_table(stems, 12)
        table[:, 10] = _COMMA
        table[:, 11] = _NL
    else:
        table = number_table(stems, 11)
        table[:, 10] = _NL
    return table.tobytes()


def format_json_array(stems: np.ndarray) -> bytes:
    """``["n1","n2",...]`` without building a Python string per number."""
    if len(stems) == 0:
        return b"[]"
    table = np.empty((len(stems), 13), dtype=np.uint8)
    table[:, 0] = ord('"')
    table[:, 1:11] = number_table(stems, 10)
    table[:, 11] = ord('"')
    table[:, 12] = ord(",")
    out = table.tobytes()
    return b"[" + out[:-1] + b"]"

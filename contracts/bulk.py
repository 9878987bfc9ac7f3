"""Bulk lists of NHS numbers on the wire: text/plain, MESH ``.dat`` and JSON arrays.

Filter, cohort and data-use calls carry up to millions of numbers, so
parsing and formatting are vectorised with numpy over the bytes, never a
Python string per number, and run over pieces of about ``CHUNK`` bytes:
that bounds the temporaries (a 5M-number body costs little more than the
body itself) and keeps every numpy call short, so a parse running in a
worker thread never holds up the event loop for long.

Lines: each holds one NHS number; spaces and dashes are tolerated, a
trailing CR is ignored, and in ``.dat`` every number is followed by one
comma.  Blank lines are skipped but still counted, so reported line
numbers match the caller's file.

JSON arrays (already checked to be well-formed JSON, e.g. decoded by msgspec
as ``msgspec.Raw``): every element must be a string holding one NHS number;
empty strings are invalid.  Invalid entries are reported by position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from .nhs_number import InvalidNhsNumber, NhsNumber, allocated

TEXT = "text/plain"
DAT = "application/vnd.nhs.mesh.dat"

CHUNK = 1 << 20  # bytes per vectorised step

_NL, _CR, _SPACE, _DASH, _COMMA = 10, 13, 32, 45, 44
_QUOTE, _BACKSLASH, _OPEN, _CLOSE = 34, 92, 91, 93
_ZERO = 48
_EMPTY_STEMS = np.empty(0, np.uint32)
_EMPTY_LINES = np.empty(0, np.int64)
# Bytes allowed between the strings of a JSON array: whitespace and commas.
_SEPARATOR = np.zeros(256, dtype=bool)
_SEPARATOR[[_SPACE, 9, _NL, _CR, _COMMA]] = True


@dataclass(frozen=True)
class Element:
    """A JSON array element: its 0-based index and its JSON text."""

    index: int
    text: bytes


@dataclass(frozen=True)
class Parsed:
    """Stems in input order (duplicates kept), or the invalid 1-based line
    numbers (for JSON: index + 1).  For JSON also the first invalid string
    and the first element that is not a string at all (then parsing stopped
    there, as a JSON decoder would)."""

    stems: np.ndarray  # uint32, one per non-blank line, input order
    invalid_lines: np.ndarray  # int64, ascending, 1-based
    # For fixed-width input: the lines themselves, (n, width) bytes, so an
    # answer can echo the caller's own lines without formatting them again.
    rows: np.ndarray | None = None
    first_invalid: Element | None = None
    not_a_string: Element | None = None
    # Lines ended with CRLF: an answer in lines ends its lines the same way.
    crlf: bool = False

    @property
    def ok(self) -> bool:
        return len(self.invalid_lines) == 0 and self.not_a_string is None


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


def _fixed_table(raw: np.ndarray, dat: bool) -> np.ndarray | None:
    """The (n, width) view when every line is exactly 10 bytes (+ comma) + LF or CRLF."""
    for crlf in (False, True):
        width = 11 + dat + crlf
        if len(raw) % width:
            continue
        table = raw.reshape(-1, width)
        if not (table[:, -1] == _NL).all() or (crlf and not (table[:, -2] == _CR).all()):
            continue
        if dat and not (table[:, 10] == _COMMA).all():
            continue
        return table
    return None


def _lines(piece: np.ndarray, dat: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per line of ``piece`` (which ends with LF): stem, valid?, blank?"""
    table = _fixed_table(piece, dat)
    if table is not None:
        digits = table[:, :10] - np.uint8(_ZERO)
        if digits.max(initial=0) <= 9:
            stems, wrong = _from_digit_table(digits)
            return stems, ~wrong, np.zeros(len(stems), dtype=bool)
    is_nl = piece == _NL
    # Line index of every byte; the newline itself belongs to the line it ends.
    line_of = np.cumsum(is_nl, dtype=np.int32)
    line_of -= is_nl
    lines = int(line_of[-1]) + 1
    ignorable = is_nl | (piece == _CR) | (piece == _SPACE) | (piece == _DASH)
    is_comma = piece == _COMMA
    kept = ~ignorable
    if dat:
        kept &= ~is_comma
    is_digit = (piece >= _ZERO) & (piece <= _ZERO + 9)
    digit = kept & is_digit
    digits_per_line = np.bincount(line_of[digit], minlength=lines)
    other_per_line = np.bincount(line_of[kept & ~is_digit], minlength=lines)
    blank = (digits_per_line == 0) & (other_per_line == 0)
    bad = (digits_per_line != 10) | (other_per_line != 0)
    if dat:
        commas = np.bincount(line_of[is_comma], minlength=lines)
        # The comma must be the last meaningful character of its line.
        idx = np.flatnonzero(~ignorable)
        last = np.full(lines, -1, dtype=np.int64)
        last[line_of[idx]] = idx  # later indices overwrite earlier ones
        ends_with_comma = np.zeros(lines, dtype=bool)
        has = last >= 0
        ends_with_comma[has] = piece[last[has]] == _COMMA
        blank &= commas == 0
        bad |= (commas != 1) | ~ends_with_comma
    bad &= ~blank
    good = ~blank & ~bad
    table = (piece[digit][good[line_of[digit]]] - np.uint8(_ZERO)).reshape(-1, 10)
    good_stems, wrong = _from_digit_table(table)
    stems = np.zeros(lines, dtype=np.uint32)
    stems[good] = good_stems
    ok = good
    ok[np.flatnonzero(good)[wrong]] = False
    return stems, ok, blank


def _line_pieces(body: bytes | bytearray, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive pieces of about ``chunk`` bytes, each ending after a newline (or at the end)."""
    start, end = 0, len(body)
    while start < end:
        stop = min(start + chunk, end)
        if stop < end:
            newline = body.rfind(b"\n", start, stop)
            if newline < 0:  # one line longer than a chunk
                newline = body.find(b"\n", stop)
            stop = end if newline < 0 else newline + 1
        yield start, stop
        start = stop


def parse_lines(body: bytes | bytearray, *, dat: bool = False, chunk: int = CHUNK) -> Parsed:
    """Parse one NHS number per line (``dat``: each followed by a comma)."""
    raw = np.frombuffer(body, dtype=np.uint8)
    if len(raw) == 0:
        return Parsed(_EMPTY_STEMS, _EMPTY_LINES)
    rows = _fixed_table(raw, dat)
    found: list[np.ndarray] = []
    bad: list[np.ndarray] = []
    first_line = 1
    for start, stop in _line_pieces(body, chunk):
        piece = raw[start:stop]
        if piece[-1] != _NL:
            piece = np.append(piece, np.uint8(_NL))  # the last line's missing newline: copies this piece only
        stems, ok, blank = _lines(piece, dat)
        wrong = np.flatnonzero(~ok & ~blank)
        if len(wrong):
            bad.append(wrong + first_line)
        elif not bad:
            found.append(stems[~blank])
        first_line += len(stems)
    if bad:
        return Parsed(_EMPTY_STEMS, np.concatenate(bad).astype(np.int64))
    first_newline = body.find(b"\n")
    crlf = first_newline > 0 and body[first_newline - 1] == _CR
    return Parsed(np.concatenate(found) if found else _EMPTY_STEMS, _EMPTY_LINES, rows, crlf=crlf)


def _unescaped_quotes(v: np.ndarray) -> np.ndarray:
    """Positions of the quotes in ``v`` that delimit strings (not ``\\"``)."""
    quotes = np.flatnonzero(v == _QUOTE)
    backslash = v == _BACKSLASH
    if len(quotes) == 0 or not backslash.any():
        return quotes
    # A quote is escaped when an odd number of backslashes run up to it.
    idx = np.arange(len(v))
    last_plain = np.maximum.accumulate(np.where(backslash, -1, idx))
    before = np.maximum(quotes - 1, 0)
    run = np.where(quotes > 0, before - last_plain[before], 0)
    return quotes[run % 2 == 0]


def _outside(length: int, opens: np.ndarray, closes: np.ndarray) -> np.ndarray:
    """True for the bytes of ``[0, length)`` not within a string ``[open, close]``."""
    ends = closes + 1
    if len(ends) < len(opens):  # a string still open at the end
        ends = np.append(ends, length)
    edges = np.empty(2 * len(opens) + 2, dtype=np.int64)
    edges[0], edges[-1] = 0, length
    edges[1:-1:2], edges[2:-1:2] = opens, ends
    runs = np.diff(edges)
    return np.repeat(np.arange(len(runs)) % 2 == 0, runs)


def _separators(v: np.ndarray) -> np.ndarray:
    return (v == _SPACE) | (v == _COMMA) | (v == _NL) | (v == _CR) | (v == 9)


def _json_strings(v: np.ndarray, opens: np.ndarray, closes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stem and valid? for each string ``v[open:close + 1]``."""
    lengths = closes - opens - 1
    escaped = np.zeros(len(opens), dtype=bool)
    backslash = v == _BACKSLASH
    if backslash.any():
        before = np.concatenate([[0], np.cumsum(backslash, dtype=np.int64)])
        escaped = before[closes] > before[opens + 1]
    if len(opens) and (lengths == 10).all() and not escaped.any():
        digits = v[opens[:, None] + np.arange(1, 11)] - np.uint8(_ZERO)
        if digits.max() <= 9:
            stems, wrong = _from_digit_table(digits)
            return stems, ~wrong
    # The general case: turn each string into one line for the line parser.
    lines = v[:closes[-1] + 1].copy() if len(closes) else v[:0].copy()
    lines[_outside(len(lines), opens, closes)] = _SPACE
    lines[opens] = _SPACE
    lines[closes] = _NL
    for i in np.flatnonzero(escaped):
        lines[opens[i] + 1:closes[i]] = ord("x")  # decoded one by one below
    stems, ok, blank = _lines(lines, dat=False) if len(lines) else (_EMPTY_STEMS, np.zeros(0, bool), np.zeros(0, bool))
    ok &= ~blank  # an empty string is not a number
    for i in np.flatnonzero(escaped):
        text = msgspec.json.decode(v[opens[i]:closes[i] + 1].tobytes(), type=str)
        try:
            stems[i], ok[i] = NhsNumber(text).stem, True
        except InvalidNhsNumber:
            ok[i] = False
    return stems, ok


def _json_value_at(raw: np.ndarray, p: int) -> bytes:
    """The JSON text of the (well-formed) value starting at ``raw[p]`` (an error path: a plain loop)."""
    data = raw[p:].tobytes() if raw[p] in (ord("{"), _OPEN) else raw[p:p + 64].tobytes()
    if data[0] not in (ord("{"), _OPEN):
        end = next((i for i, b in enumerate(data) if _SEPARATOR[b] or b == _CLOSE), len(data))
        return data[:end]
    depth, in_string, escape = 0, False, False
    for i, b in enumerate(data):
        if escape:
            escape = False
        elif in_string:
            escape = b == _BACKSLASH
            in_string = b != _QUOTE
        elif b == _QUOTE:
            in_string = True
        elif b in (ord("{"), _OPEN):
            depth += 1
        elif b in (ord("}"), _CLOSE):
            depth -= 1
            if depth == 0:
                return data[:i + 1]
    return data


def _fixed_json(items: np.ndarray) -> Parsed | None:
    """The usual machine-written layout, every element ``"dddddddddd"`` at one
    stride (``","`` or ``", "`` between them): views and a few comparisons,
    which also prove the layout well-formed."""
    first_sep = 12
    while first_sep < min(len(items), 28) and items[first_sep] != _QUOTE:
        first_sep += 1
    sep = items[12:first_sep]
    width = 12 + len(sep)
    if len(items) < 12 or (len(items) + len(sep)) % width or (len(items) > 12 and (sep == _COMMA).sum() != 1):
        return None
    n = (len(items) + len(sep)) // width
    rows = items[:(n - 1) * width].reshape(n - 1, width)
    last = items[(n - 1) * width:]
    if len(last) != 12 or last[0] != _QUOTE or last[11] != _QUOTE or not _separators(sep).all():
        return None
    if not ((rows[:, 0] == _QUOTE).all() and (rows[:, 11] == _QUOTE).all() and (rows[:, 12:] == sep).all()):
        return None
    stems, wrong = np.empty(n, np.uint32), np.empty(n, bool)
    step = 1 << 18  # rows at a time: the digit tables stay small
    pieces = [(start, rows[start:start + step, 1:11]) for start in range(0, n - 1, step)] + [(n - 1, last[None, 1:11])]
    for start, part in pieces:
        digits = part - np.uint8(_ZERO)
        if digits.max() > 9:
            return None
        stems[start:start + len(part)], wrong[start:start + len(part)] = _from_digit_table(digits)
    if wrong.any():
        bad = np.flatnonzero(wrong)
        i = int(bad[0])
        first = Element(i, items[i * width:i * width + 12].tobytes())
        return Parsed(_EMPTY_STEMS, bad.astype(np.int64) + 1, first_invalid=first)
    return Parsed(stems, _EMPTY_LINES)


def parse_plain_array(text: bytes | bytearray | memoryview | msgspec.Raw) -> Parsed | None:
    """``[...]`` holding only ``"dddddddddd"`` strings at one stride, parsed;
    None for any other text.  Checks the JSON too, so it needs no decoder first."""
    raw = np.frombuffer(text, dtype=np.uint8)
    lo, hi = 0, len(raw) - 1
    while lo < hi and _SEPARATOR[raw[lo]] and raw[lo] != _COMMA:
        lo += 1
    while hi > lo and _SEPARATOR[raw[hi]] and raw[hi] != _COMMA:
        hi -= 1
    if hi - lo < 13 or raw[lo] != _OPEN or raw[hi] != _CLOSE:
        return None
    first, last = lo + 1, hi
    while first < last and _SEPARATOR[raw[first]] and raw[first] != _COMMA:
        first += 1
    while last > first and _SEPARATOR[raw[last - 1]] and raw[last - 1] != _COMMA:
        last -= 1
    return _fixed_json(raw[first:last]) if last - first >= 12 else None


def parse_json_array(text: bytes | bytearray | memoryview | msgspec.Raw, *, chunk: int = CHUNK) -> Parsed:
    """Parse a well-formed JSON array of NHS-number strings, in input order."""
    plain = parse_plain_array(text)
    if plain is not None:
        return plain
    raw = np.frombuffer(text, dtype=np.uint8)
    lo = 0
    while raw[lo] != _OPEN:  # leading whitespace
        lo += 1
    hi = len(raw) - 1
    while raw[hi] != _CLOSE:
        hi -= 1
    pos, count = lo + 1, 0
    found: list[np.ndarray] = []
    bad: list[np.ndarray] = []
    first_invalid: Element | None = None
    while pos < hi:
        size = chunk
        while True:  # a piece ending right after a string (so the next starts outside one)
            v = raw[pos:min(pos + size, hi)]
            quotes = _unescaped_quotes(v)
            if pos + size >= hi:
                break
            complete = len(quotes) - len(quotes) % 2
            if complete:
                quotes = quotes[:complete]
                v = v[:quotes[-1] + 1]
                break
            if not _separators(v[:quotes[0] if len(quotes) else len(v)]).all():
                break  # a non-string element before any string: reported below
            size *= 2  # one string longer than the piece
        opens, closes = quotes[0::2], quotes[1::2]
        stray = np.flatnonzero(_outside(len(v), opens, closes) & ~_separators(v))[:1]
        if len(stray):  # an element that is not a string: the strings before it still count
            strings = int(np.searchsorted(opens, stray[0]))
            opens, closes = opens[:strings], closes[:strings]
        stems, ok = _json_strings(v, opens, closes)
        wrong = np.flatnonzero(~ok)
        if len(wrong):
            if first_invalid is None:
                i = int(wrong[0])
                first_invalid = Element(count + i, v[opens[i]:closes[i] + 1].tobytes())
            bad.append(wrong + count + 1)
        elif not bad:
            found.append(stems)
        count += len(opens)
        if len(stray):
            invalid = np.concatenate(bad).astype(np.int64) if bad else _EMPTY_LINES
            return Parsed(_EMPTY_STEMS, invalid, first_invalid=first_invalid,
                          not_a_string=Element(count, _json_value_at(raw, pos + int(stray[0]))))
        pos += len(v)
    if bad:
        return Parsed(_EMPTY_STEMS, np.concatenate(bad).astype(np.int64), first_invalid=first_invalid)
    return Parsed(np.concatenate(found) if found else _EMPTY_STEMS, _EMPTY_LINES)


def number_table(stems: np.ndarray, width: int) -> np.ndarray:
    """An (n, width) uint8 table whose first 10 columns are the NHS numbers' digits."""
    table = np.empty((len(stems), width), dtype=np.uint8)
    _number_columns(np.asarray(stems, dtype=np.uint32), table)
    return table


def _number_columns(stems: np.ndarray, table: np.ndarray) -> None:
    """Write the 10 digits of each number into ``table[:, :10]``."""
    rest = stems.copy()
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


def select_lines(parsed: Parsed, keep: np.ndarray, *, dat: bool = False) -> memoryview:
    """The kept lines, in order: the caller's own bytes when the input was
    fixed-width in the same format, else freshly formatted."""
    rows = parsed.rows
    if rows is None or (rows.shape[1] - 11 - (rows[:1, -2] == _CR).all()) != dat:
        return memoryview(_lines_table(parsed.stems[keep], dat, parsed.crlf).reshape(-1))
    out = np.empty((int(keep.sum()), rows.shape[1]), dtype=np.uint8)
    at = 0
    for start in range(0, len(rows), 1 << 18):  # in pieces: no long stretch holding the GIL
        part = rows[start:start + (1 << 18)][keep[start:start + (1 << 18)]]
        out[at:at + len(part)] = part
        at += len(part)
    return memoryview(out.reshape(-1))


def format_lines(stems: np.ndarray, *, dat: bool = False) -> bytes:
    """One number per line (``dat``: followed by a comma)."""
    return _lines_table(stems, dat).tobytes()


def _lines_table(stems: np.ndarray, dat: bool, crlf: bool = False) -> np.ndarray:
    table = number_table(stems, 11 + dat + crlf)
    if dat:
        table[:, 10] = _COMMA
    if crlf:
        table[:, -2] = _CR
    table[:, -1] = _NL
    return table


def format_json_array(stems: np.ndarray, prefix: bytes = b"", suffix: bytes = b"") -> memoryview:
    """``prefix + ["n1","n2",...] + suffix`` in one buffer, without a Python string per number."""
    n = len(stems)
    body = 13 * n + 1 if n else 2
    out = np.empty(len(prefix) + body + len(suffix), dtype=np.uint8)
    out[:len(prefix)] = np.frombuffer(prefix, np.uint8)
    out[len(prefix)] = _OPEN
    if n:
        table = out[len(prefix) + 1:len(prefix) + 1 + 13 * n].reshape(n, 13)
        table[:, 0] = _QUOTE
        for start in range(0, n, 1 << 18):  # in pieces: the digits' temporaries stay small
            part = slice(start, start + (1 << 18))
            _number_columns(np.asarray(stems[part], dtype=np.uint32), table[part, 1:11])
        table[:, 11] = _QUOTE
        table[:, 12] = _COMMA
    out[len(prefix) + body - 1] = _CLOSE  # over the last comma
    out[len(prefix) + body:] = np.frombuffer(suffix, np.uint8)
    return memoryview(out)

"""Bulk bodies of NHS numbers over HTTP: JSON, text/plain and MESH ``.dat``.

Reading picks the parser by media type and turns invalid entries into one
422 that lists where they are (the first ``MAX_REPORTED``) and never the
numbers themselves; writing answers in the caller's media type.

Millions of numbers in JSON are never decoded into Python strings: the
``nhs_numbers`` array is parsed by ``contracts.bulk``'s vectorised scanner
(found by it directly in the usual machine-written layout, else handed
over as raw bytes by msgspec after checking the whole document), and the
rest of the body, the array replaced by a stand-in, is decoded into its
Struct as before, so every error reads as it would from msgspec.

Everything here is CPU-bound and is called from a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import msgspec
import numpy as np

from contracts import bulk
from contracts.bodies import DataUseRequest, FilterRequest, ProblemDetail
from contracts.cohort import EncodedCohort, encode_cohort
from contracts.nhs_number import NhsNumber, decode_hook
from contracts.values import MAX_COHORT_SIZE
from service.http.body_mistakes import likely_mistake
from service.http.problems import (
    ProblemError,
    decode_json,
    invalid,
    reject_duplicate_keys,
)

T = TypeVar("T")

JSON = "application/json"
MEDIA_TYPES = (JSON, bulk.TEXT, bulk.DAT)
MAX_REPORTED = 100
# A valid number standing in for the array while the rest of a body is decoded.
_STAND_IN = b'["9434765919"]'
# The rest of a body (everything but the numbers) is small in any sane request;
# a larger rest (a repeated `nhs_numbers` key, say) is decoded the plain way.
_SMALL_REST = 1 << 20


class _Numbers(msgspec.Struct):
    nhs_numbers: msgspec.Raw = msgspec.UNSET


_numbers_field = msgspec.json.Decoder(_Numbers)
_any = msgspec.json.Decoder(msgspec.Raw)
_filter_request = msgspec.json.Decoder(FilterRequest)
_data_use_request = msgspec.json.Decoder(DataUseRequest, dec_hook=decode_hook)
_number_list = msgspec.json.Decoder(list[str])
_string = msgspec.json.Decoder(str)
_nhs_number = msgspec.json.Decoder(NhsNumber, dec_hook=decode_hook)


@dataclass(frozen=True)
class NumbersBody:
    media_type: str
    parsed: bulk.Parsed

    @property
    def stems(self) -> np.ndarray:
        return self.parsed.stems


def parse(content_type: str, body: bytes | bytearray, *, json_list: bool = False) -> NumbersBody:
    """``json_list``: the JSON form is a bare array (cohorts) rather than
    ``{"nhs_numbers": [...]}`` (filter)."""
    try:
        return _parse(content_type, body, json_list)
    except ProblemError as problem:
        hint = likely_mistake(content_type, body) if problem.status in (400, 422) else None
        if hint is not None:
            problem.detail = f"{problem.detail}; {hint}"
        raise


def _parse(content_type: str, body: bytes | bytearray, json_list: bool) -> NumbersBody:
    if content_type == JSON:
        where = "$" if json_list else "$.nhs_numbers"
        found = _array(body) if json_list else _split(body, _filter_request, b"[]")[1]
        assert found is not None, "FilterRequest requires the array"
        parsed = found
        if parsed.not_a_string is not None:  # a decoder of list[str] stops there
            raise _element_problem(parsed.not_a_string, _string, where, body)
        positions = [f"{where}[{i - 1}]" for i in parsed.invalid_lines[:MAX_REPORTED].tolist()]
    elif content_type in (bulk.TEXT, bulk.DAT):
        where = "body"
        parsed = bulk.parse_lines(body, dat=content_type == bulk.DAT)
        positions = [f"line {i}" for i in parsed.invalid_lines[:MAX_REPORTED].tolist()]
    else:
        raise ProblemError(415, "unsupported-media-type", "Unsupported media type",
                           f"send NHS numbers as {', '.join(MEDIA_TYPES)}, not {content_type or 'nothing'}")
    if not parsed.ok:
        count = len(parsed.invalid_lines)
        shown = "" if count <= MAX_REPORTED else f" (the first {MAX_REPORTED} are listed)"
        raise ProblemError(
            422, "invalid-nhs-numbers", "Invalid NHS numbers",
            f"{count} entr{'y is' if count == 1 else 'ies are'} not a valid NHS number (10 digits, modulus-11 "
            f"check digit, an allocated range; spaces and dashes allowed){shown}; nothing was processed",
            errors=[ProblemDetail(path=p, message="not a valid NHS number") for p in positions],
        )
    if len(parsed.stems) > MAX_COHORT_SIZE:
        raise invalid(f"{len(parsed.stems):,} NHS numbers in one request; at most {MAX_COHORT_SIZE:,} are accepted: "
                      "send larger sets in several requests", where, slug="too-many-nhs-numbers")
    return NumbersBody(content_type, parsed)


def data_use(body: bytes | bytearray) -> tuple[DataUseRequest, EncodedCohort | None]:
    """A data-use body; with inline ``nhs_numbers`` the request comes back
    naming the cohort they make (by ``cohort_id``), with that cohort encoded."""
    request, parsed = _split(body, _data_use_request, _STAND_IN)
    if parsed is None:
        return request, None
    failures = [e for e in (parsed.first_invalid, parsed.not_a_string) if e is not None]
    if failures:  # the decoder of list[NhsNumber] stops at the first, saying why
        raise _element_problem(min(failures, key=lambda e: e.index), _nhs_number, "$.nhs_numbers", body)
    if len(parsed.stems) > MAX_COHORT_SIZE:
        message = f"Expected `array` of length <= {MAX_COHORT_SIZE}"
        raise ProblemError(422, "invalid-body", "The request body is not valid", f"{message} (at $.nhs_numbers)",
                           errors=[ProblemDetail(path="$.nhs_numbers", message=message)])
    cohort = encode_cohort(parsed.stems)
    return msgspec.structs.replace(request, nhs_numbers=None, cohort_id=cohort.cohort_id), cohort


def _split(body: bytes | bytearray, decoder: msgspec.json.Decoder[T], stand_in: bytes) -> tuple[T, bulk.Parsed | None]:
    """``{"nhs_numbers": [...], ...}``: the Struct decoded from the rest of
    the body (the array replaced by ``stand_in``) and the array, parsed."""
    located = _locate(body)
    if located is not None:
        start, end, parsed = located
        rest = body[:start] + stand_in + body[end:]
        if len(rest) <= _SMALL_REST and _field_at(rest, start):
            return decode_json(rest, decoder), parsed
    try:
        numbers = _numbers_field.decode(body).nhs_numbers
    except msgspec.ValidationError:  # (a kind of DecodeError)
        numbers = msgspec.UNSET  # not an object: the plain decode says so
    except msgspec.DecodeError as exc:
        raise _malformed(exc) from None
    if numbers is not msgspec.UNSET and memoryview(numbers)[:1] == b"[":
        start = _offset(numbers, body)
        end = start + len(memoryview(numbers))
        if 0 <= start < end <= len(body) and len(body) - (end - start) <= _SMALL_REST:
            empty = end - start < 64 and not bytes(numbers)[1:-1].strip()
            rest = body[:start] + (b"[]" if empty else stand_in) + body[end:]
            return decode_json(rest, decoder), bulk.parse_json_array(numbers)
    # The plain way: exact, and costly only for odd bodies (a repeated key, a huge other field).
    value = decode_json(body, decoder)
    listed = getattr(value, "nhs_numbers", None)
    return value, bulk.parse_json_array(msgspec.json.encode(listed)) if listed is not None else None


def _locate(body: bytes | bytearray) -> tuple[int, int, bulk.Parsed] | None:
    """The usual case found without decoding the whole body (msgspec would
    hold the GIL for ~60 ms over 60 MB): the first ``"nhs_numbers":`` and
    its array up to the next ``]``, which the scanner takes only as plain
    10-digit strings (no ``]`` can hide in those).  That it is the object's
    own field is for the caller to confirm (``_field_at``)."""
    key = body.find(b'"nhs_numbers"')
    if key < 0:
        return None
    i = key + len(b'"nhs_numbers"')
    for expected in (b":", b"["):
        while body[i:i + 1] in (b" ", b"\t", b"\n", b"\r"):
            i += 1
        if body[i:i + 1] != expected:
            return None
        i += expected == b":"
    end = body.find(b"]", i)
    parsed = bulk.parse_plain_array(memoryview(body)[i:end + 1]) if end > 0 else None
    return (i, end + 1, parsed) if parsed is not None else None


def _field_at(rest: bytes | bytearray, start: int) -> bool:
    """Whether ``rest`` is JSON whose ``nhs_numbers`` field starts at ``start``."""
    try:
        numbers = _numbers_field.decode(rest).nhs_numbers
    except msgspec.DecodeError:
        return False
    return numbers is not msgspec.UNSET and _offset(numbers, rest) == start


def _offset(part: msgspec.Raw, whole: bytes | bytearray) -> int:
    """Where ``part`` (msgspec.Raw points into the buffer it was decoded from) starts in ``whole``."""
    return np.frombuffer(part, np.uint8).ctypes.data - np.frombuffer(whole, np.uint8).ctypes.data


def _array(body: bytes | bytearray) -> bulk.Parsed:
    """A body that must be one JSON array (of number strings), parsed."""
    plain = bulk.parse_plain_array(body)
    if plain is not None:
        return plain
    try:
        _any.decode(body)
    except msgspec.DecodeError as exc:
        raise _malformed(exc) from None
    if bytes(body[:64]).lstrip()[:1] != b"[":
        decode_json(body, _number_list)  # not an array: says what it is
    return bulk.parse_json_array(body)


def _malformed(exc: msgspec.DecodeError) -> ProblemError:
    return ProblemError(400, "malformed-json", "Malformed JSON", f"the body is not valid JSON: {exc}")


def _element_problem(
    item: bulk.Element, element: msgspec.json.Decoder[object], where: str, body: bytes | bytearray
) -> ProblemError:
    """What ``element`` (the decoder of one array item) says about this one;
    but a repeated key in any object of the body comes first (400), as for
    every body.  (Objects besides the body itself are rare: only then is
    the whole body searched, at some cost.)"""
    if body.count(b"{") > (bytes(body[:64]).lstrip()[:1] == b"{"):
        reject_duplicate_keys(body)
    path = f"{where}[{item.index}]"
    try:
        element.decode(item.text)
        message = "not a valid NHS number"  # the scanner is stricter than the decoder: never expected
    except msgspec.ValidationError as exc:
        message = str(exc)
    return ProblemError(422, "invalid-body", "The request body is not valid", f"{message} (at {path})",
                        errors=[ProblemDetail(path=path, message=message)])


def render_lines(body: NumbersBody, keep: np.ndarray) -> memoryview:
    return bulk.select_lines(body.parsed, keep, dat=body.media_type == bulk.DAT)


def render_json(stems: np.ndarray, rest: dict[str, object]) -> memoryview:
    """``{"nhs_numbers": [...], **rest}`` in one buffer built by numpy."""
    tail = msgspec.json.encode(rest)
    return bulk.format_json_array(stems, b'{"nhs_numbers":', b"," + tail[1:] if len(tail) > 2 else b"}")

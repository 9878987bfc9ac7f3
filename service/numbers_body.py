"""Bulk bodies of NHS numbers over HTTP: JSON, text/plain and MESH ``.dat``.

Reading picks the parser by media type and turns invalid entries into one
422 that lists where they are (the first ``MAX_REPORTED``) and never the
numbers themselves; writing answers in the caller's media type.

Millions of numbers in JSON are never decoded into Python strings: msgspec
checks the whole document and hands back the ``nhs_numbers`` array as raw
bytes, the array is parsed by ``contracts.bulk``'s vectorised scanner, and
the rest of the body (the array replaced by a stand-in) is decoded into its
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

from .problems import ProblemError, decode_json, invalid, reject_duplicate_keys

T = TypeVar("T")
Numbers = bytes | bytearray | msgspec.Raw  # the JSON text of an array of number strings

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
    if content_type == JSON:
        where = "$" if json_list else "$.nhs_numbers"
        numbers = _array(body) if json_list else _split(body, _filter_request, b"[]")[1]
        assert numbers is not None, "FilterRequest requires the array"
        parsed = bulk.parse_json_array(numbers)
        if parsed.not_a_string is not None:  # a decoder of list[str] stops there
            raise _element_problem(parsed.not_a_string, _string, where, numbers)
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
            f"check digit; spaces and dashes allowed){shown}; nothing was processed",
            errors=[ProblemDetail(path=p, message="not a valid NHS number") for p in positions],
        )
    if len(parsed.stems) > MAX_COHORT_SIZE:
        raise invalid(f"{len(parsed.stems):,} NHS numbers in one request; at most {MAX_COHORT_SIZE:,} are accepted: "
                      "send larger sets in several requests", where, slug="too-many-nhs-numbers")
    return NumbersBody(content_type, parsed)


def data_use(body: bytes | bytearray) -> tuple[DataUseRequest, EncodedCohort | None]:
    """A data-use body; with inline ``nhs_numbers`` the request comes back
    naming the cohort they make (by ``cohort_id``), with that cohort encoded."""
    request, numbers = _split(body, _data_use_request, _STAND_IN)
    if numbers is None:
        return request, None
    parsed = bulk.parse_json_array(numbers)
    failures = [e for e in (parsed.first_invalid, parsed.not_a_string) if e is not None]
    if failures:  # the decoder of list[NhsNumber] stops at the first, saying why
        raise _element_problem(min(failures, key=lambda e: e.index), _nhs_number, "$.nhs_numbers", numbers)
    if len(parsed.stems) > MAX_COHORT_SIZE:
        message = f"Expected `array` of length <= {MAX_COHORT_SIZE}"
        raise ProblemError(422, "invalid-body", "The request body is not valid", f"{message} (at $.nhs_numbers)",
                           errors=[ProblemDetail(path="$.nhs_numbers", message=message)])
    cohort = encode_cohort(parsed.stems)
    return msgspec.structs.replace(request, nhs_numbers=None, cohort_id=cohort.cohort_id), cohort


def _split(body: bytes | bytearray, decoder: msgspec.json.Decoder[T], stand_in: bytes) -> tuple[T, Numbers | None]:
    """``{"nhs_numbers": [...], ...}``: the Struct decoded from the rest of
    the body (the array replaced by ``stand_in``) and the array's JSON text."""
    try:
        numbers = _numbers_field.decode(body).nhs_numbers
    except msgspec.ValidationError:  # (a kind of DecodeError)
        numbers = msgspec.UNSET  # not an object: the plain decode says so
    except msgspec.DecodeError as exc:
        raise _malformed(exc) from None
    if numbers is not msgspec.UNSET and memoryview(numbers)[:1] == b"[":
        # msgspec.Raw points into the body: where the array starts and ends.
        start = np.frombuffer(numbers, np.uint8).ctypes.data - np.frombuffer(body, np.uint8).ctypes.data
        end = start + len(memoryview(numbers))
        if 0 <= start < end <= len(body) and len(body) - (end - start) <= _SMALL_REST:
            empty = end - start < 64 and not bytes(numbers)[1:-1].strip()
            rest = body[:start] + (b"[]" if empty else stand_in) + body[end:]
            return decode_json(rest, decoder), numbers
    # The plain way: exact, and costly only for odd bodies (a repeated key, a huge other field).
    value = decode_json(body, decoder)
    listed = getattr(value, "nhs_numbers", None)
    return value, msgspec.json.encode(listed) if listed is not None else None


def _array(body: bytes | bytearray) -> bytes | bytearray:
    """A body that must be one JSON array (of number strings)."""
    try:
        _any.decode(body)
    except msgspec.DecodeError as exc:
        raise _malformed(exc) from None
    if bytes(body[:64]).lstrip()[:1] != b"[":
        decode_json(body, _number_list)  # not an array: says what it is
    return body


def _malformed(exc: msgspec.DecodeError) -> ProblemError:
    return ProblemError(400, "malformed-json", "Malformed JSON", f"the body is not valid JSON: {exc}")


def _element_problem(
    item: bulk.Element, element: msgspec.json.Decoder[object], where: str, numbers: Numbers
) -> ProblemError:
    """What ``element`` (the decoder of one array item) says about this one;
    but a repeated key in any object of the array comes first (400), as it
    does for every body."""
    if (np.frombuffer(numbers, np.uint8) == ord("{")).any():  # objects: never numbers, so an error body anyway
        reject_duplicate_keys(bytes(numbers))
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

"""Bulk bodies of NHS numbers over HTTP: JSON, text/plain and MESH ``.dat``.

Reading picks the parser by media type and turns invalid lines into one
422 that lists where they are (the first ``MAX_REPORTED``) and never the
numbers themselves; writing answers in the caller's media type.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np

from contracts import bulk
from contracts.bodies import FilterRequest, ProblemDetail

from .problems import ProblemError, decode_json

JSON = "application/json"
MEDIA_TYPES = (JSON, bulk.TEXT, bulk.DAT)
MAX_REPORTED = 100

_filter_request = msgspec.json.Decoder(FilterRequest)
_number_list = msgspec.json.Decoder(list[str])


@dataclass(frozen=True)
class NumbersBody:
    media_type: str
    parsed: bulk.Parsed

    @property
    def stems(self) -> np.ndarray:
        return self.parsed.stems


def parse(content_type: str, body: bytes, *, json_list: bool = False) -> NumbersBody:
    """``json_list``: the JSON form is a bare array (cohorts) rather than
    ``{"nhs_numbers": [...]}`` (filter)."""
    if content_type == JSON:
        numbers = decode_json(body, _number_list) if json_list else decode_json(body, _filter_request).nhs_numbers
        parsed = bulk.parse_list(numbers)
        where = "$[{}]" if json_list else "$.nhs_numbers[{}]"
        positions = [where.format(i - 1) for i in parsed.invalid_lines[:MAX_REPORTED].tolist()]
    elif content_type in (bulk.TEXT, bulk.DAT):
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
    return NumbersBody(content_type, parsed)


def render_lines(body: NumbersBody, keep: np.ndarray) -> bytes:
    return bulk.select_lines(body.parsed, keep, dat=body.media_type == bulk.DAT)


def render_json(stems: np.ndarray, rest: dict[str, object]) -> bytes:
    """``{"nhs_numbers": [...], **rest}`` with the list built by numpy."""
    tail = msgspec.json.encode(rest)
    return b'{"nhs_numbers":' + bulk.format_json_array(stems) + (b"," + tail[1:] if len(tail) > 2 else b"}")

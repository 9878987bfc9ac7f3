"""RFC 9457 problem details: every error the API returns is one of these."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from contracts.bodies import Problem, ProblemDetail

PROBLEM_TYPE = "application/problem+json"
T = TypeVar("T")

_encode = msgspec.json.Encoder().encode


class ProblemError(Exception):
    """Raised anywhere in a request to answer with a problem."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        errors: list[ProblemDetail] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def response(self, instance: str | None = None) -> web.Response:
        problem = Problem(
            type=f"urn:consent-ledger:problem:{self.slug}",
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=self.errors,
        )
        return web.Response(
            status=self.status, body=_encode(problem), content_type=PROBLEM_TYPE, headers=self.headers
        )


def invalid(detail: str, path: str, *, slug: str = "invalid-request", status: int = 422) -> ProblemError:
    return ProblemError(
        status, slug, "The request is not valid", detail, errors=[ProblemDetail(path=path, message=detail)]
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ProblemError(
                400, "duplicate-key", "Malformed JSON", f"the key {key!r} appears more than once in one object",
                errors=[ProblemDetail(path="$", message=f"duplicate key {key!r}")],
            )
        seen[key] = value
    return seen


def decode_json(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode and validate a JSON body: 400 if it is not JSON (or repeats a key
    within an object), 422 naming the offending field if it breaks the schema."""
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as exc:
        # A repeated key makes the body ambiguous; say so rather than report
        # a schema error about whichever value msgspec happened to keep.
        reject_duplicate_keys(body)
        message, _, where = str(exc).partition(" - at `")
        path = where.rstrip("`") or "$"
        if message.startswith("Invalid enum value"):
            allowed = allowed_values(decoder.type, path)
            if allowed:
                message += f"; allowed: {', '.join(allowed)}"
        raise ProblemError(
            422, "invalid-body", "The request body is not valid", f"{message} (at {path})",
            errors=[ProblemDetail(path=path, message=message)],
        ) from None
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "malformed-json", "Malformed JSON", f"the body is not valid JSON: {exc}") from None
    # msgspec keeps the last of repeated keys; a ledger must not guess which the caller meant.
    reject_duplicate_keys(body)
    return value


def reject_duplicate_keys(body: bytes) -> None:
    try:
        json.loads(body, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError):
        # msgspec has already parsed this body; these are limits of Python's
        # json module (e.g. 4300-digit integers, deep nesting), not ambiguity.
        pass


def allowed_values(kind: Any, path: str) -> list[str]:
    """The values an enum (or Literal) field at ``path`` (``$.a.b[0]``) of ``kind`` takes; [] if none is found."""
    info: Any = msgspec.inspect.type_info(kind)
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path[1:]):
        info = _step(info, name, bool(index))
        if info is None:
            return []
    info = _unwrap(info, lambda t: isinstance(t, (msgspec.inspect.LiteralType, msgspec.inspect.EnumType)))
    if isinstance(info, msgspec.inspect.LiteralType):
        return [str(v) for v in info.values]
    if isinstance(info, msgspec.inspect.EnumType):
        return [str(m.value) for m in info.cls]
    return []


def _unwrap(info: Any, wanted: Callable[[Any], bool]) -> Any:
    """Through Metadata and Optional/Union to the first type ``wanted`` accepts."""
    while isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        found = [_unwrap(t, wanted) for t in info.types]
        return next((t for t in found if wanted(t)), None)
    return info


def _step(info: Any, name: str, item: bool) -> Any:
    if item:
        info = _unwrap(info, lambda t: isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.TupleType)))
        return getattr(info, "item_type", None)
    info = _unwrap(info, lambda t: isinstance(t, msgspec.inspect.StructType))
    fields = getattr(info, "fields", ())
    return next((f.type for f in fields if f.encode_name == name), None)

"""Contracts: every Struct survives the wire, the canonical entry bytes are
exactly what an outside auditor's plain JSON library produces, and the
OpenAPI document is valid and fully served."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from contracts import api, bodies, events, values
from contracts.entry import canonical_json, decode_entry, encode_entry, format_recorded_at
from contracts.nhs_number import NhsNumber, check_digit
from contracts.values import Frozen
from service.http.app import HANDLERS

CONTRACTS = sorted(
    {
        value
        for module in (events, bodies)
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__module__ == module.__name__
    },
    key=lambda cls: cls.__name__,
)

# Text with everything JSON must escape or pass through: controls, quotes,
# backslashes, U+2028/9, astral characters.  Surrogates cannot be UTF-8.
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)
# Whole-minute offsets: RFC 3339 cannot say seconds in an offset.
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
aware_datetimes = st.datetimes(
    min_value=datetime(1900, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets
)
nhs_numbers = (  # in allocated ranges: England, Wales and IoM; synthetic
    st.one_of(st.integers(400_000_000, 499_999_999), st.integers(600_000_000, 799_999_999),
              st.integers(900_000_000, 999_999_999))
    .filter(lambda s: check_digit(f"{s:09d}") is not None)
    .map(NhsNumber.from_stem)
)


def _strategy(info: mi.Type) -> st.SearchStrategy[Any]:
    match info:
        case mi.Metadata():
            return _strategy(info.type)
        case mi.StrType(pattern=str() as pattern):
            return st.from_regex(pattern, fullmatch=True)
        case mi.StrType():
            return st.text(
                st.characters(exclude_categories=("Cs",)),
                min_size=info.min_length or 0,
                max_size=min(info.max_length or 60, 60),
            ).filter(lambda s: len(s) >= (info.min_length or 0))
        case mi.IntType():
            return st.integers(info.ge if info.ge is not None else -(2**62), info.le if info.le is not None else 2**62)
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.LiteralType():
            return st.sampled_from(info.values)
        case mi.DateTimeType():
            return aware_datetimes
        case mi.ListType():
            return st.lists(_strategy(info.item_type), min_size=info.min_length or 0,
                            max_size=min(info.max_length or 5, 5))
        case mi.DictType():
            return st.dictionaries(_strategy(info.key_type), _strategy(info.value_type), max_size=4)
        case mi.UnionType():
            return st.one_of(*(_strategy(t) for t in info.types))
        case mi.AnyType():
            return json_values
        case mi.CustomType(cls=cls) if cls is NhsNumber:
            return nhs_numbers
        case mi.StructType():
            return _struct(info)
    raise AssertionError(f"no strategy for {info!r}")


def _struct(info: mi.StructType) -> st.SearchStrategy[Any]:
    fields = {f.name: _strategy(f.type) for f in info.fields}

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        values = {name: draw(strategy) for name, strategy in fields.items()}
        try:
            return info.cls(**values)
        except ValueError:  # a cross-field rule in __post_init__; try other values
            reject()

    return build()


def strategy_for(cls: type) -> st.SearchStrategy[Any]:
    return _struct(mi.type_info(cls))


def _enc_hook(value: Any) -> Any:
    # NhsNumber is a str subclass that msgspec will not encode by itself;
    # on the wire it is its canonical 10 digits.
    if isinstance(value, NhsNumber):
        return str(value)
    raise NotImplementedError


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is NhsNumber:
        return NhsNumber(value)
    raise NotImplementedError


def test_every_contract_is_covered():
    names = {cls.__name__ for cls in CONTRACTS}
    assert set(events.EVENT_TYPES) <= names
    assert {"ChoiceRequest", "GrantRequest", "DataUseRequest", "Receipt", "Problem", "EventView"} <= names


@pytest.mark.parametrize("cls", CONTRACTS, ids=lambda c: c.__name__)
@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_contract_round_trips(cls, data):
    value = data.draw(strategy_for(cls))
    encoded = msgspec.json.encode(value, enc_hook=_enc_hook)
    decoded = msgspec.json.decode(encoded, type=cls, dec_hook=_dec_hook)
    assert decoded == value
    assert msgspec.json.encode(decoded, enc_hook=_enc_hook) == encoded


def test_strict_structs_refuse_unknown_fields():
    body = msgspec.json.encode({"reason": "ended", "surprise": 1})
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(body, type=bodies.RevokeRequest)
    assert all(issubclass(cls, Frozen) for cls in events.EVENT_TYPES.values())


@pytest.mark.parametrize("bad", ["G1\n", "\nG1", "G 1", "-G1", "x" * 65, ""])
def test_identifiers_match_the_whole_string(bad):
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode({"reason": "r", "grant_id": bad, "recorded_by": "t"}),
                            type=events.AccessRevoked)


@pytest.mark.parametrize(("kind", "bad"), [
    (events.NhsDigits, "9434765919\n"),
    (values.Sha256Hex, "a" * 64 + "\n"),
    (values.Identifier, "G1\n"),
])
def test_patterns_match_the_whole_string(kind, bad):
    # Python's `$` also matches before a final newline; a ledger must not
    # hold two identifiers that print the same.
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(bad), type=kind)


def _reference(value: Any) -> bytes:
    """What an auditor's standard library makes of the same JSON value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@given(json_values)
def test_canonical_json_matches_a_plain_reference_encoder(value):
    assert canonical_json(value) == _reference(value)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    payload=st.one_of(*(strategy_for(cls) for cls in events.EVENT_TYPES.values())),
    position=st.integers(1, 2**62),
    version=st.integers(1, 2**31),
    event_id=st.uuids(),
    aggregate_id=st.uuids(),
    moment=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2999, 1, 1), timezones=offsets),
)
def test_entry_encoding_matches_a_plain_reference_encoder(payload, position, version, event_id, aggregate_id, moment):
    recorded_at = format_recorded_at(moment)
    entry = encode_entry(
        position=position, event_id=event_id, event_type=type(payload).__name__, aggregate_id=aggregate_id,
        aggregate_version=version, recorded_at=recorded_at, payload=payload,
    )
    reference = _reference({
        "aggregate_id": str(aggregate_id),
        "aggregate_version": version,
        "event_id": str(event_id),
        "event_type": type(payload).__name__,
        "payload": json.loads(msgspec.json.encode(payload)),
        "position": position,
        "recorded_at": recorded_at,
    })
    assert entry == reference
    decoded = decode_entry(entry)
    assert decoded.payload == payload and UUID(decoded.event_id) == event_id


def test_recorded_at_is_fixed_width_utc():
    moment = datetime(2026, 11, 23, 7, 0, tzinfo=timezone(timedelta(hours=1)))
    assert format_recorded_at(moment) == "2026-11-23T06:00:00.000000Z"


def test_unknown_event_types_are_not_encoded():
    with pytest.raises(ValueError):
        encode_entry(position=1, event_id=UUID(int=1), event_type="Nope", aggregate_id=UUID(int=2),
                     aggregate_version=1, recorded_at="2026-01-01T00:00:00.000000Z",
                     payload=events.AccessRevoked(grant_id="G", reason="r", recorded_by="t"))


def test_openapi_document_is_valid_openapi_3_1():
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator

    document = json.loads(msgspec.json.encode(api.openapi("test")))
    assert document["openapi"].startswith("3.1")
    validate(document, cls=OpenAPIV31SpecValidator)


def test_every_operation_has_a_handler_and_a_documented_path():
    document = api.openapi("test")
    for op in api.OPERATIONS:
        assert op.id in HANDLERS, op.id
        if op.page:  # pages are for people, not part of the API document
            assert op.method.lower() not in document["paths"].get(api.openapi_path(op.path), {}), op.id
            continue
        operation = document["paths"][api.openapi_path(op.path)][op.method.lower()]
        assert operation["operationId"] == op.id
        assert operation["description"], f"{op.id} needs a description, not only a summary"
        assert str(op.success) in operation["responses"]
    assert set(HANDLERS) == {op.id for op in api.OPERATIONS}
    ids = [op.id for op in api.OPERATIONS]
    assert len(ids) == len(set(ids))


def test_writes_document_the_idempotency_key():
    document = api.openapi("test")
    for op in api.OPERATIONS:
        if op.response is bodies.Receipt:
            names = {p["name"] for p in document["paths"][op.path][op.method.lower()]["parameters"]}
            assert "Idempotency-Key" in names, op.id


async def test_served_openapi_is_the_generated_document(client):
    r = await client.get("/openapi.json")
    assert r.status == 200 and r.content_type == "application/json"
    served = await r.json()
    assert {(path, method) for path, item in served["paths"].items() for method in item} == {
        (api.openapi_path(op.path), op.method.lower()) for op in api.OPERATIONS if not op.page
    }

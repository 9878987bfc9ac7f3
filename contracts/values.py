"""Value objects shared by events and request bodies."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from msgspec import Meta, Struct

from .codes import ActorKind, ExemptionBasis, ProxyRole, Purpose, RecipientCategory, ToolkitStatus, ValueModel

# Patterns end in `(?!\n)$`, not `$`: msgspec matches with Python's `re`,
# whose `$` also matches before a final newline, so "G1\n" would pass as an
# identifier that prints like "G1".  In JSON Schema (ECMA-262) the lookahead
# is a no-op, so the published schema means the same.
END = r"(?!\n)$"

Identifier = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}" + END,
        description="1-64 characters: letters, digits, '.', '_', ':' or '-', starting with a letter or digit",
    ),
]
Text = Annotated[str, Meta(min_length=1, max_length=2000)]
ShortText = Annotated[str, Meta(min_length=1, max_length=200)]
UtcTime = Annotated[datetime, Meta(tz=True, description="RFC 3339 timestamp with offset")]
Position = Annotated[int, Meta(ge=1, le=2**62)]
# The most NHS numbers one request may carry (a cohort, a filter call): a
# large national release fits; bigger sets are sent in several requests.
MAX_COHORT_SIZE = 5_000_000

Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}" + END, description="SHA-256, 64 lowercase hex digits")]


class Frozen(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Base for every contract struct: immutable, strict about unknown fields,
    and absent optional fields stay absent in the encoding."""


class Actor(Frozen):
    """Who made a patient's choice: the patient or a recognised proxy."""

    kind: ActorKind
    proxy_role: ProxyRole | None = None
    id: ShortText | None = None

    def __post_init__(self) -> None:
        if self.kind == "proxy" and self.proxy_role is None:
            raise ValueError("a proxy actor needs `proxy_role`")
        if self.kind == "patient" and self.proxy_role is not None:
            raise ValueError("`proxy_role` is only for actor kind `proxy`")


class Organisation(Frozen):
    code: Identifier
    name: ShortText
    # What kind of organisation receives the data (absent on grants recorded before it existed).
    category: RecipientCategory | None = None


class PurposeStatement(Frozen):
    code: Purpose
    description: Text
    patient_benefit: Annotated[
        str,
        Meta(max_length=2000, description="the health or care benefit; must not be empty"),
    ]


class Exemption(Frozen):
    """Why a grant may include patients who opted out."""

    basis: ExemptionBasis
    reference: ShortText


def utc(moment: datetime) -> datetime:
    """Normalise an aware datetime to UTC so its encoding is canonical."""
    return moment.astimezone(timezone.utc)


def require_unique(items: list[str], field: str) -> None:
    if len(set(items)) != len(items):
        raise ValueError(f"`{field}` lists the same value more than once")


def _control_characters(value: object) -> bool:
    if isinstance(value, str):
        return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)
    if isinstance(value, Struct):
        return any(_control_characters(getattr(value, f)) for f in value.__struct_fields__)
    return False


def require_plain_text(value: object, field: str) -> None:
    """Texts of a request end up in headers (an exemption's reference), CSV
    rows and patients' histories: refuse control characters (a CR/LF would
    break every line-oriented answer that carries it).  Checked on requests
    only: entries already in the ledger must keep decoding."""
    if _control_characters(value):
        raise ValueError(f"`{field}` must not contain control characters (line breaks, tabs, ...)")


def require_utc_range(moment: datetime, field: str) -> None:
    """A timestamp whose offset pushes it past year 1 or 9999 in UTC cannot be stored."""
    try:
        utc(moment)
    except OverflowError:
        raise ValueError(f"`{field}` is out of range once converted to UTC") from None


__all__ = [
    "END",
    "Actor",
    "Exemption",
    "Frozen",
    "Identifier",
    "Organisation",
    "Position",
    "PurposeStatement",
    "Sha256Hex",
    "ShortText",
    "Text",
    "UtcTime",
    "require_plain_text",
    "require_unique",
    "require_utc_range",
    "utc",
]


class Imported(Frozen):
    """Where an imported choice came from: the earlier register, its own id
    for the record, and when that register says the choice was made (the
    ledger entry's own ``recorded_at`` is the import, never backdated)."""

    source: ShortText
    resource_id: ShortText
    dated: UtcTime | None = None


class Benefit(Frozen):
    """A benefit a grant promises: what will be measured, the target, and when it is due."""

    description: Text
    measure: ShortText
    target: ShortText
    due: UtcTime


class CommercialTerms(Frozen):
    """The terms of a commercial grant: how value returns to the NHS, whether they limit the national
    benefit, and the recipient's assurance."""

    value_model: ValueModel
    limits_national_benefit: bool
    accreditation: ShortText
    security_toolkit: ToolkitStatus


Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$", description="ISO 4217 code, e.g. GBP")]
# Money in the currency's minor unit (pence for GBP), so sums are exact.
MinorUnits = Annotated[int, Meta(ge=1, le=10**15)]

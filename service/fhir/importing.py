"""Reading an earlier register's Consent resources into what the ledger records.

A bundle is checked whole before anything is written: every mistake is
reported with the index of its entry, and one mistake writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec

from contracts.fhir import FhirBundle, FhirConsent, FhirResourceType
from contracts.nhs_number import InvalidNhsNumber, NhsNumber
from contracts.values import Imported
from service.domain.imports import ImportedChoice
from service.fhir.resources import (
    GRANT,
    NATIONAL_OPT_OUT_POLICY,
    NHS_NUMBER,
    TYPE_1_OPT_OUT_POLICY,
)

_SCOPES = {NATIONAL_OPT_OUT_POLICY: "national", TYPE_1_OPT_OUT_POLICY: "type-1"}
_bundle = msgspec.json.Decoder(FhirBundle)
_consent = msgspec.json.Decoder(FhirConsent)
_kind = msgspec.json.Decoder(FhirResourceType)


@dataclass(frozen=True)
class Mistake:
    index: int | None  # the entry (None: the bundle itself)
    path: str
    message: str


class ImportRefused(Exception):
    def __init__(self, mistakes: list[Mistake]):
        super().__init__(f"{len(mistakes)} mistake(s)")
        self.mistakes = mistakes


def consent(raw: bytes, index: int, default_source: str | None) -> ImportedChoice:
    """One Consent resource (JSON); ImportRefused naming what is wrong."""
    where = f"entry[{index}].resource"
    try:
        kind = _kind.decode(raw).resourceType
    except msgspec.DecodeError as exc:
        raise ImportRefused([Mistake(index, where, f"not a FHIR resource: {exc}")]) from None
    if kind != "Consent":
        raise ImportRefused([Mistake(index, f"{where}.resourceType",
                                     f"only Consent resources are imported, not {kind}")])
    try:
        c = _consent.decode(raw)
    except msgspec.DecodeError as exc:
        raise ImportRefused([Mistake(index, where, f"not a valid Consent: {exc}")]) from None
    mistakes = []

    def wrong(path: str, message: str) -> None:
        mistakes.append(Mistake(index, f"{where}.{path}", message))

    if not c.id or len(c.id) > 64:
        wrong("id", "each Consent needs its id (1-64 characters): it names the record in the earlier register")
    if c.status != "active":
        wrong("status", f"only active Consents are imported (this one is {c.status!r})")
    source = (c.meta.source if c.meta else None) or default_source
    if not source or len(source) > 200:
        wrong("meta.source", "say which register this comes from, in meta.source (here or on the Bundle)")
    nhs = None
    ident = c.patient.identifier if c.patient else None
    if ident is None or ident.system != NHS_NUMBER or not ident.value:
        wrong("patient.identifier", f"the patient must be identified by {NHS_NUMBER}")
    else:
        try:
            nhs = NhsNumber(ident.value)
        except InvalidNhsNumber as exc:
            wrong("patient.identifier.value", str(exc))
    dated = None
    if c.dateTime is not None:
        try:
            dated = datetime.fromisoformat(c.dateTime.replace("Z", "+00:00"))
            if dated.tzinfo is None:
                raise ValueError("no offset")
        except ValueError:
            wrong("dateTime", "a dateTime with a time and an offset (e.g. 2021-05-01T09:30:00Z)")
    uris = [p.uri for p in c.policy if p.uri]
    kind_of, scope, grant_id = None, None, None
    if len(uris) != 1:
        wrong("policy", f"exactly one policy.uri: {NATIONAL_OPT_OUT_POLICY}, {TYPE_1_OPT_OUT_POLICY} or "
                        f"{GRANT}<grant_id>")
    elif uris[0] in _SCOPES:
        scope = _SCOPES[uris[0]]
        decision = c.provision.type if c.provision else None
        if decision is None:
            wrong("provision.type", "deny (opted out) or permit (opted back in)")
        kind_of = "opt-out" if decision == "deny" else "opt-in"
    elif uris[0].startswith(GRANT) and len(uris[0]) > len(GRANT):
        grant_id, kind_of = uris[0][len(GRANT):], "consent"
        if not c.provision or c.provision.type != "permit":
            wrong("provision.type", "a study consent is a permit")
    else:
        wrong("policy", f"unknown policy {uris[0]!r}: the import knows the national and type-1 opt-outs "
                        f"and this ledger's grants ({GRANT}<grant_id>)")
    if mistakes:
        raise ImportRefused(mistakes)
    assert nhs is not None and kind_of is not None and source is not None and c.id is not None
    return ImportedChoice(index, nhs, kind_of, scope, grant_id,  # type: ignore[arg-type]
                          Imported(source=source, resource_id=c.id, dated=dated))


def bundle(body: bytes) -> list[ImportedChoice]:
    """Every Consent of a transaction or batch Bundle, or every mistake in it."""
    try:
        b = _bundle.decode(body)
    except msgspec.DecodeError as exc:
        raise ImportRefused([Mistake(None, "$", f"not a transaction or batch Bundle: {exc}")]) from None
    default_source = b.meta.source if b.meta else None
    choices, mistakes, seen = [], [], {}
    for i, entry in enumerate(b.entry):
        if bytes(entry.resource) == b"null":
            mistakes.append(Mistake(i, f"entry[{i}].resource", "each entry needs a resource"))
            continue
        try:
            choice = consent(bytes(entry.resource), i, default_source)
        except ImportRefused as exc:
            mistakes += exc.mistakes
            continue
        key = (choice.imported.source, choice.imported.resource_id)
        if key in seen:
            mistakes.append(Mistake(i, f"entry[{i}].resource.id",
                                    f"the same Consent id as entry[{seen[key]}]: each record once per bundle"))
            continue
        seen[key] = i
        choices.append(choice)
    if mistakes:
        raise ImportRefused(mistakes)
    return choices

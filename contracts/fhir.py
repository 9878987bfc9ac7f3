"""The part of FHIR R4 the service reads: Consent resources imported from an
earlier opt-out register (contracts/FHIR-MAPPING.md, "Import"). Only the
elements the import uses are declared; a resource may carry others."""

from __future__ import annotations

from typing import Literal

from msgspec import Raw, Struct


class FhirIdentifier(Struct, frozen=True):
    system: str | None = None
    value: str | None = None


class FhirReference(Struct, frozen=True):
    reference: str | None = None
    identifier: FhirIdentifier | None = None


class FhirMeta(Struct, frozen=True):
    source: str | None = None


class FhirPolicy(Struct, frozen=True):
    authority: str | None = None
    uri: str | None = None


class FhirProvision(Struct, frozen=True):
    type: Literal["deny", "permit"] | None = None


class FhirConsent(Struct, frozen=True):
    resourceType: Literal["Consent"]
    status: str
    id: str | None = None
    meta: FhirMeta | None = None
    patient: FhirReference | None = None
    dateTime: str | None = None
    policy: list[FhirPolicy] = []
    provision: FhirProvision | None = None


class FhirResourceType(Struct, frozen=True):
    resourceType: str


class FhirEntry(Struct, frozen=True):
    # Each resource is decoded on its own, so a mistake is reported with its entry's index.
    resource: Raw = Raw(b"null")


class FhirBundle(Struct, frozen=True):
    resourceType: Literal["Bundle"]
    type: Literal["transaction", "batch"]
    meta: FhirMeta | None = None
    entry: list[FhirEntry] = []

"""Ledger events: the payloads the hash chain commits to.

Event type names are part of the ledger format: never rename one.  Every
payload records ``recorded_by``, the authenticated system that asked for the
write, so the ledger itself says who did what.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from .codes import (
    AccessMethod,
    ApprovalKind,
    LegalBasis,
    NotificationType,
    OptOutScope,
    OutputKind,
    Purpose,
    ReadKind,
    RecordedChannel,
    Role,
)
from .values import (
    END,
    Actor,
    Benefit,
    CommercialTerms,
    Currency,
    Exemption,
    Frozen,
    Identifier,
    Imported,
    MinorUnits,
    Organisation,
    Position,
    PurposeStatement,
    Sha256Hex,
    ShortText,
    Text,
    UtcTime,
)

NhsDigits = Annotated[str, Meta(pattern=r"^[0-9]{10}" + END, description="canonical NHS number")]
Count = Annotated[int, Meta(ge=0)]


class OptOutRegistered(Frozen):
    nhs_number: NhsDigits
    scope: OptOutScope
    channel: RecordedChannel
    actor: Actor
    recorded_by: ShortText
    imported: Imported | None = None


class OptOutWithdrawn(Frozen):
    nhs_number: NhsDigits
    scope: OptOutScope
    channel: RecordedChannel
    actor: Actor
    recorded_by: ShortText
    imported: Imported | None = None


class StudyConsentGiven(Frozen):
    nhs_number: NhsDigits
    grant_id: Identifier
    actor: Actor
    recorded_by: ShortText
    imported: Imported | None = None


class StudyConsentWithdrawn(Frozen):
    nhs_number: NhsDigits
    grant_id: Identifier
    actor: Actor
    recorded_by: ShortText


class AccessGranted(Frozen):
    grant_id: Identifier
    organisation: Organisation
    purpose: PurposeStatement
    legal_basis: LegalBasis
    datasets: list[Identifier]
    commercial: bool
    exclusive: bool
    valid_from: UtcTime
    valid_until: UtcTime
    approved_by: ShortText
    recorded_by: ShortText
    opt_out_exemption: Exemption | None = None
    # Approvals the policy required when the grant was proposed: it is in force only once each
    # is recorded (GrantApproved). Absent: none (grants recorded before approvals existed).
    requires: list[ApprovalKind] | None = None
    # The proposing organisation, which may not approve its own proposal.
    proposed_by: Identifier | None = None
    # What the grant promises: benefits with measures, targets and due dates; for a commercial
    # grant, the terms on which value returns to the NHS.
    benefits: list[Benefit] | None = None
    commercial_terms: CommercialTerms | None = None


class GrantApproved(Frozen):
    """One party's approval of a proposed grant: which approval, by which organisation, under which reference."""

    grant_id: Identifier
    approval: ApprovalKind
    organisation: Organisation
    reference: ShortText
    recorded_by: ShortText


class OutputRecorded(Frozen):
    """Something a grant produced: a publication (DOI), a product, a trial registration, ...;
    ``benefit``: the index of the promised benefit it delivers, if any."""

    grant_id: Identifier
    kind: OutputKind
    identifier: ShortText
    title: ShortText
    recorded_by: ShortText
    benefit: Annotated[int, Meta(ge=0, le=99)] | None = None


class ValueReceived(Frozen):
    """Value the NHS received under a grant, for one period."""

    grant_id: Identifier
    amount: MinorUnits
    currency: Currency
    period_from: UtcTime
    period_until: UtcTime
    recorded_by: ShortText


class ValueAllocated(Frozen):
    """Received value directed to a named NHS care service (never more than was received)."""

    grant_id: Identifier
    amount: MinorUnits
    currency: Currency
    care_service: ShortText
    recorded_by: ShortText


class SubscriptionRegistered(Frozen):
    """A patient app backend subscribed an endpoint to notifications (never which patients: only how many)."""

    subscription_id: Identifier
    owner: ShortText
    url: Annotated[str, Meta(max_length=2000)]
    events: list[NotificationType]
    recorded_by: ShortText


class SubscriptionChanged(Frozen):
    """A subscription paused, resumed or deleted, or its set of patients replaced (``patients``: how many)."""

    subscription_id: Identifier
    change: Literal["paused", "resumed", "deleted", "patients-replaced"]
    recorded_by: ShortText
    patients: Count | None = None


class AccessRevoked(Frozen):
    grant_id: Identifier
    reason: Text
    recorded_by: ShortText


class CohortCommitment(Frozen):
    """A commitment to who was in a cohort without naming anyone (LEDGER-FORMAT.md §8): the root of the
    bucket tree over the members' salted tags, and how many members it holds."""

    root: Sha256Hex
    size: Count


class DataUseRecorded(Frozen):
    """One release or analysis of data about a cohort of patients.

    ``opt_out_state_position`` is the ledger position whose opt-out state was
    applied; ``opted_out_included`` counts cohort members opted out at that
    position who were nevertheless included, under ``exemption_applied`` or
    their own consent to this grant (``consented_included``).
    """

    use_id: Identifier
    grant_id: Identifier
    organisation_code: Identifier
    purpose: Purpose
    legal_basis: LegalBasis
    datasets: list[Identifier]
    cohort_id: Sha256Hex
    cohort_size: Count
    occurred_at: UtcTime
    access_method: AccessMethod
    opt_out_state_position: Annotated[int, Meta(ge=0)]
    opted_out_included: Count
    consented_included: Count
    recorded_by: ShortText
    exemption_applied: Exemption | None = None
    caller_filter_position: Position | None = None
    # Who was in the cohort, provably to each patient and to no one else (context: §8.2).
    cohort_commitment: CohortCommitment | None = None


class PersonalDataRead(Frozen):
    """Someone read personal data held by the ledger: patients can see who
    looked at their record, and auditors are audited.

    ``recorded_by`` is the reader (the token's subject), ``role`` the role it
    read under.  A read of one patient's data names the patient in
    ``nhs_number`` (entries are private, like every other patient event); a
    bulk read of entries records the position range and count instead, never
    the NHS numbers in it.  ``by_patient`` is true when the token was the
    patient's own (it carried their ``nhs_number``), false for a backend or
    auditor reading on its own authority.
    """

    what: ReadKind
    role: Role
    recorded_by: ShortText
    reader_org: Identifier | None = None
    nhs_number: NhsDigits | None = None
    first_position: Position | None = None
    last_position: Position | None = None
    entries: Count = 0
    by_patient: bool = False
    request_id: ShortText | None = None
    cohort_id: Sha256Hex | None = None


class CohortStored(Frozen):
    """An organisation stored a cohort (``POST /v1/cohorts``).  Only the
    organisations that stored a cohort, or recorded a use of it, may refer
    to it by ``cohort_id``."""

    cohort_id: Sha256Hex
    size: Count
    organisation_code: Identifier
    recorded_by: ShortText
    request_id: ShortText | None = None


class OptOutFilterApplied(Frozen):
    """One call of the opt-out filter: who checked how many patients, under
    which grant, against the opt-out state of which position.

    ``cohort_sha256`` is the SHA-256 of the submitted NHS numbers' 9-digit
    stems as unsigned 32-bit little-endian integers, in the order submitted
    (repeats kept): whoever holds the file can recompute it, and the entry
    names nobody.  ``removed`` counts the numbers taken out."""

    recorded_by: ShortText
    organisation_code: Identifier
    submitted: Count
    removed: Count
    as_of: Annotated[int, Meta(ge=0)]
    cohort_sha256: Sha256Hex
    grant_id: Identifier | None = None
    purpose: Purpose | None = None
    request_id: ShortText | None = None
    # The patients the call removed, committed like a data use's cohort (LEDGER-FORMAT §8.2: context
    # "filter-call:" + call_id), so a patient can prove their choice took them out of this release.
    call_id: Annotated[str, Meta(pattern="^[0-9a-f]{32}$")] | None = None
    removed_commitment: CohortCommitment | None = None


class TransparencySecretCommitted(Frozen):
    """The log's commitment to a patient's transparency secret (contracts/
    LEDGER-FORMAT.md §8): the secret itself never enters the log, only
    ``secret_hash``, which identifies nobody and from which nothing about the
    secret can be learned.  The patient app receives the secret and checks it
    against this entry, so it can compute its own cohort tags without
    trusting the service.  A patient has at most one; it must precede every
    cohort commitment the patient is proved against.
    """

    nhs_number: NhsDigits
    secret_hash: Sha256Hex
    recorded_by: ShortText


Event = (
    OptOutRegistered
    | OptOutWithdrawn
    | StudyConsentGiven
    | StudyConsentWithdrawn
    | AccessGranted
    | AccessRevoked
    | GrantApproved
    | OutputRecorded
    | ValueReceived
    | ValueAllocated
    | DataUseRecorded
    | PersonalDataRead
    | CohortStored
    | OptOutFilterApplied
    | TransparencySecretCommitted
    | SubscriptionRegistered
    | SubscriptionChanged
)

EVENT_TYPES: dict[str, type[Frozen]] = {
    cls.__name__: cls
    for cls in (
        OptOutRegistered,
        OptOutWithdrawn,
        StudyConsentGiven,
        StudyConsentWithdrawn,
        AccessGranted,
        AccessRevoked,
        GrantApproved,
        OutputRecorded,
        ValueReceived,
        ValueAllocated,
        DataUseRecorded,
        PersonalDataRead,
        CohortStored,
        OptOutFilterApplied,
        TransparencySecretCommitted,
        SubscriptionRegistered,
        SubscriptionChanged,
    )
}

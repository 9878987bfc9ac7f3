"""Request and response bodies of the HTTP API (see docs in API.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

from .codes import (
    AccessMethod,
    ApprovalKind,
    Channel,
    LegalBasis,
    NotificationType,
    OptOutScope,
    OutputKind,
    Purpose,
)
from .cohort_commitment import CohortProof
from .entry import Entry
from .events import AccessGranted, Count
from .nhs_number import NhsNumber
from .values import (
    MAX_COHORT_SIZE,
    Actor,
    Benefit,
    CommercialTerms,
    Currency,
    Exemption,
    Frozen,
    Identifier,
    MinorUnits,
    Organisation,
    Position,
    PurposeStatement,
    Sha256Hex,
    ShortText,
    Text,
    UtcTime,
    require_plain_text,
    require_unique,
    require_utc_range,
)

Datasets = Annotated[list[Identifier], Meta(min_length=1, max_length=200)]


# --- requests ---------------------------------------------------------------


class ChoiceRequest(Frozen):
    """Body of opt-out and opt-in."""

    scope: OptOutScope
    channel: Channel
    actor: Actor

    def __post_init__(self) -> None:
        require_plain_text(self.actor, "actor")


class ConsentRequest(Frozen):
    grant_id: Identifier
    actor: Actor

    def __post_init__(self) -> None:
        require_plain_text(self.actor, "actor")


class ConsentWithdrawal(Frozen):
    """Optional body of a consent withdrawal: who acts (default: the patient)."""

    actor: Actor

    def __post_init__(self) -> None:
        require_plain_text(self.actor, "actor")


class GrantRequest(Frozen):
    grant_id: Identifier
    organisation: Organisation
    purpose: PurposeStatement
    legal_basis: LegalBasis
    datasets: Datasets
    commercial: bool
    exclusive: bool
    valid_from: UtcTime
    valid_until: UtcTime
    approved_by: ShortText
    opt_out_exemption: Exemption | None = None
    benefits: Annotated[list[Benefit], Meta(max_length=10)] | None = None
    commercial_terms: CommercialTerms | None = None

    def __post_init__(self) -> None:
        require_unique(self.datasets, "datasets")
        require_plain_text(self.benefits, "benefits")
        require_plain_text(self.commercial_terms, "commercial_terms")
        require_plain_text(self.organisation, "organisation")
        require_plain_text(self.purpose, "purpose")
        require_plain_text(self.approved_by, "approved_by")
        require_plain_text(self.opt_out_exemption, "opt_out_exemption")
        require_utc_range(self.valid_from, "valid_from")
        require_utc_range(self.valid_until, "valid_until")


class ApprovalRequest(Frozen):
    """One party's approval of a proposed grant; the organisation is the token's `org` claim."""

    approval: ApprovalKind
    reference: ShortText  # the committee's own reference, e.g. "21/CAG/0042" or "REC 22/NE/0123"
    organisation_name: ShortText  # the approving organisation's name, as the register shows it

    def __post_init__(self) -> None:
        require_plain_text(self.reference, "reference")
        require_plain_text(self.organisation_name, "organisation_name")


class GrantApproval(Struct, frozen=True, kw_only=True):
    approval: ApprovalKind
    organisation: Organisation
    reference: str
    position: int


class OutputRequest(Frozen):
    """Something the grant produced; ``benefit``: the index (from 0) of the promised benefit it delivers."""

    kind: OutputKind
    identifier: ShortText  # a DOI, product name, trial registration number, ...
    title: ShortText
    benefit: Annotated[int, Meta(ge=0, le=99)] | None = None

    def __post_init__(self) -> None:
        require_plain_text(self.identifier, "identifier")
        require_plain_text(self.title, "title")


class ValueRequest(Frozen):
    """Value received under a grant for one period, in the currency's minor unit (pence for GBP)."""

    amount: MinorUnits
    currency: Currency
    period_from: UtcTime
    period_until: UtcTime

    def __post_init__(self) -> None:
        require_utc_range(self.period_from, "period_from")
        require_utc_range(self.period_until, "period_until")


class AllocationRequest(Frozen):
    """Received value directed to a named NHS care service."""

    amount: MinorUnits
    currency: Currency
    care_service: ShortText

    def __post_init__(self) -> None:
        require_plain_text(self.care_service, "care_service")


class BenefitStatus(Struct, frozen=True, kw_only=True):
    """A promised benefit against what was delivered: ``delivered_by`` lists the outputs that deliver it;
    ``overdue``: due, and nothing delivers it."""

    description: str
    measure: str
    target: str
    due: str
    delivered_by: list[str]
    overdue: bool


class OutputView(Struct, frozen=True, kw_only=True):
    kind: OutputKind
    identifier: str
    title: str
    benefit: int | None
    position: int


class Allocation(Struct, frozen=True, kw_only=True):
    care_service: str
    amount: int
    position: int


class ValueView(Struct, frozen=True, kw_only=True):
    """Value received under a grant and where it went, in one currency (minor units)."""

    currency: str
    received: int
    allocated: int
    allocations: list[Allocation]


class RevokeRequest(Frozen):
    reason: Text

    def __post_init__(self) -> None:
        require_plain_text(self.reason, "reason")


class DataUseRequest(Frozen):
    use_id: Identifier
    grant_id: Identifier
    purpose: Purpose
    datasets: Datasets
    occurred_at: UtcTime
    access_method: AccessMethod
    cohort_id: Sha256Hex | None = None
    nhs_numbers: Annotated[list[NhsNumber], Meta(max_length=MAX_COHORT_SIZE)] | None = None
    opt_out_state_position: Position | None = None

    def __post_init__(self) -> None:
        require_unique(self.datasets, "datasets")
        require_utc_range(self.occurred_at, "occurred_at")
        if (self.cohort_id is None) == (self.nhs_numbers is None):
            raise ValueError("give exactly one of `cohort_id` or `nhs_numbers`")
        if self.nhs_numbers is not None and not self.nhs_numbers:
            raise ValueError("`nhs_numbers` must not be empty")


class ReadSessionRequest(Frozen):
    """An auditor's run over a range of entries (``consent-ledger verify`` or
    ``export``): recorded as one read before the first page is served."""

    first_position: Position
    last_position: Position

    def __post_init__(self) -> None:
        if self.last_position < self.first_position:
            raise ValueError("`last_position` must not be before `first_position`")


# --- responses --------------------------------------------------------------


class Receipt(Struct, frozen=True, kw_only=True):
    """Proof of a write: where it sits in the ledger and the hashes over it."""

    position: int
    event_id: str
    event_type: str
    recorded_at: str
    leaf_hash: str
    chain_hash: str


class ScopeChoice(Struct, frozen=True, kw_only=True):
    state: Literal["opted-out", "opted-in", "not-recorded"]
    since: str | None = None
    position: int | None = None


class ConsentState(Struct, frozen=True, kw_only=True):
    grant_id: str
    given_at: str
    position: int


class Choices(Struct, frozen=True, kw_only=True):
    nhs_number: str
    as_of: int
    scopes: dict[str, ScopeChoice]
    consents: list[ConsentState]


class GrantView(Struct, frozen=True, kw_only=True):
    grant: AccessGranted
    status: Literal["active", "proposed", "revoked", "expired", "not-yet-valid"]
    approvals: list[GrantApproval] = field(default_factory=list)
    pending: list[ApprovalKind] = field(default_factory=list)  # required approvals not yet recorded
    position: int
    revoked_at: str | None = None
    revoke_reason: str | None = None
    as_of: int


class Cohort(Struct, frozen=True, kw_only=True):
    cohort_id: str
    size: Count


class FilterRequest(Frozen):
    nhs_numbers: Annotated[list[str], Meta(max_length=MAX_COHORT_SIZE)]


class FilterResult(Struct, frozen=True, kw_only=True):
    """The numbers that may be used, in input order, and the state applied.

    ``exemption`` is set when the grant records an opt-out exemption: then
    nobody is removed, and this says why."""

    nhs_numbers: list[str]
    as_of: int
    removed: Count
    checkpoint: int
    consented_kept: Count = 0
    exemption: Exemption | None = None


class Labelled(Struct, frozen=True, kw_only=True):
    """A code with the plain words a patient or member of the public reads."""

    code: str
    label: str


class HistoryItem(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of a patient's "who used my data" history."""

    position: int
    recorded_at: str
    kind: Literal["choice", "consent", "data-use", "access"]
    summary: str
    event_type: str
    scope: Labelled | None = None
    channel: str | None = None
    actor: str | None = None
    grant_id: str | None = None
    organisation: Organisation | None = None
    purpose: Labelled | None = None
    purpose_description: str | None = None
    legal_basis: Labelled | None = None
    datasets: list[str] | None = None
    access_method: Labelled | None = None
    occurred_at: str | None = None
    opt_out: str | None = None
    exemption: Labelled | None = None
    consent_applied: bool | None = None


class HistoryPage(Struct, frozen=True, kw_only=True):
    nhs_number: str
    as_of: int
    items: list[HistoryItem]
    next_cursor: str | None


class RegisterEntry(Struct, frozen=True, kw_only=True):
    """One grant in the public data uses register (no personal data)."""

    grant_id: str
    organisation: Organisation
    purpose: Labelled
    purpose_description: str
    patient_benefit: str
    legal_basis: Labelled
    datasets: list[str]
    commercial: bool
    valid_from: str
    valid_until: str
    status: str
    revoked_at: str | None
    uses: int
    # Counts of patients, suppressed (contracts/disclosure.py): null means fewer than 10.
    patients_covered: int | None
    opt_outs_applied: bool
    opt_out_exemption: Labelled | None
    opted_out_included: int | None
    # The entries the row rests on: the grant and, once revoked, its revocation.
    position: int = 0
    revoked_position: int | None = None
    approvals: list[GrantApproval] = field(default_factory=list)
    pending: list[ApprovalKind] = field(default_factory=list)
    # Promised against delivered.
    benefits: list[BenefitStatus] = field(default_factory=list)
    commercial_terms: CommercialTerms | None = None
    outputs: list[OutputView] = field(default_factory=list)
    value: list[ValueView] = field(default_factory=list)


class RegisteredUse(Struct, frozen=True, kw_only=True):
    """One data use under a grant, as the public sees it (patient counts suppressed)."""

    position: int
    use_id: str
    purpose: Labelled
    datasets: list[str]
    access_method: Labelled
    occurred_at: str
    recorded_at: str
    opt_out_state_position: int
    patients: int | None
    opted_out_included: int | None
    exemption: Labelled | None


class Register(Struct, frozen=True, kw_only=True):
    as_of: int
    grants: list[RegisterEntry]


class EventView(Entry, frozen=True, kw_only=True):
    """A ledger entry (the fields its leaf hash covers) with its hashes."""

    leaf_hash: str
    chain_hash: str


class EventsPage(Struct, frozen=True, kw_only=True):
    events: list[EventView]
    next_after: int | None


class ProblemDetail(Struct, frozen=True, kw_only=True):
    path: str
    message: str


class Problem(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[ProblemDetail] | None = None


class ReplicaHealth(Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str  # host:port/database
    in_rotation: bool
    lag: int | None = None  # entries behind the primary at the last check
    problem: str | None = None


class Health(Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: Literal["ok", "unavailable"]
    position: int | None = None
    detail: str | None = None
    replicas: list[ReplicaHealth] | None = None
    # Whether this process holds the writer lease (projections, checkpoints, witnesses, notifications).
    writer: bool | None = None


__all__ = [
    "ChoiceRequest",
    "Choices",
    "Cohort",
    "ConsentRequest",
    "ConsentState",
    "ConsentWithdrawal",
    "DataUseRequest",
    "EventView",
    "FilterRequest",
    "FilterResult",
    "HistoryItem",
    "HistoryPage",
    "Labelled",
    "Register",
    "RegisterEntry",
    "EventsPage",
    "GrantRequest",
    "GrantView",
    "Health",
    "Problem",
    "ProblemDetail",
    "Receipt",
    "RevokeRequest",
    "ScopeChoice",
]


# --- transparency: proofs and keys ----------------------------------------------


class InclusionProof(Struct, frozen=True, kw_only=True):
    """RFC 9162 inclusion proof of the leaf at `leaf_index` (= position - 1)."""

    leaf_index: int
    tree_size: int
    hashes: list[str]


class ConsistencyProof(Struct, frozen=True, kw_only=True, rename={"from_size": "from", "to_size": "to"}):
    from_size: int
    to_size: int
    hashes: list[str]


# How long a read session covers the pages of its range: longer than any
# verify of a national log, short enough that it is not a standing licence.
READ_SESSION_SECONDS = 24 * 3600


class ReadSession(Struct, frozen=True, kw_only=True):
    """A recorded read of entries ``first_position``..``last_position``.

    ``session`` is the ledger position of its ``PersonalDataRead`` entry:
    send it as the ``Ledger-Read-Session`` header on the pages of that range
    (events, entry bundles) until ``expires_at``, and they are served without
    recording each page again."""

    session: int
    first_position: int
    last_position: int
    expires_at: str


class TokenInfo(Struct, frozen=True, kw_only=True):
    """Who the bearer token says the caller is (its claims, as this service accepts them)."""

    subject: str
    roles: list[str]
    org: str | None = None
    patient_scoped: bool = False  # the token carries an `nhs_number` claim (not echoed)


class LogKeys(Struct, frozen=True, kw_only=True):
    """The checkpoint origin and the signed-note verifier keys (vkeys) that sign it."""

    origin: str
    keys: list[str]


class CohortReceipt(Struct, frozen=True, kw_only=True):
    """This patient's proof against a data use's cohort commitment (LEDGER-FORMAT.md §8).

    The app checks, with its own code: ``secret_hash`` is SHA-256 of the secret (§8.1) and is the
    patient's TransparencySecretCommitted at ``secret_position`` (prove it with that receipt); the tag
    of ``secret`` under ``context`` (§8.2); ``proof`` against the entry's ``cohort_commitment`` (§8.4):
    then ``member`` is what the proof shows. ``provable`` is false when the secret was committed only
    after the use: such a proof cannot be relied on (the operator could have chosen the secret)."""

    context: str
    size: int
    root: str
    tag: str
    member: bool
    proof: CohortProof
    secret: str
    secret_hash: str
    secret_position: int
    provable: bool


class ReceiptProof(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A ledger entry about the patient, its inclusion proof and the signed checkpoint it leads to;
    for a data use, also the patient's membership (or absence) proof against its cohort commitment."""

    event: EventView
    entry: str
    leaf_hash: str
    proof: InclusionProof
    checkpoint: str
    cohort: CohortReceipt | None = None


class ChoiceCount(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Opt-outs and opt-ins of one scope recorded in one period, or through one channel.

    Counts are of patients' choices, so they are suppressed
    (contracts/disclosure.py): ``None`` means fewer than 10."""

    scope: OptOutScope
    opt_outs: int | None
    opt_ins: int | None
    period: str | None = None
    channel: str | None = None


class MonthlyChoices(Struct, frozen=True, kw_only=True):
    """Opt-outs and opt-ins of one scope through one channel in one calendar month (UTC); suppressed."""

    month: str
    scope: OptOutScope
    channel: str
    opt_outs: int | None
    opt_ins: int | None


class GrantUses(Struct, frozen=True, kw_only=True):
    grant_id: str
    organisation: Organisation
    purpose: Labelled
    commercial: bool
    uses: int


class DatasetAccess(Struct, frozen=True, kw_only=True):
    """How concentrated access to one dataset is: a check for exclusivity in practice."""

    dataset: str
    organisations: int
    grants: int
    uses: int
    largest_organisation: str | None  # the organisation with the most uses of it
    largest_organisation_uses: int


class ValueTotal(Struct, frozen=True, kw_only=True):
    """Value received under all grants, and how much of it was allocated to care services (minor units)."""

    currency: str
    received: int
    allocated: int


class PurposeCount(Struct, frozen=True, kw_only=True):
    purpose: Labelled
    uses: int
    grants: int


class CommercialShare(Struct, frozen=True, kw_only=True):
    grants: int
    commercial_grants: int
    uses: int
    commercial_uses: int


class Statistics(Struct, frozen=True, kw_only=True):
    """Public figures about choices and uses; no count of patients below 10 is shown."""

    as_of: int
    period: Literal["day", "month"]
    choices_over_time: list[ChoiceCount]
    choices_by_channel: list[ChoiceCount]
    choices_by_month: list[MonthlyChoices]
    opted_out_now: dict[str, int | None]
    uses_by_purpose: list[PurposeCount]
    uses_by_grant: list[GrantUses]
    datasets: list[DatasetAccess]
    commercial: CommercialShare
    value: list[ValueTotal]


class PublicEntry(Struct, frozen=True, kw_only=True):
    """An entry with no personal data, its exact bytes and its inclusion proof."""

    position: int
    event_type: str
    entry: str
    leaf_hash: str
    proof: list[str]


class PublicEntries(Struct, frozen=True, kw_only=True):
    """Public entries after ``after`` (position order), each proved against the tree of ``tree_size``.

    ``withheld``: entries of public types in the same range left out because they record a use of
    fewer than 10 patients; ``next_after``: ask again from there (null at the end)."""

    tree_size: int
    entries: list[PublicEntry]
    withheld: int
    next_after: int | None



class SubscriptionRequest(Frozen):
    """Where to send which notifications; the endpoint must be https (or http) on a public address."""

    url: Annotated[str, Meta(max_length=2000, pattern="^https?://\\S+$")]
    events: Annotated[list[NotificationType], Meta(min_length=1, max_length=5)]
    description: ShortText

    def __post_init__(self) -> None:
        require_unique(list(self.events), "events")
        require_plain_text(self.description, "description")
        require_plain_text(self.url, "url")


class Subscription(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A subscription as its owner sees it; ``secret`` only in the answer that created it."""

    id: str
    url: str
    events: list[NotificationType]
    description: str
    status: Literal["active", "paused", "failing", "deleted"]
    patients: int
    created_at: str
    position: int  # the ledger position from which it is notified
    pending: int  # notifications not yet delivered
    secret: str | None = None


class Subscriptions(Struct, frozen=True, kw_only=True):
    subscriptions: list[Subscription]


class Delivery(Struct, frozen=True, kw_only=True):
    """One notification and what happened to it."""

    seq: int
    webhook_id: str
    type: NotificationType
    position: int
    attempts: int
    delivered_at: str | None
    next_attempt_at: str | None
    last_status: int | None
    last_error: str | None


class Deliveries(Struct, frozen=True, kw_only=True):
    deliveries: list[Delivery]
    next_after: int | None


class FeedItem(Struct, frozen=True, kw_only=True):
    seq: int
    webhook_id: str
    type: NotificationType
    position: int
    body: dict[str, Any]


class Feed(Struct, frozen=True, kw_only=True):
    """The same notifications as the webhooks, for backends that cannot receive them; page with ``next_after``."""

    events: list[FeedItem]
    next_after: int | None

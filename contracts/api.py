"""The HTTP operations: path, method, roles, bodies and limits.

This table is the single source for routing, authorisation and the OpenAPI
document, so an endpoint cannot exist without a role rule and a schema.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from . import bodies
from .codes import Purpose, values
from .decision import RECORDED_STATUSES
from .nhs_number import SCHEMA as NHS_NUMBER_SCHEMA
from .nhs_number import NhsNumber
from .values import (
    END,
    MAX_COHORT_SIZE,  # part of this module's limits, see README
)

PUBLIC: frozenset[str] = frozenset()
PATIENT_APP = frozenset({"patient-app"})
DAC = frozenset({"dac"})
SDE = frozenset({"sde"})
AUDITOR = frozenset({"auditor"})
ROLES = ("patient-app", "dac", "sde", "auditor", "cag", "ethics-committee", "lay-panel", "board")
# Who records approvals of a proposed grant (contracts/codes.py APPROVER_ROLES says which kind each records).
APPROVERS = frozenset({"dac", "cag", "ethics-committee", "lay-panel", "board"})

KIB = 1024
MIB = 1024 * KIB
SMALL_BODY = 64 * KIB
BULK_BODY = 64 * MIB


class Operation(NamedTuple):
    id: str
    method: str
    path: str
    summary: str
    roles: frozenset[str]
    request: type | None = None
    response: type | None = None
    success: int = 200
    body_limit: int = SMALL_BODY
    query: tuple[tuple[str, dict[str, Any], bool], ...] = ()
    # Media type of the success body, when it is not a JSON Struct.
    media_type: str = "application/json"
    # 404 is also possible without path parameters (e.g. a proof for a tree not yet that large).
    may_be_missing: bool = False
    # Bulk NHS-number bodies: also text/plain and MESH .dat, answered in kind.
    bulk: bool = False
    # Other media types the success body may come in (e.g. CSV), as strings.
    also_as: tuple[str, ...] = ()
    # Acts for the caller's organisation: an `sde` token needs an `org` claim.
    org_scoped: bool = False
    # The request body may be left out (a DELETE that may say who acts).
    body_optional: bool = False
    # Answered only once a ledger event records who read what (Ledger-Read-Recorded).
    recorded: bool = False
    # Longer text for the OpenAPI `description` (behaviour a caller must know).
    description: str = ""
    # Pages of entries an auditor may read under a read session (header Ledger-Read-Session).
    session_pages: bool = False
    # A FHIR R4 interaction: errors are OperationOutcome resources (application/fhir+json).
    fhir: bool = False
    # A page for people (text/html, errors as pages too); not part of the API document.
    page: bool = False
    # For a patient app's backend only: a token that acts for one patient (`nhs_number` claim) is 403.
    backend_only: bool = False


_REPEATS = (
    "Sending the same request again is safe: if the same {what} is already recorded the answer is 200 with "
    "its existing receipt, whether or not an Idempotency-Key was sent. "
)
_after = ("after", {"type": "integer", "minimum": 0}, False)
STATISTICS_TABLES = ("choices", "uses-by-grant", "uses-by-purpose", "datasets", "value")
FHIR_JSON = "application/fhir+json"
HTML = "text/html"
_fhir_patient = ("patient", {"type": "string", "minLength": 1, "maxLength": 64,
                             "description": "NHS number, bare or as https://fhir.nhs.uk/Id/nhs-number|NNNNNNNNNN"},
                 True)
_limit = ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, False)

OPERATIONS: tuple[Operation, ...] = (
    Operation("opt_out", "POST", "/v1/patients/{nhs}/opt-out",
              "Register an opt-out for the patient (201), or return the receipt of the one in force (200)",
              PATIENT_APP, bodies.ChoiceRequest, bodies.Receipt, 201,
              description=_REPEATS.format(what="choice (that scope, opted out)")),
    Operation("opt_in", "POST", "/v1/patients/{nhs}/opt-in",
              "Withdraw an opt-out of that scope (201), or return the receipt of the choice in force (200)",
              PATIENT_APP, bodies.ChoiceRequest, bodies.Receipt, 201,
              description=(
              'Records an OptOutWithdrawn entry for the scope (`national` or `type-1`) when the patient is opted '
              'out; if they are not, nothing is written and the answer is 200 with the receipt of the choice in '
              'force. `channel` says how the choice reached the ledger and `actor` whether the patient or a proxy '
              '(with their role) acted. A patient-app token with an `nhs_number` claim may act only for that '
              'patient.')),
    Operation("give_consent", "POST", "/v1/patients/{nhs}/consents",
              "Record the patient's explicit consent to one approved project (grant)",
              PATIENT_APP, bodies.ConsentRequest, bodies.Receipt, 201,
              description=(
              'The grant must exist and be in force. Consent lets a grant keep the patient even while they are '
              'opted out, and is what an `explicit-consent` grant requires. Giving a consent already in force is '
              '200 with its receipt.')),
    Operation("withdraw_consent", "DELETE", "/v1/patients/{nhs}/consents/{grant_id}",
              "Withdraw the patient's consent to a project; the optional body says who acts (default: the patient)",
              PATIENT_APP, bodies.ConsentWithdrawal, bodies.Receipt, 201, body_optional=True,
              description=(
              "Records StudyConsentWithdrawn; data uses under that grant that occur afterwards may no longer "
              "include the patient on the strength of the consent. 404 if the patient never consented to that "
              "grant; withdrawing again is 200 with the earlier receipt. Honours Idempotency-Key like every write.")),
    Operation("get_choices", "GET", "/v1/patients/{nhs}/choices",
              "The patient's current choice per scope and consents, with the position they reflect",
              PATIENT_APP, None, bodies.Choices,
              description=(
              'The state of each opt-out scope (`opted-out`, `opted-in` or `not-recorded`, with when and at which '
              'position) and the study consents in force. `as_of` is the ledger position the answer reflects. The '
              'read itself is recorded (Ledger-Read-Recorded names its entry), so the patient can see who looked.')),
    Operation("create_grant", "POST", "/v1/grants",
              "Record a data access committee's grant of access",
              DAC, bodies.GrantRequest, bodies.Receipt, 201,
              description=(
              'A grant names the organisation, purpose (code, description, patient benefit), legal basis, datasets,'
              ' validity window and any opt-out exemption with its reference. It is in force from `valid_from` to '
              '`valid_until` unless revoked. A `grant_id` is used once: a different grant under the same id is 409.'
              ' The grant appears in the public register at once.')),
    Operation("approve_grant", "POST", "/v1/grants/{grant_id}/approvals",
              "Record one party's approval of a proposed grant (201), or return the receipt of the same approval (200)",
              APPROVERS, bodies.ApprovalRequest, bodies.Receipt, 201, org_scoped=True,
              description=(
              "A grant whose policy requires approvals (CONSENT_LEDGER_APPROVALS; the approvals it needs are "
              "written into its AccessGranted entry as `requires`) is `proposed` until each is recorded: then "
              "it is in force (within its validity) from the position of the last one. Each approval kind is "
              "recorded by one role: `dac-decision` by `dac`, `cag` by `cag`, `ethics` by `ethics-committee`, "
              "`lay-panel` by `lay-panel`, `board-fairness` by `board` (else 403), by an organisation (the "
              "token's `org` claim) that neither proposed the grant nor recorded another of its approvals (403). "
              "An approval the grant does not need, or of a revoked grant, is 422; the same kind again by another "
              "party is 409; the same approval sent again is 200 with its receipt.")),
    Operation("revoke_grant", "POST", "/v1/grants/{grant_id}/revoke",
              "Revoke a grant; data uses under it are refused from this position on",
              DAC, bodies.RevokeRequest, bodies.Receipt, 201,
              description=(
              'Records AccessRevoked with the reason. From that position on, the filter refuses the grant (422) and'
              ' data uses under it are refused; uses recorded earlier stay in the ledger. Revoking a revoked grant '
              'is 200 with the earlier receipt.')),
    Operation("record_output", "POST", "/v1/grants/{grant_id}/outputs",
              "Record something a grant produced (a publication, a product, a trial registration, ...)",
              DAC, bodies.OutputRequest, bodies.Receipt, 201,
              description=(
              "`benefit` names (by index, from 0) the promised benefit the output delivers: the register then "
              "shows that benefit as delivered, and a promised benefit past its due date with no output is "
              "flagged overdue. The same output (kind and identifier) twice is 409; an unknown benefit index 422.")),
    Operation("receive_value", "POST", "/v1/grants/{grant_id}/value",
              "Record value the NHS received under a grant for a period (amount in the currency's minor unit)",
              DAC, bodies.ValueRequest, bodies.Receipt, 201,
              description=(
              "Amounts are whole minor units (pence for GBP) so that totals are exact. The register and "
              "/v1/statistics show what each grant returned, against what its commercial terms promised.")),
    Operation("allocate_value", "POST", "/v1/grants/{grant_id}/allocations",
              "Direct received value to a named NHS care service",
              DAC, bodies.AllocationRequest, bodies.Receipt, 201,
              description=(
              "Never more than was received under the grant in that currency (422 "
              "`allocation-exceeds-value`, saying how much is left).")),
    Operation("get_grant", "GET", "/v1/grants/{grant_id}",
              "A grant and its status (SDE callers see only their own organisation's grants)",
              DAC | SDE | AUDITOR, None, bodies.GrantView,
              description=(
              'The grant as recorded, its status now (`active`, `revoked`, `expired`, `not-yet-valid`), its '
              'position and, when revoked, when and why. `dac` and `auditor` tokens read any grant; an `sde` token '
              'reads only grants of its own organisation (`org` claim), else 403.')),
    Operation("record_data_use", "POST", "/v1/data-uses",
              "Record a use of patients' data under a grant; refused unless every member may be included under "
              "the grant when the use occurred (opt-outs, consents, exemption)",
              SDE, bodies.DataUseRequest, bodies.Receipt, 201, BULK_BODY, org_scoped=True,
              description=_REPEATS.format(what="data use (same `use_id` and the same grant, purpose, datasets, "
                                                 "cohort, `occurred_at`, access method and "
                                                 "`opt_out_state_position`)")
              + "A `use_id` already recorded with any of those different is 409 `already-exists`, naming them: "
                "a use_id names one release, so a different release needs its own."),
    Operation("create_cohort", "POST", "/v1/cohorts",
              "Store a cohort once, content-addressed (JSON array, text/plain or MESH .dat of NHS numbers); "
              "the ledger records that the caller's organisation stored it",
              SDE, None, bodies.Cohort, 201, BULK_BODY, bulk=True, org_scoped=True,
              description=(
              'The body is the set of NHS numbers (every check digit is checked; an error lists each bad line). The'
              ' cohort is stored once, sorted and de-duplicated; its id is the SHA-256 of its canonical list, so '
              'the same set always has the same id. A data use can then name the cohort by id instead of sending '
              'millions of numbers again.')),
    Operation("get_cohort", "GET", "/v1/cohorts/{cohort_id}",
              "A stored cohort's canonical list (one 10-digit NHS number per line, sorted; its SHA-256 is the "
              "cohort_id), for auditors re-checking data uses; the read is recorded",
              AUDITOR, None, None, media_type="text/plain", recorded=True,
              description=(
              'Only auditors may read members: the answer lists NHS numbers, so the read is recorded first (Ledger-'
              "Read-Recorded) and appears in each member's history as a read by someone else. Hashing the body with"
              ' SHA-256 gives the cohort id back.')),
    Operation("opt_out_filter", "POST", "/v1/opt-out-filter",
              "The NHS numbers that may be used under a grant of the caller's organisation (or with opt-outs "
              "alone), in input order (JSON, text/plain or MESH .dat, answered in kind); every call is recorded",
              SDE, bodies.FilterRequest, bodies.FilterResult, 200, BULK_BODY,
              query=(("purpose", {"type": "string", "enum": list(values(Purpose)),
                                  "description": "checked against the grant's purpose (needs grant_id)"}, False),
                     ("grant_id", {"type": "string"}, False),
                     ("min_position", {"type": "integer", "minimum": 0}, False)), bulk=True,
              also_as=("text/plain", "application/vnd.nhs.mesh.dat"), org_scoped=True, recorded=True,
              description=(
              'Send the candidate cohort; the answer keeps the order of the input and leaves out everyone who may '
              "not be used: with `grant_id`, under that grant's terms (consents kept, `explicit-consent` keeps only"
              ' consenters, an exemption keeps everyone and `Ledger-Exemption` says why); without it, opt-outs '
              'alone apply. `as_of` is the position the decision reflects and `removed` how many were left out; '
              '`min_position` waits (bounded) until the filter reflects that position, for read-your-writes. Every '
              'call is recorded as an OptOutFilterApplied entry whose position comes back in Ledger-Read-Recorded, '
              'and `consent-ledger verify --decisions` re-derives each decision from the log.')),
    Operation("get_history", "GET", "/v1/patients/{nhs}/history",
              "Who used my data: choice changes and data uses that included the patient, newest first",
              PATIENT_APP, None, bodies.HistoryPage,
              query=(("cursor", {"type": "string"}, False), _limit),
              description=(
              'Each item says in plain words what happened: an opt-out or opt-in (with channel and who acted), a '
              'consent given or withdrawn, a data use that included the patient (organisation, purpose, legal '
              'basis, datasets, access method, whether an opt-out was set aside and why) and a recorded read of the'
              " patient's data by someone else. Pages of up to `limit` items; follow `next_cursor` for older ones. "
              'The read is recorded.')),
    Operation("get_register", "GET", "/v1/register",
              "The public data uses register: one row per grant, no personal data (JSON, or CSV)",
              PUBLIC, None, bodies.Register,
              query=(("format", {"type": "string", "enum": ["json", "csv"]}, False),), also_as=("text/csv",),
              description=(
              'One row per grant: organisation, purpose and its description, patient benefit, legal basis, '
              'datasets, commercial or not, validity, status, number of uses, patients covered, whether opt-outs '
              'apply and any exemption. `format=csv` (or `Accept: text/csv`) gives the same rows as CSV with a '
              'Ledger-As-Of header. No token needed.')),
    Operation("get_statistics", "GET", "/v1/statistics",
              "Public statistics: choices per scope, channel and month, uses per grant and purpose, the commercial "
              "share and how concentrated access to each dataset is; counts of patients suppressed",
              PUBLIC, None, bodies.Statistics,
              query=(("format", {"type": "string", "enum": ["json", "csv"]}, False),
                     ("table", {"type": "string", "enum": list(STATISTICS_TABLES)}, False)),
              also_as=("text/csv",),
              description=(
              "Every count of patients follows contracts/disclosure.py: a count from 1 to 9 is never published "
              "(null in JSON, `<10` in CSV) and any other is rounded to the nearest 5, each cell on its own count "
              "(never derived from other suppressed cells). So no published figure is an exact count of patients, "
              "and two queries either side of one patient's choice differ in a cell by 0 or 5, never by 1. Counts "
              "of grants and uses are exact. `datasets` gives, per dataset, how many organisations and grants may "
              "use it and how many of its uses the organisation with the most took (a check for exclusivity in "
              "practice). Figures are computed at most once a minute. CSV (`format=csv` or Accept: text/csv) "
              "gives one `table` (default `choices`: per month, scope and channel).")),
    Operation("list_events", "GET", "/v1/events",
              "Ledger entries in position order", AUDITOR, None, bodies.EventsPage,
              query=(_after, _limit), session_pages=True,
              description=(
              'Entries after position `after` (default 0), up to `limit` per page, each with its payload, leaf hash'
              ' and chain hash; follow `next_after` for the next page. Each page is recorded as a read unless a '
              'read session (`Ledger-Read-Session`) covers it.')),
    Operation("list_public_entries", "GET", "/v1/public-entries",
              "Entries without personal data (grants, revocations, data uses), each with its exact bytes and "
              "inclusion proof, so anyone can check the register against the log",
              PUBLIC, None, bodies.PublicEntries,
              query=(_after, _limit, ("tree_size", {"type": "integer", "minimum": 1}, False)), may_be_missing=True,
              description=(
              "AccessGranted, AccessRevoked and DataUseRecorded entries after position `after`, in position order, "
              "up to `limit` of them scanned per page; each with `entry` (its exact bytes: SHA-256(0x00 || entry) "
              "is `leaf_hash`) and an RFC 9162 inclusion proof against the tree of `tree_size` entries (default: "
              "the latest signed checkpoint; pass that checkpoint's size to keep every page provable against it). "
              "A data use of fewer than 10 patients is withheld (counted in `withheld`): its cohort id could "
              "identify them. `consent-ledger verify-register` rebuilds the register from these entries. 404 while "
              "the log is smaller than `tree_size`.")),
    Operation("get_event", "GET", "/v1/events/{position}", "One ledger entry",
              AUDITOR, None, bodies.EventView, session_pages=True,
              description=(
              'The entry at `position` with its hashes (404 beyond the head). Recorded as a read unless a read '
              'session covers it.')),
    Operation("open_read_session", "POST", "/v1/read-sessions",
              "Record one read of a range of entries, covering every page of it for a day",
              AUDITOR, bodies.ReadSessionRequest, bodies.ReadSession, 201,
              description="An auditor's run (`consent-ledger verify`, `export`) reads thousands of pages. "
                          "Without a session each page appends its own PersonalDataRead entry, so the log "
                          "grows under the auditor's feet; with one, the run is one recorded read of a stated "
                          "range: send the answer's `session` as the `Ledger-Read-Session` header on the pages "
                          "(events, entry bundles) of that range. `last_position` may not exceed the log's head. "
                          "A session covers only the caller (token subject) that opened it, only its range, "
                          "and only until `expires_at`; otherwise the page is 403, saying which."),
    Operation("get_receipt_proof", "GET", "/v1/patients/{nhs}/receipts/{position}",
              "The patient's own ledger entry, or a data use with the patient's proof of being in it or not, "
              "with its inclusion proof against the latest signed checkpoint",
              PATIENT_APP, None, bodies.ReceiptProof,
              description=(
              "For an entry about the caller's own patient (a choice or consent): the entry, its exact bytes "
              "(`entry`), leaf hash, RFC 9162 inclusion proof and the signed checkpoint the proof leads to. For "
              "any data use, the same plus `cohort`: the patient's transparency secret, their tag and the proof "
              "(LEDGER-FORMAT.md §8) that they were, or were not, among the members the entry's "
              "`cohort_commitment` commits to; the first such receipt commits the patient's secret in the log, "
              "and only uses after that commitment are `provable`. Anyone holding the log's public key can check "
              "it offline; the /transparency page does the inclusion part in the browser. Another patient's "
              "choice answers exactly like a missing entry (404). Recorded as a read.")),
    Operation("get_checkpoint", "GET", "/checkpoint",
              "The latest signed checkpoint (C2SP tlog-checkpoint, text/plain)", PUBLIC,
              media_type="text/plain",
              description=(
              "A C2SP signed note: origin, tree size and base64 root hash, signed with the log's Ed25519 key(s) "
              "(see /v1/log-key), followed by any witness cosignatures collected for it (usually none for the "
              "newest: see /checkpoint/witnessed). Signed at most every few seconds as the log grows; clients "
              "keep the last one they verified to detect a rollback or fork.")),
    Operation("get_witnessed_checkpoint", "GET", "/checkpoint/witnessed",
              "The latest checkpoint cosigned by a quorum of the log's witnesses, with their cosignature lines",
              PUBLIC, media_type="text/plain", may_be_missing=True,
              description=(
              "The log submits its checkpoints to the witnesses it is configured with (C2SP tlog-witness, at "
              "most every CONSENT_LEDGER_WITNESS_INTERVAL seconds); each cosigns only a checkpoint consistent "
              "with every one it cosigned before. This is the largest checkpoint that at least "
              "CONSENT_LEDGER_WITNESS_QUORUM of them cosigned, as a signed note: the log's signature, then one "
              "C2SP tlog-cosignature line per witness. It lags /checkpoint by up to the interval. 404 when no "
              "witness is configured or no checkpoint has a quorum yet. `consent-ledger verify --witness VKEY` "
              "verifies the log against it.")),
    Operation("get_entry_bundle", "GET", "/tile/entries/{tile_path:.+}",
              "Entry bundle (C2SP tlog-tiles): big-endian uint16 length-prefixed entries", AUDITOR,
              media_type="application/octet-stream", session_pages=True,
              description=(
              'The entries of one tile (256, or fewer in a partial tile `.p/W`), each as a big-endian uint16 length'
              ' followed by the entry bytes, as C2SP tlog-tiles defines them. Auditor only, since entries name '
              'patients; recorded as a read unless a read session covers it. Full tiles never change and are '
              'cacheable for a year.')),
    Operation("get_tile", "GET", r"/tile/{level:\d+}/{tile_path:.+}",
              "Merkle hash tile (C2SP tlog-tiles): 32-byte hashes", PUBLIC,
              media_type="application/octet-stream",
              description=(
              'Level-`L` tile `N` holds up to 256 32-byte Merkle hashes (C2SP tlog-tiles): level 0 the leaf hashes,'
              ' higher levels the subtree roots. Public: hashes reveal nothing about patients. Full tiles are '
              'immutable and cacheable.')),
    Operation("inclusion_proof", "GET", "/v1/proofs/inclusion",
              "RFC 9162 inclusion proof of the entry at `position` in the tree of `tree_size` (default: latest checkpoint)",
              PUBLIC, None, bodies.InclusionProof,
              query=(("position", {"type": "integer", "minimum": 1}, True),
                     ("tree_size", {"type": "integer", "minimum": 1}, False)), may_be_missing=True,
              description=(
              'The audit path from the leaf at `position - 1` to the root of the tree of `tree_size` entries '
              '(default: the latest checkpoint). 404 while the log is smaller than `tree_size`.')),
    Operation("consistency_proof", "GET", "/v1/proofs/consistency",
              "RFC 9162 consistency proof between tree sizes `from` and `to`",
              PUBLIC, None, bodies.ConsistencyProof,
              query=(("from", {"type": "integer", "minimum": 1}, True),
                     ("to", {"type": "integer", "minimum": 1}, True)), may_be_missing=True,
              description=(
              'The hashes showing that the tree of `from` entries is a prefix of the tree of `to` entries, so '
              'nothing earlier was changed or removed. 404 while the log is smaller than `to`.')),
    Operation("log_key", "GET", "/v1/log-key", "The checkpoint verifier key(s) in signed-note vkey form",
              PUBLIC, None, bodies.LogKeys,
              description=(
              'The checkpoint origin and every key that signs it, in signed-note vkey form (name+keyid+base64 key).'
              ' During a key rotation both keys are listed.')),
    Operation("fhir_metadata", "GET", "/fhir/metadata", "FHIR R4 CapabilityStatement of the FHIR interface",
              PUBLIC, media_type=FHIR_JSON, fhir=True,
              description=(
              'The CapabilityStatement lists the FHIR interactions this service offers (Consent search, AuditEvent '
              'search, Bundle import), their search parameters and the security they need.')),
    Operation("fhir_consents", "GET", "/fhir/Consent",
              "A patient's current choices as FHIR R4 Consent resources (a searchset Bundle)",
              PATIENT_APP, media_type=FHIR_JSON, fhir=True, recorded=True, query=(_fhir_patient,),
              description="The national and type-1 opt-outs (deny while opted out, permit once opted back in) "
                          "and each study consent in force (permit, its grant as the policy), each identified by "
                          "its ledger position and leaf hash so it can be tied to a receipt. Same rules as "
                          "GET /v1/patients/{nhs}/choices, and recorded as a read of the patient's choices. "
                          "contracts/FHIR-MAPPING.md lists every mapping choice."),
    Operation("fhir_audit_events", "GET", "/fhir/AuditEvent",
              "A patient's history as IHE BALP AuditEvents (a searchset Bundle, newest first, paged)",
              PATIENT_APP, media_type=FHIR_JSON, fhir=True, recorded=True,
              query=(_fhir_patient, ("_count", {"type": "integer", "minimum": 1, "maximum": 1000}, False),
                     ("_cursor", {"type": "string", "pattern": r"^[0-9]{1,19}" + END}, False)),
              description="Each data use as a PrivacyDisclosure (recipient organisation, purpose of use, legal "
                          "basis, datasets, exemption), each recorded read by someone else as a read, each choice "
                          "change as a create. Follow the Bundle's `next` link for older entries. Recorded as a "
                          "read of the patient's history."),
    Operation("fhir_import_bundle", "POST", "/fhir/Bundle",
              "Import an earlier register's choices: a transaction or batch Bundle of FHIR R4 Consent resources",
              DAC, media_type=FHIR_JSON, fhir=True, body_limit=16 * MIB,
              description="Each Consent (national or type-1 opt-out as deny or permit, or a study consent under "
                          "urn:consent-ledger:grant:<id>) is recorded as an entry marked imported, keeping its "
                          "id, source (meta.source) and dateTime; the entry's own time is the import. A choice is "
                          "written only where the ledger holds none for that patient and scope (or that "
                          "consent), so a later choice is never overridden and a second import writes nothing. "
                          "The bundle is written whole or not at all: every mistake is reported with its entry "
                          "index and nothing is written."),
    Operation("create_subscription", "POST", "/v1/subscriptions",
              "A patient app backend subscribes an endpoint to notifications; the signing secret is shown once",
              PATIENT_APP, bodies.SubscriptionRequest, bodies.Subscription, 201,
              description=(
              "For a backend's token (role `patient-app`, no `nhs_number` claim; a patient-scoped token is 403). "
              "`events`: any of data-use.included, data-use.opt-out-overridden, choice.changed, record.read, "
              "grant.approved. Notifications are made from the ledger position at which the subscription is "
              "made, for the patients set with PUT .../patients (grant.approved needs none), and delivered as "
              "Standard Webhooks signed with `secret` (whsec_...: keep it; it is never shown again). The URL "
              "must be http(s) to a public address: private, loopback and link-local addresses are refused "
              "(422) unless the operator allows a network (CONSENT_LEDGER_WEBHOOK_ALLOW). Registration is "
              "recorded in the ledger (SubscriptionRegistered: owner, URL, events; never patients)."), backend_only=True),
    Operation("list_subscriptions", "GET", "/v1/subscriptions", "The caller's own subscriptions",
              PATIENT_APP, None, bodies.Subscriptions,
              description="Only the subscriptions this token's subject made; the secret is never shown again.", backend_only=True),
    Operation("get_subscription", "GET", "/v1/subscriptions/{subscription_id}", "One of the caller's subscriptions",
              PATIENT_APP, None, bodies.Subscription,
              description="Another backend's subscription answers 404, exactly like one that does not exist.", backend_only=True),
    Operation("delete_subscription", "DELETE", "/v1/subscriptions/{subscription_id}",
              "Delete a subscription: nothing more is made or delivered for it", PATIENT_APP, None,
              bodies.Subscription, description="Recorded in the ledger (SubscriptionChanged, change `deleted`).", backend_only=True),
    Operation("pause_subscription", "POST", "/v1/subscriptions/{subscription_id}/pause",
              "Pause deliveries; notifications are still made and wait", PATIENT_APP, None, bodies.Subscription,
              description="Resume delivers the backlog in order. Recorded in the ledger.", backend_only=True),
    Operation("resume_subscription", "POST", "/v1/subscriptions/{subscription_id}/resume",
              "Resume a paused or failing subscription: its backlog is delivered in order", PATIENT_APP, None,
              bodies.Subscription,
              description="A subscription is marked `failing` when a notification has failed for the whole retry "
                          "window (CONSENT_LEDGER_WEBHOOK_RETRY_WINDOW, default 3 days); resuming retries at once.", backend_only=True),
    Operation("put_subscription_patients", "PUT", "/v1/subscriptions/{subscription_id}/patients",
              "Replace the set of patients who asked this app for alerts (JSON array, text/plain or MESH .dat)",
              PATIENT_APP, None, bodies.Subscription, 200, BULK_BODY, bulk=True,
              description=(
              "Millions of numbers are fine (stored compactly, like cohorts); the set replaces the previous one "
              "and applies to ledger entries from the next one the notifier reads. The ledger records only that "
              "the set was replaced and its size (SubscriptionChanged), never the NHS numbers."), backend_only=True),
    Operation("list_deliveries", "GET", "/v1/subscriptions/{subscription_id}/deliveries",
              "The delivery log of a subscription: each notification, its attempts and outcome", PATIENT_APP,
              None, bodies.Deliveries, query=(_after, _limit),
              description="In the order notifications are delivered (ledger order); page with `after`.", backend_only=True),
    Operation("subscription_events", "GET", "/v1/subscriptions/{subscription_id}/events",
              "The same notifications as a pull feed, for backends that cannot receive webhooks", PATIENT_APP,
              None, bodies.Feed, query=(_after, _limit), recorded=True,
              description=(
              "Each item carries the webhook's id, type, ledger position and body (the webhook's JSON), in "
              "order; page with `after` (the `next_after` of the previous page). The bodies name patients, so "
              "each page is recorded as a read (PersonalDataRead, `what` = notifications)."), backend_only=True),
    Operation("whoami", "GET", "/v1/whoami",
              "Who this bearer token makes the caller: subject, roles, organisation (for checking a token)",
              frozenset(ROLES), None, bodies.TokenInfo,
              description=(
              'What this service makes of a bearer token: its subject, the roles it accepts from it, the '
              'organisation and whether it is bound to one patient (the NHS number is not echoed). Useful to check '
              'a token before using it; 401 says why a token is refused.')),
    Operation("healthz", "GET", "/healthz", "Liveness", PUBLIC, None, bodies.Health,
              description=(
              '200 while the process runs and answers HTTP; says nothing about the database (see /readyz).')),
    Operation("readyz", "GET", "/readyz", "Readiness: database reachable, writer running, no background task stalled",
              PUBLIC, None, bodies.Health,
              description=(
              '200 when the database answers, the writer runs and no background task (checkpoint signer, '
              'projections, filter) has stalled; otherwise 503 naming what is wrong, so a load balancer stops '
              'sending requests here.')),
    Operation("metrics", "GET", "/metrics", "Prometheus metrics (no personal data: routes are templates)",
              PUBLIC, media_type="text/plain",
              description=(
              "Prometheus text format: request counts and latencies per route template and status, the ledger "
              "head, the write queue, the latest checkpoint's size, and the position each projection and the "
              "opt-out filter has reached. Routes are templates, never paths, so no NHS number appears.")),
    Operation("openapi", "GET", "/openapi.json", "This document", PUBLIC,
              description=(
              'The OpenAPI 3.1 document of this API, generated from the contracts (msgspec Structs and the '
              'operation table) the service itself runs on. /docs renders it for people.')),
    # Pages for people: server-rendered, no login (the patient page acts with the token typed into it).
    Operation("page_home", "GET", "/", "What this ledger is, its latest checkpoint, and where to look next",
              PUBLIC, media_type=HTML, page=True),
    Operation("page_register", "GET", "/register", "The public register of grants, searchable and filterable",
              PUBLIC, media_type=HTML, page=True,
              query=(("q", {"type": "string", "maxLength": 200}, False),
                     ("purpose", {"type": "string", "enum": list(values(Purpose))}, False),
                     ("status", {"type": "string", "enum": list(RECORDED_STATUSES)}, False),
                     ("commercial", {"type": "string", "enum": ["yes", "no"]}, False))),
    Operation("page_grant", "GET", "/register/{grant_id}", "One grant: its terms, the uses under it, its entries",
              PUBLIC, media_type=HTML, page=True),
    Operation("page_statistics", "GET", "/statistics", "Charts of choices over time, uses per purpose, commercial share",
              PUBLIC, media_type=HTML, page=True),
    Operation("page_transparency", "GET", "/transparency", "How to verify this ledger, with a receipt checker",
              PUBLIC, media_type=HTML, page=True,
              query=(("from", {"type": "integer", "minimum": 1}, False), ("to", {"type": "integer", "minimum": 1}, False))),
    Operation("page_check_receipt", "POST", "/transparency/receipt", "Check a pasted receipt on the server",
              PUBLIC, media_type=HTML, page=True),
    Operation("page_patient", "GET", "/patient", "Reference patient timeline: sign in with a patient-app token",
              PUBLIC, media_type=HTML, page=True),
    Operation("page_patient_act", "POST", "/patient", "Reference patient timeline: show, confirm and record choices",
              PUBLIC, media_type=HTML, page=True),
    Operation("page_docs", "GET", "/docs", "The API reference, rendered from /openapi.json", PUBLIC,
              media_type=HTML, page=True),
    Operation("page_asset", "GET", "/static/{asset:.+}", "The pages' stylesheets, scripts and images", PUBLIC,
              media_type="application/octet-stream", page=True),
)

BY_ID = {op.id: op for op in OPERATIONS}

_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "nhs": NHS_NUMBER_SCHEMA,
    "grant_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}" + END},
    "cohort_id": {"type": "string", "pattern": r"^[0-9a-f]{64}" + END},
    "subscription_id": {"type": "string", "pattern": r"^[0-9a-f]{32}" + END},
    "position": {"type": "integer", "minimum": 1},
    "level": {"type": "integer", "minimum": 0, "maximum": 63},
    "tile_path": {"type": "string", "pattern": r"^(x\d{3}/)*\d{3}(\.p/\d{1,3})?$"},
}


def _schema_hook(kind: type) -> dict[str, Any]:
    if kind is NhsNumber:
        return dict(NHS_NUMBER_SCHEMA)
    raise NotImplementedError


def _problem_response(description: str, header: str | None = None, fhir: bool = False) -> dict[str, Any]:
    content = ({FHIR_JSON: {"schema": {"type": "object", "description": "a FHIR R4 OperationOutcome",
                                        "required": ["resourceType", "issue"]}}} if fhir
               else {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}})
    response: dict[str, Any] = {"description": description, "content": content}
    if header is not None:
        response["headers"] = {header: {"required": True, "schema": {"type": "string"}}}
    return response


def openapi(version: str) -> dict[str, Any]:
    """Generate the OpenAPI 3.1 document from the operation table and Structs."""
    types = {bodies.Problem}
    for op in OPERATIONS:
        types.update(t for t in (op.request, op.response) if t is not None)
    _, components = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__),
        schema_hook=_schema_hook,
        ref_template="#/components/schemas/{name}",
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        if op.page:
            continue
        params = [
            {"name": name, "in": "path", "required": True, "schema": _PATH_PARAMS[name]}
            for name in _path_names(op.path)
        ]
        params += [
            {"name": name, "in": "query", "required": required, "schema": schema}
            for name, schema, required in op.query
        ]
        responses: dict[str, Any] = {}

        def problem(description: str, header: str | None = None, op: Operation = op) -> dict[str, Any]:
            return _problem_response(description, header, fhir=op.fhir)

        ok_schema = (
            {"$ref": f"#/components/schemas/{op.response.__name__}"}
            if op.response is not None
            else {"type": "object"}
        )
        responses[str(op.success)] = {
            "description": "success",
            "content": {op.media_type: {"schema": ok_schema if op.media_type in ("application/json", FHIR_JSON) else
                                        {"type": "string", "format": "binary"}
                                        if op.media_type == "application/octet-stream" else {"type": "string"}}},
        }
        for media_type in op.also_as:
            responses[str(op.success)]["content"][media_type] = {"schema": {"type": "string"}}
        if op.recorded or op.method == "GET" and op.roles and op.roles <= PATIENT_APP | AUDITOR:
            # Reads of personal data are written to the ledger first (PersonalDataRead).
            responses[str(op.success)]["headers"] = {"Ledger-Read-Recorded": {
                "description": "ledger position of the PersonalDataRead event recording this read",
                "schema": {"type": "integer", "minimum": 1}}}
        if op.success == 201:
            responses["200"] = {
                "description": "already in force, or an idempotent replay: the existing receipt",
                "content": {"application/json": {"schema": ok_schema}},
            }
        if op.request is not None or params or op.bulk or op.fhir and op.roles:
            responses["400"] = problem("malformed request")
        if op.roles:
            responses["401"] = problem("missing or invalid credentials (RFC 6750 challenge)",
                                                 "WWW-Authenticate")
            responses["403"] = problem("not allowed for this caller", "WWW-Authenticate")
        if "{" in op.path or op.may_be_missing:
            responses["404"] = problem("not found")
        if op.response is bodies.Receipt:
            responses["409"] = problem("idempotency key reused with another body, or a concurrent change")
        if op.request is not None or op.fhir and op.method == "POST":
            responses["413"] = problem(f"body larger than {op.body_limit} bytes")
            responses["415"] = problem("body is not application/json")
        if op.request is not None or "{nhs}" in op.path or op.fhir and op.roles:
            responses["422"] = problem("well-formed but breaks a rule (or an NHS number's check digit)")
        responses["503"] = problem(
            "the database is unavailable, the write queue is full (writes, and reads that are recorded) or the "
            "request timed out: retry after Retry-After; `outcome-unknown`: a write may have been recorded, "
            "retry it with the same Idempotency-Key", "Retry-After")
        if op.response is bodies.Health:
            # Readiness reports "unavailable" in its own body.
            responses["503"]["content"]["application/json"] = {"schema": ok_schema}
            responses["503"]["headers"]["Retry-After"]["required"] = False
        operation: dict[str, Any] = {
            "operationId": op.id,
            "summary": op.summary,
            **({"description": op.description} if op.description else {}),
            "parameters": params,
            "responses": responses,
        }
        if op.roles:
            operation["security"] = [{"bearer": []}]
            operation["x-roles"] = sorted(op.roles)
        else:
            operation["security"] = []
        if op.fhir and op.method == "POST":
            operation["requestBody"] = {"required": True, "content": {FHIR_JSON: {"schema": {
                "type": "object", "description": "a FHIR R4 Bundle", "required": ["resourceType"]}}}}
        if op.request is not None:
            operation["requestBody"] = {
                "required": not op.body_optional,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.request.__name__}"}}},
            }
        # Every write answers with a receipt and honours Idempotency-Key,
        # including writes without a body (withdrawing a consent).
        if op.response is bodies.Receipt:
            operation["parameters"].append(
                {"name": "Idempotency-Key", "in": "header", "required": False,
                 # What the service accepts: printable ASCII (HTTP strips surrounding spaces).
                 "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                            "pattern": "^[!-~]([ -~]*[!-~])?$"}}
            )
        if op.session_pages:
            operation["parameters"].append(
                {"name": "Ledger-Read-Session", "in": "header", "required": False,
                 "description": "a read session (POST /v1/read-sessions) covering this page: the page is then "
                                "not recorded again, and Ledger-Read-Recorded names the session",
                 "schema": {"type": "integer", "minimum": 1}})
        if op.bulk:
            lines = {"type": "string", "description": "one NHS number per line (.dat: each followed by a comma)"}
            json_body = (
                {"$ref": f"#/components/schemas/{op.request.__name__}"} if op.request is not None
                else {"type": "array", "items": dict(NHS_NUMBER_SCHEMA), "maxItems": MAX_COHORT_SIZE}
            )
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": json_body},
                "text/plain": {"schema": lines},
                "application/vnd.nhs.mesh.dat": {"schema": lines},
            }}
            responses["413"] = problem(f"body larger than {op.body_limit} bytes")
            responses["415"] = problem("not JSON, text/plain or application/vnd.nhs.mesh.dat")
            responses["422"] = problem(
                "invalid NHS numbers (the errors list their lines), or the grant or purpose breaks a rule")
        paths.setdefault(openapi_path(op.path), {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "consent-ledger", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


def _path_names(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]


def openapi_path(path: str) -> str:
    """The route without aiohttp's regex parts: /tile/{level:\\d+}/... -> /tile/{level}/..."""
    return "/".join("{" + part[1:-1].split(":")[0] + "}" if part.startswith("{") else part
                    for part in path.split("/"))

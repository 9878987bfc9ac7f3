"""Coded values used on the wire and in the ledger, with plain-English labels.

The labels are what a patient sees in their history; the codes are stable
and never reused for another meaning.
"""

from __future__ import annotations

from typing import Literal, get_args

# The national data opt-out and the type 1 opt-out keep their meaning (no use
# of confidential patient information beyond direct care, unless an exemption
# or the patient's consent applies). The finer choices sit on top: each opts
# out of a kind of use only, and is recorded, withdrawn and honoured the same way
# (contracts/decision.py; contracts/LEDGER-FORMAT.md §1.1).
OptOutScope = Literal["national", "type-1", "commercial", "non-research", "non-planning"]
NATIONAL_SCOPES = ("national", "type-1")
FINER_SCOPES = ("commercial", "non-research", "non-planning")
# How value returns to the NHS from a commercial grant (the models DHSC's principles list).
ValueModel = Literal["fee", "royalty", "equity", "in-kind", "free-access-to-products"]
# The recipient's Data Security and Protection Toolkit status.
ToolkitStatus = Literal["standards-exceeded", "standards-met", "approaching-standards", "standards-not-met"]
OutputKind = Literal["publication", "product", "trial-registration", "dataset", "service-change", "other"]
# Who receives data: a grant to an organisation of a category the policy never allows is refused.
RecipientCategory = Literal["nhs", "public-body", "academic", "charity", "commercial", "insurance", "marketing"]
NEVER_ALLOWED_RECIPIENTS = ("insurance", "marketing")
Channel = Literal["app", "online", "phone", "post", "gp-practice"]
# What an entry may say: a request's channel, or an import from an earlier register (never a request's).
RecordedChannel = Literal["app", "online", "phone", "post", "gp-practice", "import"]
ActorKind = Literal["patient", "proxy"]
ProxyRole = Literal["parent", "lasting-power-of-attorney", "court-deputy"]
Purpose = Literal[
    "research",
    "planning",
    "commissioning",
    "public-health",
    "service-evaluation",
    "clinical-audit",
]
LegalBasis = Literal[
    "explicit-consent",
    "public-task-health-care",
    "public-task-research",
    "public-task-public-health",
    "legal-obligation",
    "section-251",
]
ExemptionBasis = Literal[
    "patient-consent",
    "legal-requirement",
    "s251-cag",
    "overriding-public-interest",
]
AccessMethod = Literal["sde", "extract"]
Role = Literal["patient-app", "dac", "sde", "auditor", "cag", "ethics-committee", "lay-panel", "board"]
# The approvals a grant may need before it is in force, and the role that records each.
ApprovalKind = Literal["dac-decision", "cag", "ethics", "lay-panel", "board-fairness"]
APPROVER_ROLES: dict[str, str] = {"dac-decision": "dac", "cag": "cag", "ethics": "ethics-committee",
                                  "lay-panel": "lay-panel", "board-fairness": "board"}
# What a recorded read of personal data looked at (PersonalDataRead.what).
# "audit-session": an auditor's whole run over a range of entries (one read, not one per page).
ReadKind = Literal["choices", "history", "receipt", "entries", "entry-tiles", "export", "cohort", "audit-session",
                   "notifications"]
# What a patient app backend may subscribe to (issue 13).
NotificationType = Literal["data-use.included", "data-use.opt-out-overridden", "choice.changed", "record.read",
                           "grant.approved"]

LABELS: dict[str, str] = {
    "national": "national data opt-out",
    "type-1": "type 1 opt-out (GP record)",
    "commercial": "no commercial use",
    "non-research": "research only (no other use)",
    "non-planning": "planning only (no other use)",
    "research": "research",
    "planning": "planning health and care services",
    "commissioning": "commissioning services",
    "public-health": "protecting public health",
    "service-evaluation": "evaluating a service",
    "clinical-audit": "clinical audit",
    "explicit-consent": "your explicit consent",
    "public-task-health-care": "public task: managing health and care (UK GDPR 6(1)(e), 9(2)(h))",
    "public-task-research": "public task: research in the public interest (UK GDPR 6(1)(e), 9(2)(j))",
    "public-task-public-health": "public task: protecting public health (UK GDPR 6(1)(e), 9(2)(i))",
    "legal-obligation": "a legal obligation (UK GDPR 6(1)(c))",
    "section-251": "section 251 support (NHS Act 2006)",
    "patient-consent": "you consented to this project",
    "legal-requirement": "required by law",
    "s251-cag": "section 251 approval on advice of the Confidentiality Advisory Group",
    "overriding-public-interest": "overriding public interest",
    "sde": "analysed inside a Secure Data Environment",
    "extract": "sent as a data extract",
    "patient-app": "a patient app",
    "dac": "a data access committee",
    "auditor": "an auditor",
    "choices": "your current choices",
    "history": "your history",
    "receipt": "a receipt for one of your choices",
    "entries": "ledger entries",
    "entry-tiles": "ledger entries",
    "export": "an export of the ledger",
    "cohort": "the members of a cohort",
    "notifications": "notifications about your data sent to your app",
    "dac-decision": "the data access committee's decision",
    "cag": "Confidentiality Advisory Group (section 251)",
    "ethics": "research ethics committee",
    "lay-panel": "lay / citizens' panel",
    "board-fairness": "board sign-off that the terms are fair",
    "fee": "a fee", "royalty": "a royalty", "equity": "equity", "in-kind": "value in kind",
    "free-access-to-products": "free access to the resulting products",
}


def values(literal: object) -> tuple[str, ...]:
    return get_args(literal)

"""Which approvals a proposed grant needs before it is in force.

The policy is a list of (approval, condition) pairs, from configuration
(``CONSENT_LEDGER_APPROVALS``): ``dac-decision:all,cag:section-251,...``. The
approvals a grant needs are fixed when it is proposed and written into its
``AccessGranted`` entry (``requires``), so changing the policy later never
changes what an earlier grant needed, and anyone reading the log can check it.
"""

from __future__ import annotations

from .codes import ApprovalKind, values

# When an approval is needed: always, for section 251 support, for research, for commercial grants.
CONDITIONS = ("all", "section-251", "research", "commercial")

# The documented default in production (the NHS's practice, and DHSC's principles for commercial use):
# the data access committee decides every grant; the Confidentiality Advisory Group advises on every
# section 251 grant; a research ethics committee approves research; a lay / citizens' panel and the
# board (fair terms, principle 2) sign off commercial grants.
PRODUCTION_POLICY: tuple[tuple[str, str], ...] = (
    ("dac-decision", "all"), ("cag", "section-251"), ("ethics", "research"),
    ("lay-panel", "commercial"), ("board-fairness", "commercial"),
)


def parse(text: str) -> tuple[tuple[str, str], ...]:
    """``approval:condition`` pairs, comma-separated; ValueError saying what is wrong."""
    policy = []
    for item in text.split(","):
        if not item.strip():
            continue
        kind, _, condition = item.strip().partition(":")
        if kind not in values(ApprovalKind):
            raise ValueError(f"{kind!r} is not an approval ({', '.join(values(ApprovalKind))})")
        if condition not in CONDITIONS:
            raise ValueError(f"{item.strip()!r}: the condition after ':' must be one of {', '.join(CONDITIONS)}")
        policy.append((kind, condition))
    return tuple(policy)


def required(policy: tuple[tuple[str, str], ...], legal_basis: str, purpose: str, commercial: bool) -> list[str]:
    """The approvals a grant with these terms needs, in policy order, each once."""
    applies = {"all": True, "section-251": legal_basis == "section-251", "research": purpose == "research",
               "commercial": commercial}
    out: list[str] = []
    for kind, condition in policy:
        if applies[condition] and kind not in out:
            out.append(kind)
    return out

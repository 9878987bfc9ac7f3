"""Why a data use is refused, and the append condition that keeps its
decision true until it is written (a dynamic consistency boundary)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from contracts.decision import Reason, Terms
from contracts.entry import format_recorded_at
from service.app.assessors import Assessment
from service.domain.aggregates import (
    Grant,
)
from service.domain.errors import RuleBroken
from service.store.event_log import (
    AppendCondition,
)


def not_in_force(grant: Grant, terms: Terms, grant_id: str) -> RuleBroken:
    g = grant.granted
    assert g is not None and grant.granted_at is not None
    if terms.status == "not-recorded":
        return RuleBroken(f"`occurred_at` is before grant {grant_id!r} was recorded "
                          f"({format_recorded_at(grant.granted_at)}): a use is recorded only under a grant "
                          "already in the ledger", code="invalid-dates", path="$.occurred_at")
    detail = {
        "not-yet-valid": f"the grant is not yet valid at `occurred_at`: it starts {format_recorded_at(g.valid_from)}",
        "expired": f"the grant had expired at `occurred_at`: it ended {format_recorded_at(g.valid_until)}",
        "revoked": f"the grant was revoked (position {grant.revoked_position}) before `occurred_at`",
        "proposed": f"the grant was only proposed at `occurred_at`: it still needed {', '.join(grant.pending)} "
                    "approval (POST /v1/grants/{grant_id}/approvals by each party)".replace("{grant_id}", grant_id),
    }[terms.status]
    return RuleBroken(f"{detail}; data uses need a grant in force when they occur",
                      code=f"grant-{terms.status}", path="$.grant_id")


def excluded(assessment: Assessment, grant_id: str, path: str) -> RuleBroken:
    fix = (f"filter the cohort with POST /v1/opt-out-filter?grant_id={grant_id}"
           f"&min_position={assessment.position} and submit the filtered cohort")
    missing = assessment.found[Reason.CONSENT_MISSING]
    if missing:
        return RuleBroken(f"{missing} patient(s) in the cohort had not consented to this project when the use "
                          f"occurred (position {assessment.position}), and its legal basis is explicit consent; "
                          + fix, code="consent-missing", path=path)
    opted_out, chose = assessment.found[Reason.OPTED_OUT_EXCLUDED], assessment.found[Reason.CHOICE_EXCLUDED]
    if opted_out:
        also = f" (and {chose} more chose no use of this kind)" if chose else ""
        return RuleBroken(
            f"{opted_out} patient(s) in the cohort have an opt-out in force at position {assessment.position} (when "
            f"the use occurred){also} and the grant records no opt-out exemption; " + fix,
            code="opted-out-patients-in-cohort", path=path)
    return RuleBroken(
        f"{chose} patient(s) in the cohort chose, at position {assessment.position} (when the use occurred), that "
        "their data not be used for this kind of use (no commercial use, research only or planning only), and the "
        "grant records no opt-out exemption; " + fix, code="finer-choice-in-cohort", path=path)


def in_cohort(stems: np.ndarray, nhs_number: str) -> bool:
    # In the cohort's own dtype: a Python int would make numpy cast all the
    # stems to int64 first (9 ms for 5M, per event, on the writer's loop).
    stem = stems.dtype.type(int(nhs_number[:9]))
    i = int(np.searchsorted(stems, stem))
    return i < len(stems) and int(stems[i]) == stem


def data_use_condition(after: int, grant_id: str, stems: np.ndarray, terms: Terms) -> AppendCondition:
    """Events after the assessed position that would leave a member excluded."""

    def violated(events: Sequence[tuple[str, Any]]) -> str | None:
        for event_type, p in events:
            if event_type == "AccessRevoked" and p.grant_id == grant_id:
                return "the grant was revoked"
            if event_type == "StudyConsentWithdrawn" and p.grant_id == grant_id and in_cohort(stems, p.nhs_number) \
                    and (terms.needs_consent or terms.exemption is None):
                return "a patient in the cohort withdrew consent"
            if event_type == "OptOutRegistered" and terms.opt_outs_apply and not terms.needs_consent \
                    and in_cohort(stems, p.nhs_number):
                return "a patient in the cohort opted out"
        return None

    return AppendCondition(
        after=after,
        event_types=frozenset({"AccessRevoked", "OptOutRegistered", "StudyConsentWithdrawn"}),
        violated=violated,
    )

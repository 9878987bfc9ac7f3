"""Queries over the projection tables: a patient's history and the public register."""

from __future__ import annotations

from datetime import datetime, timezone

import asyncpg
import msgspec
import numpy as np

from contracts import decision
from contracts.bodies import (
    Allocation,
    BenefitStatus,
    GrantApproval,
    HistoryItem,
    HistoryPage,
    Labelled,
    OutputView,
    Register,
    RegisteredUse,
    RegisterEntry,
    ValueView,
)
from contracts.codes import LABELS
from contracts.decision import Reason, Terms, grant_status
from contracts.disclosure import suppressed
from contracts.entry import format_recorded_at
from contracts.values import Benefit, CommercialTerms, Exemption, Organisation

from . import blocks
from .choices import READ_EVENT


def _label(code: str | None) -> Labelled | None:
    return None if code is None else Labelled(code=code, label=LABELS.get(code, code))


def _ts(value: datetime) -> str:
    return format_recorded_at(value)


async def projection_position(conn: asyncpg.Connection, *names: str) -> int:
    """The position every named projection has reached."""
    rows = await conn.fetch("SELECT name, position FROM projection_positions WHERE name = ANY($1)", list(names))
    found = {r["name"]: r["position"] for r in rows}
    return min(found.get(n, 0) for n in names)


async def cohorts_containing(conn: asyncpg.Connection, stem: int) -> list[bytes]:
    block, low = blocks.block_of(stem)
    # The server tests bitmaps itself and pre-screens arrays with a byte
    # search (which may also match across two members: checked below), so
    # only candidate rows travel.
    rows = await conn.fetch(
        "SELECT cohort_id, kind, CASE WHEN kind = 'a' THEN members END AS members FROM cohort_blocks"
        " WHERE block = $1 AND CASE WHEN kind = 'b' THEN get_bit(members, $2) = 1"
        " ELSE position($3::bytea IN members) > 0 END",
        block, low, low.to_bytes(2, "little"),
    )
    return [
        bytes(r["cohort_id"])
        for r in rows
        if r["kind"] == blocks.BITMAP or blocks.contains(blocks.ARRAY, r["members"], low)
    ]


class _Choices:
    """The patient's own choice events, to tell which rule let them into a use."""

    def __init__(self, rows: list[asyncpg.Record]):
        self.rows = sorted(rows, key=lambda r: r["position"])

    def at(self, position: int, grant_id: str) -> decision.Choices:
        """The patient's choices, as the rule reads them, once ``position`` was applied."""
        scopes: dict[str, bool] = {}
        consented = False
        for r in self.rows:
            if r["position"] > position:
                break
            t = r["event_type"]
            if t in ("OptOutRegistered", "OptOutWithdrawn"):
                scopes[r["scope"]] = t == "OptOutRegistered"
            elif r["grant_id"] == grant_id:
                consented = t == "StudyConsentGiven"
        return decision.Choices.of({scope: np.array([v]) for scope, v in scopes.items()}, np.array([consented]))


_READ_WORDS = {"choices": "record of choices", "history": "history", "receipt": "ledger receipt"}
_ROLE_WORDS = {"patient-app": "an app acting for you", "auditor": "an auditor"}

_CHOICE_WORDS = {
    "OptOutRegistered": "You opted out: {scope}",
    "OptOutWithdrawn": "You withdrew your opt-out: {scope}",
    "StudyConsentGiven": "You consented to project {grant}",
    "StudyConsentWithdrawn": "You withdrew your consent to project {grant}",
}


def _choice_item(r: asyncpg.Record) -> HistoryItem:
    t = r["event_type"]
    if t == READ_EVENT:
        what, role = r["channel"], r["actor_kind"]
        return HistoryItem(
            position=r["position"],
            recorded_at=_ts(r["recorded_at"]),
            kind="access",
            summary=f"Your {_READ_WORDS.get(what, what)} was viewed by {r['reader']} ({_ROLE_WORDS.get(role, role)})",
            event_type=t,
            actor=r["reader"],
        )
    scope = _label(r["scope"])
    who = "you" if r["actor_kind"] == "patient" else f"someone acting for you ({r['proxy_role'] or 'proxy'})"
    summary = _CHOICE_WORDS[t].format(scope=scope.label if scope else "", grant=r["grant_id"])
    if r["actor_kind"] != "patient":
        summary = summary.replace("You ", "Someone acting for you ", 1)
    if r["channel"] == "import":
        summary += " (carried over from the register kept before this ledger)"
    return HistoryItem(
        position=r["position"],
        recorded_at=_ts(r["recorded_at"]),
        kind="choice" if scope else "consent",
        summary=summary,
        event_type=t,
        scope=scope,
        channel=r["channel"],
        actor=who,
        grant_id=r["grant_id"],
    )


def _use_terms(r: asyncpg.Record) -> Terms:
    """The grant as it stood when the use occurred, from its register row."""
    revoked = r["revoked_position"] is not None and r["revoked_position"] <= r["opt_out_state_position"]
    exemption = (Exemption(basis=r["grant_exemption_basis"], reference=r["grant_exemption_reference"])
                 if r["grant_exemption_basis"] else None)
    return Terms(status=grant_status(r["valid_from"], r["valid_until"], revoked, r["occurred_at"]),
                 legal_basis=r["legal_basis"], exemption=exemption, commercial=r["commercial"],
                 purpose=r["grant_purpose"])


def _use_item(r: asyncpg.Record, choices: _Choices) -> HistoryItem:
    held = choices.at(r["opt_out_state_position"], r["grant_id"])
    terms = _use_terms(r)
    reason = Reason(int(decision.decide(held, terms)[0]))
    exemption = _label(terms.exemption.basis) if reason == Reason.OPTED_OUT_EXEMPT and terms.exemption else None
    finer = [LABELS[scope] for scope in held.finer if decision.covers(scope, terms)]
    words = decision.WORDS[reason].format(exemption=exemption.label if exemption else "",
                                          reference=terms.exemption.reference if terms.exemption else "",
                                          choice=", ".join(finer))
    applied = {Reason.OPTED_OUT_CONSENTED: True, Reason.CONSENTED: True, Reason.OPTED_OUT_EXEMPT: False}.get(reason)
    purpose = _label(r["purpose"])
    assert purpose is not None
    return HistoryItem(
        position=r["position"],
        recorded_at=_ts(r["recorded_at"]),
        kind="data-use",
        summary=f"{r['organisation_name']} used your data for {purpose.label}",
        event_type="DataUseRecorded",
        grant_id=r["grant_id"],
        organisation=Organisation(code=r["organisation_code"], name=r["organisation_name"]),
        purpose=purpose,
        purpose_description=r["purpose_description"],
        legal_basis=_label(r["legal_basis"]),
        datasets=list(r["datasets"]),
        access_method=_label(r["access_method"]),
        occurred_at=_ts(r["occurred_at"]),
        opt_out=words,
        exemption=exemption,
        consent_applied=applied,
    )


async def history(
    conn: asyncpg.Connection, nhs_number: str, before: int | None, limit: int
) -> HistoryPage:
    """Newest first; ``before`` is the cursor (a position, exclusive)."""
    stem = int(nhs_number[:9])
    upper = before if before is not None else 2**62
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        as_of = await projection_position(conn, "choices", "uses")
        choice_rows = await conn.fetch(
            "SELECT * FROM patient_choice_history WHERE stem = $1 AND position <= $2 ORDER BY position",
            stem, as_of,
        )
        cohort_ids = await cohorts_containing(conn, stem)
        use_rows = await conn.fetch(
            "SELECT d.*, g.organisation_name, g.purpose_description, g.legal_basis, g.valid_from, g.valid_until,"
            " g.revoked_position, g.commercial, g.purpose AS grant_purpose, g.exemption_basis AS grant_exemption_basis,"
            " g.exemption_reference AS grant_exemption_reference"
            " FROM data_uses_view d JOIN grants_view g USING (grant_id)"
            " WHERE d.cohort_id = ANY($1::bytea[]) AND d.position < $2 AND d.position <= $4"
            " ORDER BY d.position DESC LIMIT $3",
            cohort_ids, upper, limit + 1, as_of,
        ) if cohort_ids else []
    choices = _Choices(choice_rows)
    items = [_choice_item(r) for r in reversed(choice_rows) if r["position"] < upper][: limit + 1]
    items += [_use_item(r, choices) for r in use_rows]
    items.sort(key=lambda i: i.position, reverse=True)
    more = len(items) > limit
    items = items[:limit]
    return HistoryPage(
        nhs_number=nhs_number,
        as_of=as_of,
        items=items,
        next_cursor=str(items[-1].position) if more and items else None,
    )


async def register(conn: asyncpg.Connection, grant_id: str | None = None) -> Register:
    """Every grant, or only ``grant_id`` (an empty register if there is no such grant)."""
    now = datetime.now(timezone.utc)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        as_of = await projection_position(conn, "uses")
        rows = await conn.fetch(
            "SELECT g.*, coalesce(c.patients, 0) AS patients FROM grants_view g"
            " LEFT JOIN grant_coverage c USING (grant_id) WHERE $1::text IS NULL OR g.grant_id = $1"
            " ORDER BY g.position", grant_id
        )
        approval_rows = await conn.fetch(
            "SELECT * FROM grant_approvals WHERE $1::text IS NULL OR grant_id = $1 ORDER BY position", grant_id)
        output_rows = await conn.fetch(
            "SELECT * FROM grant_outputs WHERE $1::text IS NULL OR grant_id = $1 ORDER BY position", grant_id)
        value_rows = await conn.fetch(
            "SELECT * FROM grant_value WHERE $1::text IS NULL OR grant_id = $1 ORDER BY position", grant_id)
    outputs: dict[str, list[OutputView]] = {}
    for o in output_rows:
        outputs.setdefault(o["grant_id"], []).append(OutputView(
            kind=o["kind"], identifier=o["identifier"], title=o["title"], benefit=o["benefit"], position=o["position"]))
    values_by_grant: dict[str, list[asyncpg.Record]] = {}
    for v in value_rows:
        values_by_grant.setdefault(v["grant_id"], []).append(v)
    approvals: dict[str, list[GrantApproval]] = {}
    for a in approval_rows:
        approvals.setdefault(a["grant_id"], []).append(GrantApproval(
            approval=a["approval"], organisation=Organisation(code=a["organisation_code"], name=a["organisation_name"]),
            reference=a["reference"], position=a["position"]))
    grants = []
    for r in rows:
        purpose, basis = _label(r["purpose"]), _label(r["legal_basis"])
        assert purpose is not None and basis is not None
        recorded = approvals.get(r["grant_id"], [])
        pending = [k for k in r["requires"] if k not in {a.approval for a in recorded}]
        grants.append(RegisterEntry(
            grant_id=r["grant_id"],
            organisation=Organisation(code=r["organisation_code"], name=r["organisation_name"]),
            purpose=purpose,
            purpose_description=r["purpose_description"],
            patient_benefit=r["patient_benefit"],
            legal_basis=basis,
            datasets=list(r["datasets"]),
            commercial=r["commercial"],
            valid_from=_ts(r["valid_from"]),
            valid_until=_ts(r["valid_until"]),
            status=grant_status(r["valid_from"], r["valid_until"], r["revoked_position"] is not None, now,
                                pending=bool(pending)),
            approvals=recorded,
            pending=pending,
            benefits=_benefits(r["benefits"], outputs.get(r["grant_id"], []), now),
            commercial_terms=msgspec.json.decode(r["commercial_terms"], type=CommercialTerms)
            if r["commercial_terms"] else None,
            outputs=outputs.get(r["grant_id"], []),
            value=_value(values_by_grant.get(r["grant_id"], [])),
            revoked_at=_ts(r["revoked_at"]) if r["revoked_at"] else None,
            uses=r["uses"],
            patients_covered=suppressed(r["patients"]),
            opt_outs_applied=Terms(status="active", legal_basis=r["legal_basis"],
                                   exemption=Exemption(basis=r["exemption_basis"], reference=r["exemption_reference"])
                                   if r["exemption_basis"] else None).opt_outs_apply,
            opt_out_exemption=_label(r["exemption_basis"]),
            opted_out_included=suppressed(r["opted_out_included"]),
            position=r["position"],
            revoked_position=r["revoked_position"],
        ))
    return Register(as_of=as_of, grants=grants)


async def grant_uses(conn: asyncpg.Connection, grant_id: str, limit: int = 1000) -> list[RegisteredUse]:
    """The newest ``limit`` data uses under a grant, newest first."""
    rows = await conn.fetch(
        "SELECT * FROM data_uses_view WHERE grant_id = $1 ORDER BY position DESC LIMIT $2", grant_id, limit)
    uses = []
    for r in rows:
        purpose, method = _label(r["purpose"]), _label(r["access_method"])
        assert purpose is not None and method is not None
        uses.append(RegisteredUse(
            position=r["position"], use_id=r["use_id"], purpose=purpose, datasets=list(r["datasets"]),
            access_method=method, occurred_at=_ts(r["occurred_at"]), recorded_at=_ts(r["recorded_at"]),
            opt_out_state_position=r["opt_out_state_position"], patients=suppressed(r["cohort_size"]),
            opted_out_included=suppressed(r["opted_out_included"]), exemption=_label(r["exemption_basis"]),
        ))
    return uses


REGISTER_COLUMNS = (
    "grant_id", "organisation_code", "organisation_name", "purpose", "purpose_description", "patient_benefit",
    "legal_basis", "datasets", "commercial", "valid_from", "valid_until", "status", "revoked_at", "uses",
    "patients_covered", "opt_outs_applied", "opt_out_exemption", "opted_out_included",
)


def register_rows(reg: Register) -> list[list[str]]:
    out = [list(REGISTER_COLUMNS)]
    for g in reg.grants:
        out.append([
            g.grant_id, g.organisation.code, g.organisation.name, g.purpose.code, g.purpose_description,
            g.patient_benefit, g.legal_basis.code, ";".join(g.datasets), str(g.commercial).lower(),
            g.valid_from, g.valid_until, g.status, g.revoked_at or "", str(g.uses), _csv_count(g.patients_covered),
            str(g.opt_outs_applied).lower(), g.opt_out_exemption.code if g.opt_out_exemption else "",
            _csv_count(g.opted_out_included),
        ])
    return out


def _csv_count(count: int | None) -> str:
    """A suppressed count in CSV: the number, or "<10"."""
    return "<10" if count is None else str(count)


def _benefits(stored: str | None, outputs: list[OutputView], now: datetime) -> list[BenefitStatus]:
    """Each promised benefit with the outputs that deliver it; overdue once due with none."""
    promised = msgspec.json.decode(stored, type=list[Benefit]) if stored else []
    out = []
    for i, b in enumerate(promised):
        delivered = [o.identifier for o in outputs if o.benefit == i]
        out.append(BenefitStatus(description=b.description, measure=b.measure, target=b.target, due=_ts(b.due),
                                 delivered_by=delivered, overdue=not delivered and b.due <= now))
    return out


def _value(rows: list[asyncpg.Record]) -> list[ValueView]:
    by_currency: dict[str, list[asyncpg.Record]] = {}
    for v in rows:
        by_currency.setdefault(v["currency"], []).append(v)
    return [ValueView(currency=currency,
                      received=sum(v["amount"] for v in vs if v["direction"] == "received"),
                      allocated=sum(v["amount"] for v in vs if v["direction"] == "allocated"),
                      allocations=[Allocation(care_service=v["care_service"], amount=v["amount"],
                                              position=v["position"]) for v in vs if v["direction"] == "allocated"])
            for currency, vs in sorted(by_currency.items())]

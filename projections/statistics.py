"""Public statistics from the projection tables, suppressed where they count patients."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from contracts.bodies import (
    ChoiceCount,
    CommercialShare,
    DatasetAccess,
    GrantUses,
    Labelled,
    MonthlyChoices,
    PurposeCount,
    Statistics,
    ValueTotal,
)
from contracts.codes import LABELS, OptOutScope, values
from contracts.disclosure import suppressed
from contracts.values import Organisation

from .reads import projection_position

# Beyond this many days of history the charts count per month, not per day.
DAILY_UP_TO_DAYS = 62


async def statistics(conn: asyncpg.Connection) -> Statistics:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        as_of = await projection_position(conn, "choices", "uses")
        span = await conn.fetchrow(
            "SELECT min(recorded_at) AS first, max(recorded_at) AS last FROM patient_choice_history"
            " WHERE event_type IN ('OptOutRegistered', 'OptOutWithdrawn')")
        period = _period(span["first"], span["last"])
        fmt = "YYYY-MM-DD" if period == "day" else "YYYY-MM"
        # Each cell is counted exactly, then suppressed on its own (never a sum of suppressed cells).
        choices = await conn.fetch(
            f"SELECT to_char(date_trunc('{period}', recorded_at AT TIME ZONE 'UTC'), '{fmt}') AS period,"
            " scope, channel,"
            " count(*) FILTER (WHERE event_type = 'OptOutRegistered') AS opt_outs,"
            " count(*) FILTER (WHERE event_type = 'OptOutWithdrawn') AS opt_ins"
            " FROM patient_choice_history WHERE event_type IN ('OptOutRegistered', 'OptOutWithdrawn')"
            " GROUP BY GROUPING SETS ((1, scope), (scope, channel)) ORDER BY 1, 2, 3")
        monthly = await conn.fetch(
            "SELECT to_char(date_trunc('month', recorded_at AT TIME ZONE 'UTC'), 'YYYY-MM') AS month, scope, channel,"
            " count(*) FILTER (WHERE event_type = 'OptOutRegistered') AS opt_outs,"
            " count(*) FILTER (WHERE event_type = 'OptOutWithdrawn') AS opt_ins"
            " FROM patient_choice_history WHERE event_type IN ('OptOutRegistered', 'OptOutWithdrawn')"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
        per_grant = await conn.fetch(
            "SELECT grant_id, organisation_code, organisation_name, purpose, commercial, uses FROM grants_view"
            " ORDER BY position")
        datasets = await conn.fetch(
            "WITH access AS (SELECT unnest(datasets) AS dataset, grant_id, organisation_code FROM grants_view),"
            " used AS (SELECT unnest(d.datasets) AS dataset, g.organisation_code FROM data_uses_view d"
            "          JOIN grants_view g USING (grant_id)),"
            " top AS (SELECT DISTINCT ON (dataset) dataset, organisation_code, count(*) AS n,"
            "         sum(count(*)) OVER (PARTITION BY dataset) AS total"
            "         FROM used GROUP BY dataset, organisation_code ORDER BY dataset, count(*) DESC, organisation_code)"
            " SELECT a.dataset, count(DISTINCT a.organisation_code) AS organisations,"
            " count(DISTINCT a.grant_id) AS grants, coalesce(max(t.total), 0) AS uses,"
            " max(t.n) AS top_uses, max(t.organisation_code) AS top_organisation"
            " FROM access a LEFT JOIN top t USING (dataset) GROUP BY a.dataset ORDER BY a.dataset")
        opted_out = await conn.fetch(
            "SELECT scope, count(*) AS patients FROM patient_choices WHERE opted_out GROUP BY scope")
        purposes = await conn.fetch(
            "SELECT g.purpose, count(DISTINCT g.grant_id) AS grants, count(d.position) AS uses"
            " FROM grants_view g LEFT JOIN data_uses_view d USING (grant_id) GROUP BY g.purpose ORDER BY g.purpose")
        value = await conn.fetch(
            "SELECT currency, coalesce(sum(amount) FILTER (WHERE direction = 'received'), 0) AS received,"
            " coalesce(sum(amount) FILTER (WHERE direction = 'allocated'), 0) AS allocated"
            " FROM grant_value GROUP BY currency ORDER BY currency")
        share = await conn.fetchrow(
            "SELECT count(*) AS grants, count(*) FILTER (WHERE commercial) AS commercial_grants,"
            " coalesce(sum(uses), 0) AS uses, coalesce(sum(uses) FILTER (WHERE commercial), 0) AS commercial_uses"
            " FROM grants_view")
    return Statistics(
        as_of=as_of,
        period=period,
        choices_over_time=[_choice_count(r) for r in choices if r["period"] is not None],
        choices_by_channel=[_choice_count(r) for r in choices if r["channel"] is not None],
        opted_out_now={scope: suppressed(next((r["patients"] for r in opted_out if r["scope"] == scope), 0))
                       for scope in values(OptOutScope)},
        choices_by_month=[MonthlyChoices(month=r["month"], scope=r["scope"], channel=r["channel"],
                                         opt_outs=suppressed(r["opt_outs"]), opt_ins=suppressed(r["opt_ins"]))
                          for r in monthly],
        uses_by_grant=[GrantUses(grant_id=r["grant_id"],
                                 organisation=Organisation(code=r["organisation_code"], name=r["organisation_name"]),
                                 purpose=Labelled(code=r["purpose"], label=LABELS.get(r["purpose"], r["purpose"])),
                                 commercial=r["commercial"], uses=r["uses"]) for r in per_grant],
        datasets=[DatasetAccess(dataset=r["dataset"], organisations=r["organisations"], grants=r["grants"],
                                uses=int(r["uses"]), largest_organisation=r["top_organisation"],
                                largest_organisation_uses=int(r["top_uses"] or 0)) for r in datasets],
        uses_by_purpose=[PurposeCount(purpose=Labelled(code=r["purpose"], label=LABELS.get(r["purpose"], r["purpose"])),
                                      uses=r["uses"], grants=r["grants"]) for r in purposes],
        value=[ValueTotal(currency=r["currency"], received=int(r["received"]), allocated=int(r["allocated"]))
               for r in value],
        commercial=CommercialShare(grants=share["grants"], commercial_grants=share["commercial_grants"],
                                   uses=int(share["uses"]), commercial_uses=int(share["commercial_uses"])),
    )


def _period(first: datetime | None, last: datetime | None) -> str:
    if first is None or last is None:
        return "day"
    return "day" if (last - first).days <= DAILY_UP_TO_DAYS else "month"


def _choice_count(r: asyncpg.Record) -> ChoiceCount:
    return ChoiceCount(period=r["period"], scope=r["scope"], channel=r["channel"],
                       opt_outs=suppressed(r["opt_outs"]), opt_ins=suppressed(r["opt_ins"]))

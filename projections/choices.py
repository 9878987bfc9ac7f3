"""The choices projection: current choice per patient and scope, consents
per grant, and every choice change (for the patient's history)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from contracts.entry import Entry

from .runner import Projection

CHOICE_EVENTS = frozenset({"OptOutRegistered", "OptOutWithdrawn", "StudyConsentGiven", "StudyConsentWithdrawn"})
# Someone other than the patient read the patient's own data: their history says so.
READ_EVENT = "PersonalDataRead"


def stem_of(nhs_number: str) -> int:
    return int(nhs_number[:9])


def moment(recorded_at: str) -> datetime:
    return datetime.fromisoformat(recorded_at)


class ChoicesProjection(Projection):
    name = "choices"
    tables = ("patient_choices", "patient_consents", "patient_choice_history")

    async def apply(self, conn: asyncpg.Connection, entries: Sequence[Entry]) -> None:
        choices: dict[tuple[int, str], tuple[bool, int, datetime]] = {}
        consents: dict[tuple[int, str], tuple[bool, int, datetime]] = {}
        history: list[tuple[object, ...]] = []
        for e in entries:
            p = e.payload
            if e.event_type == READ_EVENT and p.nhs_number is not None and not p.by_patient:
                reader = f"{p.recorded_by} ({p.reader_org})" if p.reader_org else p.recorded_by
                history.append((stem_of(p.nhs_number), e.position, e.event_type, None, None, p.what,
                                p.role, None, moment(e.recorded_at), reader))
                continue
            if e.event_type not in CHOICE_EVENTS:
                continue
            stem, at = stem_of(p.nhs_number), moment(e.recorded_at)
            if e.event_type in ("OptOutRegistered", "OptOutWithdrawn"):
                choices[(stem, p.scope)] = (e.event_type == "OptOutRegistered", e.position, at)
                history.append((stem, e.position, e.event_type, p.scope, None, p.channel,
                                p.actor.kind, p.actor.proxy_role, at, None))
            else:
                consents[(stem, p.grant_id)] = (e.event_type == "StudyConsentGiven", e.position, at)
                history.append((stem, e.position, e.event_type, None, p.grant_id, None,
                                p.actor.kind, p.actor.proxy_role, at, None))
        if choices:
            keys = list(choices)
            await conn.execute(
                f"INSERT INTO {self.t('patient_choices')} (stem, scope, opted_out, position, changed_at)"
                " SELECT * FROM unnest($1::int[], $2::text[], $3::bool[], $4::bigint[], $5::timestamptz[])"
                " ON CONFLICT (stem, scope) DO UPDATE SET opted_out = excluded.opted_out,"
                " position = excluded.position, changed_at = excluded.changed_at",
                [k[0] for k in keys], [k[1] for k in keys], [choices[k][0] for k in keys],
                [choices[k][1] for k in keys], [choices[k][2] for k in keys],
            )
        if consents:
            given = [k for k, v in consents.items() if v[0]]
            withdrawn = [k for k, v in consents.items() if not v[0]]
            if withdrawn:
                await conn.execute(
                    f"DELETE FROM {self.t('patient_consents')} c USING unnest($1::int[], $2::text[]) AS w(stem, grant_id)"
                    " WHERE c.stem = w.stem AND c.grant_id = w.grant_id",
                    [k[0] for k in withdrawn], [k[1] for k in withdrawn],
                )
            if given:
                await conn.execute(
                    f"INSERT INTO {self.t('patient_consents')} (stem, grant_id, position, given_at)"
                    " SELECT * FROM unnest($1::int[], $2::text[], $3::bigint[], $4::timestamptz[])"
                    " ON CONFLICT (stem, grant_id) DO UPDATE SET position = excluded.position,"
                    " given_at = excluded.given_at",
                    [k[0] for k in given], [k[1] for k in given],
                    [consents[k][1] for k in given], [consents[k][2] for k in given],
                )
        if history:
            await conn.copy_records_to_table(
                self.t("patient_choice_history"),
                records=history,
                columns=["stem", "position", "event_type", "scope", "grant_id", "channel",
                         "actor_kind", "proxy_role", "recorded_at", "reader"],
            )

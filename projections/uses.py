"""The uses projection: grants, data uses, each cohort cut into blocks (for
patient history) and each grant's coverage (the union of its cohorts)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import msgspec
import numpy as np

from contracts import cohort as cohorts
from contracts.entry import Entry

from . import blocks
from .choices import moment
from .runner import Projection


async def load_cohort(conn: asyncpg.Connection, cohort_id: bytes) -> np.ndarray:
    row = await conn.fetchrow("SELECT encoding, members FROM cohorts WHERE cohort_id = $1", cohort_id)
    if row is None:
        raise LookupError(f"cohort {cohort_id.hex()} is referenced by the ledger but not stored")
    return await asyncio.to_thread(cohorts.decode_members, row["encoding"], row["members"])


def _blocks(cohort_id: bytes, stems: np.ndarray) -> list[tuple[int, str, bytes, bytes]]:
    return [(b, kind, cohort_id, data) for b, kind, data in blocks.split(stems)]


def _coverage(previous: asyncpg.Record | None, stems: np.ndarray) -> tuple[int, str, bytes]:
    """(patients, encoding, members) of a grant's coverage with this cohort added."""
    if previous is not None:
        stems = cohorts.sorted_unique(np.concatenate([cohorts.decode_members(previous["encoding"],
                                                                             previous["members"]), stems]))
    return len(stems), *cohorts.encode_members(stems)


class UsesProjection(Projection):
    name = "uses"
    tables = ("grants_view", "data_uses_view", "cohort_blocks", "grant_coverage", "grant_approvals",
              "grant_outputs", "grant_value")

    async def apply(self, conn: asyncpg.Connection, entries: Sequence[Entry]) -> None:
        for e in entries:
            p = e.payload
            if e.event_type == "AccessGranted":
                x = p.opt_out_exemption
                await conn.execute(
                    f"INSERT INTO {self.t('grants_view')} (grant_id, position, organisation_code,"
                    " organisation_name, purpose, purpose_description, patient_benefit, legal_basis, datasets,"
                    " commercial, valid_from, valid_until, exemption_basis, exemption_reference, requires, benefits,"
                    " commercial_terms)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
                    p.grant_id, e.position, p.organisation.code, p.organisation.name, p.purpose.code,
                    p.purpose.description, p.purpose.patient_benefit, p.legal_basis, list(p.datasets),
                    p.commercial, p.valid_from, p.valid_until,
                    x.basis if x else None, x.reference if x else None, list(p.requires or ()),
                    msgspec.json.encode(p.benefits).decode() if p.benefits else None,
                    msgspec.json.encode(p.commercial_terms).decode() if p.commercial_terms else None,
                )
            elif e.event_type == "OutputRecorded":
                await conn.execute(
                    f"INSERT INTO {self.t('grant_outputs')} (grant_id, position, kind, identifier, title, benefit,"
                    " recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    p.grant_id, e.position, p.kind, p.identifier, p.title, p.benefit, moment(e.recorded_at))
            elif e.event_type in ("ValueReceived", "ValueAllocated"):
                await conn.execute(
                    f"INSERT INTO {self.t('grant_value')} (grant_id, position, direction, amount, currency,"
                    " care_service, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    p.grant_id, e.position, "received" if e.event_type == "ValueReceived" else "allocated",
                    p.amount, p.currency, getattr(p, "care_service", None), moment(e.recorded_at))
            elif e.event_type == "GrantApproved":
                await conn.execute(
                    f"INSERT INTO {self.t('grant_approvals')} (grant_id, approval, organisation_code,"
                    " organisation_name, reference, position, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                    " ON CONFLICT DO NOTHING",
                    p.grant_id, p.approval, p.organisation.code, p.organisation.name, p.reference, e.position,
                    moment(e.recorded_at),
                )
            elif e.event_type == "AccessRevoked":
                await conn.execute(
                    f"UPDATE {self.t('grants_view')} SET revoked_position = $2, revoked_at = $3 WHERE grant_id = $1",
                    p.grant_id, e.position, moment(e.recorded_at),
                )
            elif e.event_type == "DataUseRecorded":
                await self._data_use(conn, e)

    async def _data_use(self, conn: asyncpg.Connection, e: Entry) -> None:
        p = e.payload
        cohort_id = bytes.fromhex(p.cohort_id)
        x = p.exemption_applied
        seen = await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {self.t('data_uses_view')} WHERE cohort_id = $1)", cohort_id
        )
        await conn.execute(
            f"INSERT INTO {self.t('data_uses_view')} (position, use_id, grant_id, cohort_id, cohort_size, purpose,"
            " datasets, access_method, occurred_at, recorded_at, opt_out_state_position, opted_out_included,"
            " consented_included, exemption_basis, exemption_reference, organisation_code)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            e.position, p.use_id, p.grant_id, cohort_id, p.cohort_size, p.purpose, list(p.datasets),
            p.access_method, p.occurred_at, moment(e.recorded_at), p.opt_out_state_position,
            p.opted_out_included, p.consented_included, x.basis if x else None, x.reference if x else None,
            p.organisation_code,
        )
        await conn.execute(
            f"UPDATE {self.t('grants_view')} SET uses = uses + 1,"
            " opted_out_included = opted_out_included + $2 WHERE grant_id = $1",
            p.grant_id, p.opted_out_included,
        )
        # Millions of members: cut into blocks and merged into the coverage in a
        # worker thread, so the service's event loop keeps serving meanwhile.
        stems = await load_cohort(conn, cohort_id)
        if not seen:
            await conn.copy_records_to_table(
                self.t("cohort_blocks"),
                records=await asyncio.to_thread(_blocks, cohort_id, stems),
                columns=["block", "kind", "cohort_id", "members"],
            )
        row = await conn.fetchrow(
            f"SELECT encoding, members FROM {self.t('grant_coverage')} WHERE grant_id = $1", p.grant_id
        )
        patients, encoding, members = await asyncio.to_thread(_coverage, row, stems)
        await conn.execute(
            f"INSERT INTO {self.t('grant_coverage')} (grant_id, patients, encoding, members)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (grant_id) DO UPDATE SET patients = excluded.patients,"
            " encoding = excluded.encoding, members = excluded.members",
            p.grant_id, patients, encoding, members,
        )

"""The assessor port: applies the one opt-out rule to a cohort at a position,
from the ledger's entries or from the in-memory decision state."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass

import asyncpg
import numpy as np

from contracts import decision
from contracts.decision import Reason, Terms
from contracts.nhs_number import NhsNumber
from projections.optout_filter import OptOutFilter
from projections.runner import Runner
from service.domain.aggregates import patient_aggregate_id
from service.store.event_log import StoreUnavailable
from service.store.event_store import EventStore


@dataclass(frozen=True)
class Assessment:
    """The rule's verdict on a cohort as the ledger stood at ``position``:
    how many members each ``Reason`` applies to."""

    position: int
    found: dict[Reason, int]

    @property
    def excluded(self) -> int:
        return sum(n for r, n in self.found.items() if r not in decision.INCLUDED)


class OptOutAssessor(ABC):
    """Applies the rule to a cohort at a past or present position."""

    @abstractmethod
    async def assess(self, conn: asyncpg.Connection, stems: np.ndarray, grant_id: str, terms: Terms,
                     position: int) -> Assessment:
        """Each member's reason under ``terms``, with their choices as of ``position``."""


class LedgerOptOutAssessor(OptOutAssessor):
    """Replays each cohort member's own events from the ledger into a fresh
    decision state: exact at any position, and fine for cohorts of
    thousands; the in-memory state serves national-scale cohorts."""

    def __init__(self, store: EventStore):
        self.store = store

    async def assess(self, conn: asyncpg.Connection, stems: np.ndarray, grant_id: str, terms: Terms,
                     position: int) -> Assessment:
        ids = [patient_aggregate_id(n) for n in cohort_numbers(stems)]
        state = OptOutFilter()
        state.follow([s.entry for s in await self.store.aggregates_events(conn, ids, position)])
        return Assessment(position, decision.counts(state.assess(stems, grant_id, terms)))


class ProjectedOptOutAssessor(OptOutAssessor):
    """Answers from the in-memory decision state: a 5M cohort is a few
    hundred milliseconds of bitmap lookups, not millions of ledger reads.
    The state may be ahead of ``position``; it answers as of ``position``."""

    def __init__(self, opt_outs: OptOutFilter, runner: Runner, wait: float = 2.0):
        self.opt_outs = opt_outs
        self.runner = runner
        self.wait = wait

    async def assess(self, conn: asyncpg.Connection, stems: np.ndarray, grant_id: str, terms: Terms,
                     position: int) -> Assessment:
        if not await self.runner.wait_for(position, self.wait, lambda: self.opt_outs.position):
            raise StoreUnavailable(f"the opt-out state has not yet reached position {position}")
        # Millions of lookups off the event loop, on a copy `follow` does not change meanwhile.
        reasons = await asyncio.to_thread(self.opt_outs.snapshot().assess, stems, grant_id, terms, position)
        return Assessment(position, decision.counts(reasons))


def cohort_numbers(stems: np.ndarray) -> list[str]:
    return [NhsNumber.from_stem(int(s)) for s in stems]

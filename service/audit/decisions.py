"""`consent-ledger verify --decisions`: replay every entry through the one
rule and check what each ``DataUseRecorded`` states.

For a data use at position ``p`` that occurred at ``T``, with its cohort
(bytes whose SHA-256 must be the ``cohort_id``):

* the use's own statements hold at the position it names
  (``opt_out_state_position`` < ``p``): ``opted_out_included``,
  ``consented_included`` and ``exemption_applied`` are what the rule gives
  there, ``cohort_size`` is the cohort's, and organisation, purpose, legal
  basis and datasets are the grant's;
* the decision was right when the use occurred: at the last position before
  ``p`` recorded at or before ``T``, the grant was in force and the rule
  lets every member in.

``recorded_at`` must never decrease along the log (that is what makes "the
state at an instant" a prefix of the log).  Each finding names its position.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from contracts import bulk, decision
from contracts.decision import Claim, Reason
from contracts.entry import Entry, decode_entry, format_recorded_at
from projections.optout_filter import OptOutFilter
from service.audit.chain import Failure

_BATCH = 4096
_CACHED_COHORTS = 8


class DecisionAudit:
    def __init__(self, cohort: Callable[[str], bytes | None]):
        self._cohort_bytes = cohort
        self._cohorts: OrderedDict[str, np.ndarray | Failure] = OrderedDict()
        self.state = OptOutFilter()
        self._pending: list[Entry] = []
        # Distinct recorded_at values in log order, each with the last position recorded then.
        self._times: list[str] = []
        self._time_positions: list[int] = []
        self.findings: list[Failure] = []
        self.uses = 0

    def add(self, position: int, entry: bytes) -> None:
        """Feed the entries in order, after their hashes were checked."""
        try:
            e = decode_entry(entry)
        except ValueError as exc:
            self.findings.append(Failure(position, "entry", f"the entry does not decode as a ledger event: {exc}"))
            return
        if self._times and e.recorded_at < self._times[-1]:
            self.findings.append(Failure(position, "time", f"recorded_at {e.recorded_at} is earlier than the "
                                                           f"entry before ({self._times[-1]})"))
        elif self._times and e.recorded_at == self._times[-1]:
            self._time_positions[-1] = position
        else:
            self._times.append(e.recorded_at)
            self._time_positions.append(position)
        if e.event_type == "DataUseRecorded":
            self._apply()
            self.uses += 1
            self._check_use(e)
        self._pending.append(e)
        if len(self._pending) >= _BATCH:
            self._apply()

    def _apply(self) -> None:
        self.state.follow(self._pending)
        self._pending.clear()

    def _position_at(self, instant: str) -> int:
        """The last position so far recorded at or before ``instant``."""
        i = bisect.bisect_right(self._times, instant)
        return self._time_positions[i - 1] if i else 0

    def _cohort(self, cohort_id: str) -> np.ndarray | Failure:
        if cohort_id in self._cohorts:
            self._cohorts.move_to_end(cohort_id)
            return self._cohorts[cohort_id]
        data = self._cohort_bytes(cohort_id)
        found: np.ndarray | Failure
        if data is None:
            found = Failure(0, "cohort", f"cohort {cohort_id} is not available (a consent-ledger-export/1 file "
                                         "has no cohorts: export again)")
        elif hashlib.sha256(data).hexdigest() != cohort_id:
            found = Failure(0, "cohort", f"the bytes served for cohort {cohort_id} have another SHA-256")
        else:
            parsed = bulk.parse_lines(data)
            found = parsed.stems if parsed.ok else Failure(0, "cohort", f"cohort {cohort_id} holds invalid lines")
        self._cohorts[cohort_id] = found
        if len(self._cohorts) > _CACHED_COHORTS:
            self._cohorts.popitem(last=False)
        return found

    def _check_use(self, e: Entry) -> None:
        u, p = e.payload, e.position

        def finding(what: str, detail: str) -> None:
            self.findings.append(Failure(p, what, f"data use {u.use_id!r}: {detail}"))

        stems = self._cohort(u.cohort_id)
        if isinstance(stems, Failure):
            return finding(stems.what, stems.detail)
        record = self.state.grants.get(u.grant_id)
        if record is None:
            return finding("claim", f"no grant {u.grant_id!r} was recorded before it")
        g = record.granted
        stated = {"cohort_size": (u.cohort_size, len(stems)), "organisation_code": (u.organisation_code,
                  g.organisation.code), "purpose": (u.purpose, g.purpose.code), "legal_basis": (u.legal_basis,
                  g.legal_basis)}
        for name, (said, true) in stated.items():
            if said != true:
                finding("claim", f"says {name} {said!r}, but it is {true!r}")
        outside = sorted(set(u.datasets) - set(g.datasets))
        if outside:
            finding("claim", f"uses datasets outside the grant: {', '.join(outside)}")
        claimed = u.opt_out_state_position
        if claimed >= p:
            return finding("claim", f"names the state of position {claimed}, not before its own")
        terms = record.terms(claimed, u.occurred_at)
        if terms.status == "active":
            true = Claim.of(decision.counts(self.state.assess(stems, u.grant_id, terms, claimed)), terms)
            if (u.opted_out_included, u.consented_included) != (true.opted_out_included, true.consented_included):
                finding("claim", f"says {u.opted_out_included} opted-out patient(s) included "
                                 f"({u.consented_included} by consent); at position {claimed} the rule gives "
                                 f"{true.opted_out_included} ({true.consented_included} by consent)")
            said, expected = u.exemption_applied, true.exemption_applied
            # Older builds also named the exemption when the opted-out patients included had all consented.
            older = expected is None and said == terms.exemption and u.opted_out_included > 0
            if said != expected and not older:
                finding("claim", f"says exemption {said!r} applied; at position {claimed} the rule gives {expected!r}")
        instant = format_recorded_at(u.occurred_at)
        at = self._position_at(instant)
        terms = record.terms(at, u.occurred_at)
        if terms.status != "active":
            return finding("decision", f"the grant was {terms.status} when the use occurred ({instant}, "
                                       f"position {at})")
        found = decision.counts(self.state.assess(stems, u.grant_id, terms, at))
        refused = {r: n for r, n in found.items() if n and r not in decision.INCLUDED}
        if refused:
            finding("decision", f"{sum(refused.values())} member(s) of the cohort could not be included when the "
                                f"use occurred ({instant}, position {at}): "
                                + ", ".join(f"{n} {Reason(r).name.lower().replace('_', ' ')}"
                                            for r, n in sorted(refused.items())))

    def finish(self) -> None:
        self._apply()

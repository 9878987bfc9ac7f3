"""`consent-ledger verify-register`: the public register rebuilt from the
log's public entries, each checked against a signed checkpoint, and compared
row by row with what the service publishes.

Nothing here trusts the service: the entries must hash to leaves that the
inclusion proofs lead from to the signed root; the register is only what is
being checked."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import msgspec

from contracts import bodies, merkle, note
from contracts.decision import Terms, grant_status
from contracts.disclosure import shown, suppressed
from contracts.entry import decode_entry, leaf_hash
from contracts.events import AccessGranted
from service.audit.client import HttpSource, SourceError

PAGE = 1000


@dataclass(frozen=True)
class Finding:
    where: str  # a grant id, or "position N"
    what: str


@dataclass
class Rebuilt:
    """The register as the public entries up to ``as_of`` say it must be."""

    granted: dict[str, tuple[int, AccessGranted]] = field(default_factory=dict)
    revoked: dict[str, tuple[int, str]] = field(default_factory=dict)
    approvals: dict[str, dict[str, tuple[str, str, int]]] = field(default_factory=dict)  # kind -> (org, ref, pos)
    outputs: dict[str, list[tuple[str, str, int | None, int]]] = field(default_factory=dict)
    value: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)  # (currency, direction) -> sum
    uses: Counter[str] = field(default_factory=Counter)
    opted_out_included: Counter[str] = field(default_factory=Counter)
    entries: int = 0
    withheld: int = 0


@dataclass(frozen=True)
class RegisterOutcome:
    checkpoint_size: int
    as_of: int
    grants: int
    rebuilt: Rebuilt
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def report(self) -> str:
        if self.findings:
            lines = [f"FAILED: {len(self.findings)} register row(s) or entries the log does not support "
                     f"(register as of position {self.as_of}, checkpoint size {self.checkpoint_size}):"]
            lines += [f"  {f.where}: {f.what}" for f in self.findings[:50]]
            if len(self.findings) > 50:
                lines.append(f"  ... {len(self.findings) - 50} more")
            return "\n".join(lines)
        withheld = (f"; {self.rebuilt.withheld} data use(s) of fewer than 10 patients are not public, so use "
                    "counts are checked as lower bounds" if self.rebuilt.withheld else "")
        return (f"OK: {self.grants} register row(s) match the log as of position {self.as_of}: "
                f"{self.rebuilt.entries} public entries, each proved against the checkpoint of size "
                f"{self.checkpoint_size}{withheld}")


def verify_register(source: HttpSource, verifiers: list[note.Verifier], *, wait_seconds: float = 30.0
                    ) -> RegisterOutcome:
    register = msgspec.json.decode(_must(source, "/v1/register"), type=bodies.Register)
    # The register reflects the log up to `as_of`; wait (bounded) for a signed checkpoint that covers it.
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            cp = note.open_checkpoint(source.checkpoint(), verifiers)
        except note.NoteError as exc:
            raise SourceError(f"the checkpoint does not verify with the given key: {exc}") from None
        if cp.size >= register.as_of:
            break
        if time.monotonic() > deadline:
            raise SourceError(f"no signed checkpoint covers the register's position {register.as_of} "
                              f"(latest: {cp.size}) after {wait_seconds:.0f} s")
        time.sleep(0.5)
    findings: list[Finding] = []
    rebuilt = _rebuild(source, cp, register.as_of, findings)
    findings += compare(register, rebuilt, datetime.now(timezone.utc))
    return RegisterOutcome(cp.size, register.as_of, len(register.grants), rebuilt, findings)


def _must(source: HttpSource, path: str) -> bytes:
    body = source.get(path)
    assert body is not None
    return body


def _rebuild(source: HttpSource, cp: note.Checkpoint, as_of: int, findings: list[Finding]) -> Rebuilt:
    rebuilt, after = Rebuilt(), 0
    while True:
        path = f"/v1/public-entries?after={after}&limit={PAGE}&tree_size={cp.size}"
        page = msgspec.json.decode(_must(source, path), type=bodies.PublicEntries)
        for e in page.entries:
            if e.position > as_of:
                return rebuilt
            raw = e.entry.encode()
            leaf = leaf_hash(raw)
            try:
                if leaf.hex() != e.leaf_hash:
                    raise merkle.ProofError("the entry's bytes do not hash to its leaf hash")
                merkle.verify_inclusion(e.position - 1, cp.size, leaf, [bytes.fromhex(h) for h in e.proof], cp.root)
                entry = decode_entry(raw)
            except (merkle.ProofError, ValueError) as exc:
                findings.append(Finding(f"position {e.position}", f"not provably in the log: {exc}"))
                continue
            rebuilt.entries += 1
            p: Any = entry.payload
            if entry.event_type == "AccessGranted":
                rebuilt.granted[p.grant_id] = (entry.position, p)
            elif entry.event_type == "GrantApproved":
                rebuilt.approvals.setdefault(p.grant_id, {}).setdefault(
                    p.approval, (p.organisation.code, p.reference, entry.position))
            elif entry.event_type == "OutputRecorded":
                rebuilt.outputs.setdefault(p.grant_id, []).append((p.kind, p.identifier, p.benefit, entry.position))
            elif entry.event_type in ("ValueReceived", "ValueAllocated"):
                key = (p.currency, "received" if entry.event_type == "ValueReceived" else "allocated")
                sums = rebuilt.value.setdefault(p.grant_id, {})
                sums[key] = sums.get(key, 0) + p.amount
            elif entry.event_type == "AccessRevoked":
                rebuilt.revoked.setdefault(p.grant_id, (entry.position, entry.recorded_at))
            elif entry.event_type == "DataUseRecorded":
                rebuilt.uses[p.grant_id] += 1
                rebuilt.opted_out_included[p.grant_id] += p.opted_out_included
        rebuilt.withheld += page.withheld
        if page.next_after is None or page.next_after >= as_of:
            return rebuilt
        after = page.next_after


def _instant(text: str | datetime) -> datetime:
    return text if isinstance(text, datetime) else datetime.fromisoformat(text)


def compare(register: bodies.Register, rebuilt: Rebuilt, now: datetime) -> list[Finding]:
    """Every way a register row differs from what the entries say it must be."""
    findings: list[Finding] = []
    listed = set()
    for row in register.grants:
        listed.add(row.grant_id)
        recorded = rebuilt.granted.get(row.grant_id)
        if recorded is None:
            findings.append(Finding(row.grant_id, "no public entry in the log records this grant"))
            continue
        position, g = recorded
        revoked = rebuilt.revoked.get(row.grant_id)
        exemption = g.opt_out_exemption
        approved = rebuilt.approvals.get(row.grant_id, {})
        outputs = sorted(rebuilt.outputs.get(row.grant_id, []), key=lambda o: o[3])
        value = sorted((c, d, n) for (c, d), n in rebuilt.value.get(row.grant_id, {}).items())
        pending = [k for k in g.requires or () if k not in approved]
        expected: dict[str, object] = {
            "position": position,
            "organisation": (g.organisation.code, g.organisation.name),
            "purpose": g.purpose.code,
            "purpose_description": g.purpose.description,
            "patient_benefit": g.purpose.patient_benefit,
            "legal_basis": g.legal_basis,
            "datasets": list(g.datasets),
            "commercial": g.commercial,
            "valid_from": _instant(g.valid_from),
            "valid_until": _instant(g.valid_until),
            "status": grant_status(_instant(g.valid_from), _instant(g.valid_until), revoked is not None, now,
                                   pending=bool(pending)),
            "approvals": sorted((k, *v) for k, v in approved.items()),
            "pending": pending,
            "outputs": outputs,
            "value": value,
            "benefits": [(b.description, b.measure, b.target, _instant(b.due),
                          sorted(o[1] for o in outputs if o[2] == i),
                          not any(o[2] == i for o in outputs) and _instant(b.due) <= now)
                         for i, b in enumerate(g.benefits or ())],
            "revoked_position": revoked[0] if revoked else None,
            "revoked_at": _instant(revoked[1]) if revoked else None,
            "opt_out_exemption": exemption.basis if exemption else None,
            "opt_outs_applied": Terms(status="active", legal_basis=g.legal_basis, exemption=exemption).opt_outs_apply,
        }
        actual: dict[str, object] = {
            "position": row.position,
            "organisation": (row.organisation.code, row.organisation.name),
            "purpose": row.purpose.code,
            "purpose_description": row.purpose_description,
            "patient_benefit": row.patient_benefit,
            "legal_basis": row.legal_basis.code,
            "datasets": row.datasets,
            "commercial": row.commercial,
            "valid_from": _instant(row.valid_from),
            "valid_until": _instant(row.valid_until),
            "status": row.status,
            "approvals": sorted((a.approval, a.organisation.code, a.reference, a.position) for a in row.approvals),
            "pending": list(row.pending),
            "outputs": [(o.kind, o.identifier, o.benefit, o.position) for o in row.outputs],
            "value": sorted([(v.currency, "received", v.received) for v in row.value if v.received]
                            + [(v.currency, "allocated", v.allocated) for v in row.value if v.allocated]),
            "benefits": [(b.description, b.measure, b.target, _instant(b.due), sorted(b.delivered_by), b.overdue)
                         for b in row.benefits],
            "revoked_position": row.revoked_position,
            "revoked_at": _instant(row.revoked_at) if row.revoked_at else None,
            "opt_out_exemption": row.opt_out_exemption.code if row.opt_out_exemption else None,
            "opt_outs_applied": row.opt_outs_applied,
        }
        for name, want in expected.items():
            if actual[name] != want:
                findings.append(Finding(row.grant_id, f"{name}: the register says {actual[name]!r}, "
                                                      f"the log says {want!r}"))
        uses, included = rebuilt.uses[row.grant_id], suppressed(rebuilt.opted_out_included[row.grant_id])
        if rebuilt.withheld == 0 and (row.uses, row.opted_out_included) != (uses, included):
            findings.append(Finding(row.grant_id, f"uses: the register says {row.uses} (opted-out patients "
                                                  f"included: {shown(row.opted_out_included)}), the log says {uses} "
                                                  f"({shown(included)})"))
        elif rebuilt.withheld and row.uses < uses:
            findings.append(Finding(row.grant_id, f"uses: the register says {row.uses}, fewer than the "
                                                  f"{uses} public data-use entries under this grant"))
    for grant_id in sorted(rebuilt.granted.keys() - listed):
        findings.append(Finding(grant_id, f"the log records this grant (position {rebuilt.granted[grant_id][0]}) "
                                          "but the register does not show it"))
    return findings

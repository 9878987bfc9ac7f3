"""The auditor's side: export the log, and verify it against a signed checkpoint.

Trusts only the verifier key.  Entries come from tlog-tiles entry bundles
(the exact stored bytes); the level-0 hash tiles are the log's claimed leaf
hashes, so the first entry whose recomputed leaf differs is named even when
the whole tail was rewritten with fresh hashes.

Export file (gzip, JSON lines):
    line 1:  {"format": "consent-ledger-export/2", "checkpoint": "<signed note>"}
    then:    [position, base64(entry bytes), base64(claimed leaf hash)]  one per entry
    and, just before the first entry that uses a cohort:
             {"cohort_id": "<hex>", "members": base64(canonical cohort bytes)}
Version 1 files (no cohort lines) are still read.

With ``--decisions`` every entry is also replayed through the one rule
(``decision_audit``) and each data use's statements are re-checked.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlsplit

import msgspec

from contracts import cohort as cohorts
from contracts import bulk, merkle, note
from contracts.merkle import TILE_WIDTH

from .audit import ChainVerifier, Failure
from .decision_audit import DecisionAudit

EXPORT_FORMAT = "consent-ledger-export/2"
READABLE_FORMATS = ("consent-ledger-export/1", EXPORT_FORMAT)


class ExportLine(msgspec.Struct, array_like=True):
    position: int
    entry: bytes
    leaf: bytes


class CohortLine(msgspec.Struct):
    cohort_id: str
    members: bytes


class _UsedCohort(msgspec.Struct):
    """The one field an exporter needs from a DataUseRecorded entry."""

    class Payload(msgspec.Struct):
        cohort_id: str

    payload: Payload


def used_cohort(entry: bytes) -> str | None:
    """The cohort a DataUseRecorded entry refers to (None for other events)."""
    if b'"event_type":"DataUseRecorded"' not in entry:
        return None
    return msgspec.json.decode(entry, type=_UsedCohort).payload.cohort_id


class SourceError(Exception):
    """The log could not be read (network, HTTP status, file format)."""


class Source(Protocol):
    def checkpoint(self) -> str: ...
    def entries(self, size: int) -> Iterator[tuple[int, bytes, bytes | None]]: ...
    def consistency(self, old: int, new: int) -> list[bytes] | None: ...
    def cohort(self, cohort_id: str) -> bytes | None: ...


# --- reading a live log ---------------------------------------------------------------


class HttpSource:
    """A running service, read over one keep-alive connection."""

    def __init__(self, url: str, token: str | None):
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SourceError(f"not an http(s) URL: {url}")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._conn = cls(parts.hostname, parts.port, timeout=60)
        self._prefix = parts.path
        self._token = token

    def get(self, path: str, *, auth: bool = False, missing_ok: bool = False) -> bytes | None:
        headers = {"Accept-Encoding": "identity"}
        if auth:
            if not self._token:
                raise SourceError("reading entries needs an auditor token: set CONSENT_LEDGER_TOKEN or --token")
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            self._conn.request("GET", self._prefix + path, headers=headers)
            response = self._conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise SourceError(f"GET {path}: {exc}") from None
        if response.status == 404 and missing_ok:
            return None
        if response.status != 200:
            raise SourceError(f"GET {path}: HTTP {response.status}: {body[:200].decode(errors='replace')}")
        return body

    def checkpoint(self) -> str:
        return self._must("/checkpoint").decode()

    def _must(self, path: str, *, auth: bool = False) -> bytes:
        body = self.get(path, auth=auth)
        assert body is not None
        return body

    def consistency(self, old: int, new: int) -> list[bytes] | None:
        body = json.loads(self._must(f"/v1/proofs/consistency?from={old}&to={new}"))
        return [bytes.fromhex(h) for h in body["hashes"]]

    def cohort(self, cohort_id: str) -> bytes | None:
        """A cohort's canonical bytes (the read is recorded by the service)."""
        return self.get(f"/v1/cohorts/{cohort_id}", auth=True, missing_ok=True)

    def entries(self, size: int) -> Iterator[tuple[int, bytes, bytes | None]]:
        for n in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
            width = min(TILE_WIDTH, size - n * TILE_WIDTH)
            bundle = self._must("/" + merkle.tile_path("entries", n, width), auth=True)
            # A log that lost leaves cannot serve their tile: then there is no claim to compare with.
            tile = self.get("/" + merkle.tile_path(0, n, width), missing_ok=True) or b""
            leaves = [tile[i:i + 32] for i in range(0, len(tile), 32)]
            offset, i = 0, 0
            while offset < len(bundle):
                length = int.from_bytes(bundle[offset:offset + 2], "big")
                entry = bundle[offset + 2:offset + 2 + length]
                offset += 2 + length
                yield n * TILE_WIDTH + i + 1, entry, leaves[i] if i < len(leaves) else None
                i += 1
            if i < width:
                return  # a short bundle: the verifier reports the first missing position


# --- reading an export ----------------------------------------------------------------------


class ExportSource:
    def __init__(self, path: Path):
        self._path = path
        try:
            with gzip.open(path, "rb") as f:
                header = json.loads(f.readline())
        except (OSError, ValueError, EOFError) as exc:
            raise SourceError(f"{path}: not a consent-ledger export: {exc}") from None
        if header.get("format") not in READABLE_FORMATS:
            raise SourceError(f"{path}: unknown export format {header.get('format')!r}")
        self._checkpoint = header["checkpoint"]
        # Compactly (about a byte a member) until a data use needs them.
        self._cohorts: dict[str, tuple[str, bytes]] = {}

    def checkpoint(self) -> str:
        return self._checkpoint

    def consistency(self, old: int, new: int) -> list[bytes] | None:
        return None  # offline: the recomputed tree is compared with the remembered root instead

    def cohort(self, cohort_id: str) -> bytes | None:
        stored = self._cohorts.get(cohort_id)
        return cohorts.canonical_bytes(cohorts.decode_members(*stored)) if stored is not None else None

    def _keep_cohort(self, raw: bytes) -> None:
        line = msgspec.json.decode(raw, type=CohortLine)
        parsed = bulk.parse_lines(line.members)
        if parsed.ok and cohorts.canonical_bytes(cohorts.normalise(parsed.stems)) == line.members:
            self._cohorts[line.cohort_id] = cohorts.encode_members(cohorts.normalise(parsed.stems))
        else:  # kept as given: verify reports that its hash is not the cohort_id
            self._cohorts[line.cohort_id] = cohorts.RAW, b""

    def entries(self, size: int) -> Iterator[tuple[int, bytes, bytes | None]]:
        line_decoder = msgspec.json.Decoder(ExportLine).decode

        def decode(raw: bytes) -> ExportLine | None:
            if raw.startswith(b"{"):
                self._keep_cohort(raw)
                return None
            return line_decoder(raw)

        try:
            with gzip.open(self._path, "rb") as f:
                f.readline()
                rest = b""
                # Big reads split by hand: line-by-line gzip reading costs more than the hashing.
                while chunk := f.read(1 << 20):
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    for raw in lines:
                        line = decode(raw)
                        if line is None:
                            continue
                        if line.position > size:
                            return
                        yield line.position, line.entry, line.leaf or None
                if rest.strip():
                    line = decode(rest)
                    if line is not None and line.position <= size:
                        yield line.position, line.entry, line.leaf or None
        except (OSError, EOFError, msgspec.DecodeError) as exc:
            raise SourceError(f"{self._path}: unreadable export: {exc}") from None


def export(source: HttpSource, out: Path, progress: IO[str] | None = None) -> int:
    """Write the latest checkpoint and every entry it covers; return the size."""
    checkpoint_text = source.checkpoint()
    size = note.parse_checkpoint(note.split(checkpoint_text)[0]).size
    tmp = out.with_name(out.name + ".partial")
    encode = msgspec.json.Encoder().encode
    with gzip.open(tmp, "wb", compresslevel=6) as f:
        f.write(json.dumps({"format": EXPORT_FORMAT, "checkpoint": checkpoint_text}).encode() + b"\n")
        count = 0
        written: set[str] = set()
        for position, entry, leaf in source.entries(size):
            cohort_id = used_cohort(entry)
            if cohort_id is not None and cohort_id not in written:
                members = source.cohort(cohort_id)
                if members is not None:  # else verify --decisions names the use whose cohort is missing
                    f.write(encode(CohortLine(cohort_id, members)) + b"\n")
                written.add(cohort_id)
            f.write(encode(ExportLine(position, entry, leaf or b"")) + b"\n")
            count += 1
            if progress is not None and count % 4096 == 0:
                progress.write(f"\rexported {count:,}/{size:,}")
    if progress is not None:
        progress.write("\n")
    os.replace(tmp, out)
    if count != size and progress is not None:
        # Kept anyway: an export of a damaged log is evidence; verify names the first gap.
        progress.write(f"warning: the log served {count} entries for a checkpoint of {size}\n")
    return count


# --- verifying -----------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    origin: str
    size: int
    root: bytes
    checkpoint: str


def load_state(path: Path | None) -> State | None:
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    return State(data["origin"], data["size"], base64.b64decode(data["root"]), data["checkpoint"])


def save_state(path: Path, cp: note.Checkpoint, checkpoint_text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"origin": cp.origin, "size": cp.size,
                               "root": base64.b64encode(cp.root).decode(), "checkpoint": checkpoint_text}))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    size: int
    root: bytes
    seconds: float
    failure: Failure | None = None
    chain: bytes = b""
    decisions: DecisionAudit | None = None

    def report(self) -> str:
        if self.failure is not None:
            lines = [f"FAILED: first bad position {self.failure.position}: {self.failure.what}: {self.failure.detail}"]
            if self.decisions is not None and len(self.decisions.findings) > 1:
                lines += [f"  also position {f.position}: {f.what}: {f.detail}" for f in self.decisions.findings[1:20]]
                if len(self.decisions.findings) > 20:
                    lines.append(f"  ... {len(self.decisions.findings) - 20} more")
            return "\n".join(lines)
        rate = self.size / self.seconds if self.seconds > 0 else 0
        checked = (f"; decisions: {self.decisions.uses} data use(s) re-checked with the rule"
                   if self.decisions is not None else "")
        # The chain head lets anyone holding the last write receipt compare it too.
        return (f"OK: {self.size} entries verified; root {base64.b64encode(self.root).decode()}; "
                f"chain {self.chain.hex()}; {self.seconds:.2f}s ({rate:,.0f} entries/s){checked}")


def verify(source: Source, verifiers: list[note.Verifier], state_path: Path | None = None,
           progress: IO[str] | None = None, decisions: bool = False) -> Outcome:
    started = time.perf_counter()

    def failed(position: int, what: str, detail: str, size: int = 0) -> Outcome:
        return Outcome(False, size, b"", time.perf_counter() - started, Failure(position, what, detail))

    checkpoint_text = source.checkpoint()
    try:
        cp = note.open_checkpoint(checkpoint_text, verifiers)
    except note.NoteError as exc:
        return failed(0, "signature", f"the checkpoint does not verify with the given key: {exc}")
    state = load_state(state_path)
    if state is not None:
        if cp.origin != state.origin:
            return failed(0, "consistency", f"checkpoint origin {cp.origin!r} is not the remembered {state.origin!r}")
        if cp.size < state.size:
            return failed(cp.size + 1, "consistency",
                          f"rolled back: checkpoint size {cp.size} is smaller than the remembered {state.size}")
        if cp.size == state.size and cp.root != state.root:
            return failed(cp.size, "consistency", f"forked: a different root for the remembered size {cp.size}")
        proof = source.consistency(state.size, cp.size) if 0 < state.size < cp.size else None
        if proof is not None:
            try:
                merkle.verify_consistency(state.size, cp.size, state.root, cp.root, proof)
            except merkle.ProofError as exc:
                return failed(state.size, "consistency",
                              f"checkpoint of size {cp.size} is not consistent with the remembered size "
                              f"{state.size}: {exc}")
    checker = ChainVerifier(mark=state.size if state else 0, typed=False)
    replay = DecisionAudit(source.cohort) if decisions else None
    tick = max(1, cp.size // 200)
    for position, entry, leaf in source.entries(cp.size):
        if not checker.add(position, entry, leaf, None):
            break
        if replay is not None:
            replay.add(position, entry)
        if progress is not None and position % tick == 0:
            progress.write(f"\rverifying {position:,}/{cp.size:,} ({100 * position // max(cp.size, 1)}%)")
    if progress is not None:
        progress.write("\n")
    if checker.failure is not None:
        return Outcome(False, checker.size, b"", time.perf_counter() - started, checker.failure)
    if checker.size < cp.size:
        return failed(checker.size + 1, "size", f"the log ends at {checker.size} but the checkpoint says {cp.size}")
    if state is not None and 0 < state.size and checker.mark_root != state.root:
        return failed(state.size, "consistency",
                      f"the first {state.size} entries do not give the remembered root")
    root = checker.root()
    if root != cp.root:
        first = state.size + 1 if state else 1
        return failed(first, "root",
                      f"recomputed root {base64.b64encode(root).decode()} != signed {base64.b64encode(cp.root).decode()}"
                      f" (and the log's own hash tiles agree with its entries: both were rewritten after "
                      f"position {first - 1})")
    if replay is not None:
        replay.finish()
        if replay.findings:
            return Outcome(False, cp.size, root, time.perf_counter() - started, replay.findings[0], checker.chain,
                           replay)
    if state_path is not None:
        save_state(state_path, cp, checkpoint_text)
    return Outcome(True, cp.size, root, time.perf_counter() - started, chain=checker.chain, decisions=replay)


def read_key(value: str) -> list[note.Verifier]:
    """--key: vkey text, or a file with one vkey per line."""
    text = value
    if "+" not in value or Path(value).exists():
        text = Path(value).read_text()
    return [note.parse_vkey(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def progress_stream() -> IO[str] | None:
    return sys.stderr if sys.stderr.isatty() else None

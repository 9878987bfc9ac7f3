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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import msgspec

from contracts import bulk, cosignature, merkle, note
from contracts import cohort as cohorts
from contracts.merkle import TILE_WIDTH
from service.audit.chain import ChainVerifier, Failure
from service.audit.decisions import DecisionAudit
from service.console.progress import Progress

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
    def checkpoint(self, witnessed: bool = False) -> str: ...
    def entries(self, size: int) -> Iterator[tuple[int, bytes, bytes | None]]: ...
    def consistency(self, old: int, new: int) -> list[bytes] | None: ...
    def cohort(self, cohort_id: str) -> bytes | None: ...


# --- reading a live log ---------------------------------------------------------------


class HttpSource:
    """A running service, read over one keep-alive connection.

    Reading entries opens a read session first: the whole run is one
    recorded read of the range it covers, not one per page."""

    def __init__(self, url: str, token: str | None):
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SourceError(f"not an http(s) URL: {url}")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._conn = cls(parts.hostname, parts.port, timeout=60)
        self._prefix = parts.path
        self._token = token
        self._url = url
        self.session: int | None = None

    def get(self, path: str, *, auth: bool = False, missing_ok: bool = False) -> bytes | None:
        return self._request("GET", path, auth=auth, missing_ok=missing_ok)

    def _request(self, method: str, path: str, *, auth: bool = False, missing_ok: bool = False,
                 body: bytes | None = None, ok: int = 200) -> bytes | None:
        headers = {"Accept-Encoding": "identity"}
        if auth:
            if not self._token:
                raise SourceError("reading entries needs an auditor token: set CONSENT_LEDGER_TOKEN "
                                  "(`consent-ledger token issue --role auditor` on a development server) or --token")
            headers["Authorization"] = f"Bearer {self._token}"
            if self.session is not None:
                headers["Ledger-Read-Session"] = str(self.session)
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            self._conn.request(method, self._prefix + path, body=body, headers=headers)
            response = self._conn.getresponse()
            answer = response.read()
        except ConnectionRefusedError:
            raise SourceError(f"nothing answers at {self._url}: is the service running there "
                              "(`consent-ledger serve`)? is the URL right?") from None
        except (OSError, http.client.HTTPException) as exc:
            raise SourceError(f"{method} {self._url}{path}: {exc}") from None
        if response.status == 404 and missing_ok:
            return None
        if response.status != ok:
            raise SourceError(f"{method} {path}: HTTP {response.status}: {_problem(answer)}")
        return answer

    def open_session(self, first: int, last: int) -> int | None:
        """Record this run's read of ``first``..``last`` once; later pages name it.
        (A service without read sessions records each page, as it always did.)"""
        body = json.dumps({"first_position": first, "last_position": last}).encode()
        answer = self._request("POST", "/v1/read-sessions", auth=True, body=body, ok=201, missing_ok=True)
        self.session = int(json.loads(answer)["session"]) if answer is not None else None
        return self.session

    def checkpoint(self, witnessed: bool = False) -> str:
        """The latest checkpoint, or with ``witnessed`` the latest a quorum of the log's witnesses cosigned."""
        return self._must("/checkpoint/witnessed" if witnessed else "/checkpoint").decode()

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
        if size:
            self.open_session(1, size)
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


def _problem(body: bytes) -> str:
    """An RFC 9457 problem's detail (what the service says to do), or the start of any other body."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    return detail if isinstance(detail, str) else body[:200].decode(errors="replace")


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

    def checkpoint(self, witnessed: bool = False) -> str:
        return self._checkpoint  # as exported, with whatever cosignatures it carried

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


def export(source: HttpSource, out: Path) -> int:
    """Write the latest checkpoint and every entry it covers; return the size."""
    checkpoint_text = source.checkpoint()
    size = note.parse_checkpoint(note.split(checkpoint_text)[0]).size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    encode = msgspec.json.Encoder().encode
    with gzip.open(tmp, "wb", compresslevel=6) as f, Progress("export", size) as progress:
        f.write(json.dumps({"format": EXPORT_FORMAT, "checkpoint": checkpoint_text}).encode() + b"\n")
        written: set[str] = set()
        for position, entry, leaf in source.entries(size):
            cohort_id = used_cohort(entry)
            if cohort_id is not None and cohort_id not in written:
                members = source.cohort(cohort_id)
                if members is not None:  # else verify --decisions names the use whose cohort is missing
                    f.write(encode(CohortLine(cohort_id, members)) + b"\n")
                written.add(cohort_id)
            f.write(encode(ExportLine(position, entry, leaf or b"")) + b"\n")
            progress.advance()
    os.replace(tmp, out)
    if progress.done != size:
        # Kept anyway: an export of a damaged log is evidence; verify names the first gap.
        sys.stderr.write(f"warning: the log served {progress.done} entries for a checkpoint of {size}\n")
    return progress.done


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
    path.parent.mkdir(parents=True, exist_ok=True)
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
           decisions: bool = False, witnesses: Sequence[cosignature.CosignatureVerifier] = (),
           quorum: int = 0) -> Outcome:
    """Verify every entry against the latest checkpoint; with ``witnesses``, against the latest
    checkpoint cosigned by at least ``quorum`` of them (and refuse one that is not)."""
    started = time.perf_counter()

    def failed(position: int, what: str, detail: str, size: int = 0) -> Outcome:
        return Outcome(False, size, b"", time.perf_counter() - started, Failure(position, what, detail))

    checkpoint_text = source.checkpoint(witnessed=bool(witnesses))
    try:
        cp = note.open_checkpoint(checkpoint_text, verifiers)
    except note.NoteError as exc:
        return failed(0, "signature", f"the checkpoint does not verify with the given key: {exc}")
    if witnesses:
        refusal = witness_refusal(checkpoint_text, cp, witnesses, quorum)
        if refusal is not None:
            return failed(0, "witness", refusal)
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
    with Progress("verify", cp.size) as progress:
        for position, entry, leaf in source.entries(cp.size):
            if not checker.add(position, entry, leaf, None):
                break
            if replay is not None:
                replay.add(position, entry)
            progress.advance()
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


def witness_refusal(checkpoint_text: str, cp: note.Checkpoint, witnesses: Sequence[cosignature.CosignatureVerifier],
                    quorum: int) -> str | None:
    """Why a checkpoint does not count as witnessed, or None if at least ``quorum`` of ``witnesses`` cosigned it."""
    try:
        cosigned = cosignature.cosignatures(checkpoint_text, list(witnesses))
    except note.NoteError as exc:
        return f"a cosignature by a given witness does not verify: {exc}"
    if len(cosigned) < quorum:
        missing = ", ".join(w.name for w in witnesses if w.vkey not in cosigned)
        return (f"the checkpoint of size {cp.size} is cosigned by {len(cosigned)} of the {quorum} witnesses "
                f"required (missing: {missing}); witnesses cosign only checkpoints consistent with every one "
                f"they cosigned before, so a forked or rolled-back log cannot get their cosignatures")
    return None


def read_key(value: str) -> list[note.Verifier]:
    """--key: vkey text, or a file with one vkey per line."""
    where = "the --key value"
    text = value
    if not value.strip():
        raise ValueError("--key is empty: give the log's verifier key (name+hash+base64, from "
                         "`curl -s URL/v1/log-key` or, better, from the operator out of band) or a file "
                         "holding it; if it came from `KEY=$(curl ...)`, that command failed: is the service "
                         "running at that URL?")
    if "+" not in value or Path(value).exists():
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"--key {value!r} is neither a verifier key (name+hash+base64, as "
                             "`GET /v1/log-key` lists them) nor a file holding one")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--key {value!r}: cannot read that file ({exc})") from None
        where = f"the file {value!r}"
    keys = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            try:
                keys.append(note.parse_vkey(line.strip()))
            except note.NoteError as exc:
                raise ValueError(f"{where} does not hold a verifier key ({exc}): expected "
                                 "name+hash+base64, as `GET /v1/log-key` lists them") from None
    if not keys:
        raise ValueError(f"{where} holds no verifier key")
    return keys


def read_witness_key(value: str) -> cosignature.CosignatureVerifier:
    """--witness: a witness's cosigner vkey (type 0x04), as `consent-ledger witness keys generate` prints it."""
    try:
        return cosignature.parse_vkey(value.strip())
    except note.NoteError as exc:
        raise ValueError(f"--witness {value[:60]!r} is not a witness vkey ({exc}): expected name+keyid+base64, "
                         "as `consent-ledger witness keys generate` prints it") from None

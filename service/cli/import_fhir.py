"""`consent-ledger import-fhir FILE.ndjson`: an earlier register's choices,
one FHIR R4 Consent per line, into the ledger.

The whole file is checked first and nothing is written if any line is
wrong (every mistake is listed, with its line). Then it is written in
batches, each one transaction; a choice is written only where the ledger
holds none for that patient and scope (or that consent), so an import that
was interrupted can simply be run again.
"""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path

from service.app.caller import Caller
from service.composition import running
from service.config import Config
from service.console.failures import CommandError
from service.console.progress import Progress
from service.domain.imports import ImportedChoice
from service.fhir import importing
from service.store.checkpoints import load_signers
from service.store.database import locate

_SHOWN = 20  # mistakes listed before "and N more"
IN_FLIGHT = 3  # batches being prepared or written at once


def read_file(path: Path, source: str | None) -> list[ImportedChoice]:
    """Every line's Consent, or CommandError listing the mistakes (line numbers from 1)."""
    choices: list[ImportedChoice] = []
    mistakes: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    covered: dict[tuple[str, str], int] = {}
    with path.open("rb") as f, Progress("checking", None, unit="lines") as progress:
        for number, line in enumerate(f, start=1):
            progress.advance()
            if not line.strip():
                continue
            try:
                choice = importing.consent(line, number, source)
            except importing.ImportRefused as exc:
                mistakes += [f"line {number}: {m.path.split('.', 1)[-1]}: {m.message}" for m in exc.mistakes]
                continue
            key = (choice.imported.source, choice.imported.resource_id)
            if key in seen:
                mistakes.append(f"line {number}: the same Consent id as line {seen[key]}")
                continue
            # A register holds one current choice per patient and scope (or consent);
            # two would make the result depend on which is written first.
            about = (choice.nhs_number, choice.scope or f"grant {choice.grant_id}")
            if about in covered:
                mistakes.append(f"line {number}: a second record for the same patient and "
                                f"{'scope' if choice.scope else 'grant'} as line {covered[about]}: keep the current one")
                continue
            seen[key] = covered[about] = number
            choices.append(choice)
    if mistakes:
        more = f"; and {len(mistakes) - _SHOWN} more" if len(mistakes) > _SHOWN else ""
        raise CommandError(f"{path}: nothing imported, {len(mistakes)} mistake(s): "
                           + "; ".join(mistakes[:_SHOWN]) + more)
    return choices


async def run_import(config: Config, path: Path, *, source: str | None, batch: int) -> str:
    if not path.is_file():
        raise CommandError(f"{path}: no such file; give the NDJSON file of FHIR Consent resources to import")
    choices = await asyncio.to_thread(read_file, path, source)
    caller = Caller(subject=f"import-fhir:{getpass.getuser()}"[:200], roles=frozenset({"dac"}))
    database = await locate(config)
    signers, _ = load_signers(config)
    # The import only writes choices: no decision state to follow, and the
    # projections catch up in the next `serve`.
    async with running(config, database, signers=signers, decisions=False) as parts:
        with Progress("import", len(choices), unit="resources") as progress:
            # A few batches in flight: one is prepared while another commits.
            # They never cover the same patient and scope (checked above), so
            # their order does not matter; two scopes of one patient in two
            # batches at once is a version conflict the ledger retries.
            slots = asyncio.Semaphore(IN_FLIGHT)

            async def write(part: list[ImportedChoice]) -> int:
                async with slots:
                    receipts = await parts.ledger.import_choices(caller, part)
                progress.advance(len(part))
                return sum(r is not None for r in receipts)

            counts = await asyncio.gather(*(write(choices[start:start + batch])
                                            for start in range(0, len(choices), batch)))
            written = sum(counts)
    return (f"imported {len(choices):,} Consent resource(s) from {path}: {written:,} written, "
            f"{len(choices) - written:,} already covered by a choice in the ledger")

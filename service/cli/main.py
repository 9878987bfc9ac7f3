"""The `consent-ledger` command line (the composition root for every command).

Every failure is one line on stderr that says what went wrong and what to
do next (`--debug` adds the traceback); the exit statuses are listed at the
end of `consent-ledger --help`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from contracts import nhs_number
from contracts.api import ROLES
from service import config as config_module
from service.auth.tokens import (
    dev_key_path,
    issue_token,
    load_dev_key,
    load_or_create_dev_key,
)
from service.cli.serve import serve
from service.composition import migrated
from service.console import failures
from service.console.failures import CommandError
from service.console.progress import Progress
from service.runtime import logs
from service.store.database import locate
from service.store.migrations import migrate

log = structlog.get_logger("consent_ledger")


def _migrate(args: argparse.Namespace) -> None:
    cfg = config_module.load()

    async def run() -> list[int]:
        return await migrated(await locate(cfg))

    applied = asyncio.run(run())
    print(f"migrations applied: {applied or 'none (up to date)'}")


def _token_issue(args: argparse.Namespace) -> None:
    cfg = config_module.load()
    if cfg.jwks:
        raise CommandError("token issue signs development tokens only, and CONSENT_LEDGER_JWKS is set: "
                           "get tokens from the issuer that JWKS belongs to")
    if cfg.production:
        raise CommandError("token issue is not available when CONSENT_LEDGER_ENV=production: "
                           "get tokens from your identity provider")
    if args.lifetime > cfg.token_max_lifetime_seconds:
        raise CommandError(f"--lifetime {args.lifetime} is longer than the service accepts "
                           f"(CONSENT_LEDGER_TOKEN_MAX_LIFETIME_SECONDS={cfg.token_max_lifetime_seconds:g})")
    key = load_dev_key(cfg)
    if key is None and not cfg.data_dir.is_dir():
        # A key made here would be one no server knows: its tokens would all be refused.
        raise CommandError(f"no data directory at {cfg.data_dir}: run this in the folder where "
                           "`consent-ledger serve` runs (it uses ./.consent-ledger there), or set "
                           "CONSENT_LEDGER_DATA_DIR to the server's data directory")
    created = key is None
    key = load_or_create_dev_key(cfg)
    token = issue_token(
        key,
        issuer=cfg.jwt_issuer,
        audience=cfg.jwt_audience,
        subject=args.subject or f"dev-{'+'.join(args.role)}",
        roles=args.role,
        org=args.org,
        nhs_number=args.nhs_number,
        lifetime=args.lifetime,
    )
    made = "a NEW development key (only a server using this data directory accepts it)" if created \
        else "the development key"
    print(f"# development token for role {', '.join(args.role)}, valid {args.lifetime}s, signed by {made} "
          f"in {dev_key_path(cfg)}", file=sys.stderr)
    print(token)


def _lifetime(text: str) -> int:
    """--lifetime: whole seconds, at least one, at most 30 days (a development token, not a credential for life)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 1 <= value <= 30 * 24 * 3600:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 2592000 seconds (30 days)")
    return value


def _demo(args: argparse.Namespace) -> None:
    from service.cli.demo import run_demo

    cfg = config_module.load()
    summary = asyncio.run(run_demo(cfg, patients=args.patients, seed=args.seed))
    print(summary)


def _import_fhir(args: argparse.Namespace) -> None:
    from service.cli.import_fhir import run_import

    if args.batch < 1:
        raise CommandError("--batch must be at least 1")
    print(asyncio.run(run_import(config_module.load(), Path(args.file), source=args.source, batch=args.batch)))


def _keys_generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from contracts.note import Signer
    from service.store.checkpoints import write_key

    cfg = config_module.load()
    signer = Signer.generate(args.name or cfg.log_origin)
    try:
        write_key(Path(args.out), signer)
    except FileExistsError:
        raise CommandError(f"{args.out} exists: refusing to overwrite a signing key") from None
    print(f"# private key written to {args.out}; publish this verifier key:", file=sys.stderr)
    print(signer.verifier.vkey)


def _token(args: argparse.Namespace) -> str | None:
    import os

    return args.token or os.environ.get("CONSENT_LEDGER_TOKEN") or None


def _verify(args: argparse.Namespace) -> None:
    from pathlib import Path

    from service.audit import client as auditor

    try:
        keys = auditor.read_key(args.key)
        witnesses = [auditor.read_witness_key(w) for w in args.witness or []]
        quorum = len(witnesses) if args.witnesses_required is None else args.witnesses_required
        if witnesses and not 1 <= quorum <= len(witnesses):
            raise ValueError(f"--witnesses-required must be between 1 and the {len(witnesses)} --witness key(s)")
        source = auditor.ExportSource(Path(args.export)) if args.export else auditor.HttpSource(args.url, _token(args))
        outcome = auditor.verify(source, keys, Path(args.state) if args.state else None,
                                 decisions=args.decisions, witnesses=witnesses, quorum=quorum)
    except (auditor.SourceError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(outcome.report())
    if not outcome.ok:
        raise SystemExit(failures.NOT_VERIFIED)


def _verify_register(args: argparse.Namespace) -> None:
    from service.audit import client as auditor
    from service.audit.register import verify_register

    try:
        outcome = verify_register(auditor.HttpSource(args.url, None), auditor.read_key(args.key))
    except (auditor.SourceError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(outcome.report())
    if not outcome.ok:
        raise SystemExit(failures.NOT_VERIFIED)


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from service.audit import client as auditor

    try:
        size = auditor.export(auditor.HttpSource(args.url, _token(args)), Path(args.out))
    except (auditor.SourceError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(f"exported {size} entries and their checkpoint to {args.out}")


def _doctor(args: argparse.Namespace) -> None:
    from service.cli.doctor import examine

    findings = examine(args.url, _token(args))
    for finding in findings:
        print(finding)
    if any(f.verdict == "FAIL" for f in findings):
        raise SystemExit(failures.NOT_VERIFIED)


def _projections(args: argparse.Namespace) -> None:
    from projections import rebuild as projection_admin

    cfg = config_module.load()

    async def run() -> None:
        database = await locate(cfg)
        conn = await database.connect_owner()
        try:
            await migrate(conn)
            if args.projections_command == "status":
                for name, position, lag in await projection_admin.status(conn):
                    print(f"{name}\tposition={position}\tlag={lag}")
                return
            if args.name not in projection_admin.PROJECTIONS:
                raise CommandError(f"no projection {args.name!r}; known: {', '.join(projection_admin.PROJECTIONS)}")
            with Progress(f"rebuild {args.name}") as progress:
                position = await projection_admin.rebuild(conn, args.name, progress=progress.update)
            print(f"{args.name} rebuilt from position 0 to {position}")
        finally:
            await conn.close()

    asyncio.run(run())


def parser() -> argparse.ArgumentParser:
    p = failures.OneLineParser(top=True, prog="consent-ledger", description=__doc__, epilog=failures.EXIT_STATUSES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(logs=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=failures.OneLineParser)

    serving = sub.add_parser("serve", help="run the HTTP service")
    serving.add_argument("--host", default="127.0.0.1")
    serving.add_argument("--port", type=int, default=8080)
    serving.add_argument("--workers", type=int, default=1,
                       help="server processes sharing the port (SO_REUSEPORT); default 1")
    serving.set_defaults(run=serve)

    sub.add_parser("migrate", help="create or upgrade the database schema").set_defaults(run=_migrate)

    demo = sub.add_parser("demo", help="load realistic synthetic data (test-range NHS numbers)")
    demo.add_argument("--patients", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=2021)
    demo.set_defaults(run=_demo)

    imports = sub.add_parser("import-fhir", help="import an earlier register's choices: NDJSON, one FHIR R4 "
                                                 "Consent per line (checked whole first; safe to run again)")
    imports.add_argument("file", help="the NDJSON file")
    imports.add_argument("--source", help="the register it comes from, where a line has no meta.source")
    imports.add_argument("--batch", type=int, default=1000, help="resources per transaction (default 1000)")
    imports.set_defaults(run=_import_fhir)

    projections = sub.add_parser("projections", help="read models: status, rebuild").add_subparsers(
        dest="projections_command", required=True)
    projections.add_parser("status", help="position and lag of each projection").set_defaults(run=_projections)
    rebuild = projections.add_parser("rebuild", help="rebuild a projection from position 0, then swap it in")
    rebuild.add_argument("name")
    rebuild.set_defaults(run=_projections)

    token = sub.add_parser("token", help="development tokens").add_subparsers(dest="token_command", required=True)
    issue = token.add_parser("issue", help="print a development token (last line of output)")
    issue.add_argument("--role", required=True, choices=ROLES, action="append",
                       help="repeat for a token with several roles (e.g. for fuzzing)")
    issue.add_argument("--org")
    issue.add_argument("--nhs-number")
    issue.add_argument("--subject")
    issue.add_argument("--lifetime", type=_lifetime, default=3600, help="seconds, 1 to 2592000 (default 3600)")
    issue.set_defaults(run=_token_issue, logs=False)  # prints a token; touches no database

    keys = sub.add_parser("keys", help="checkpoint signing keys").add_subparsers(dest="keys_command", required=True)
    generate = keys.add_parser("generate", help="write a new Ed25519 log key; print its vkey")
    generate.add_argument("--out", required=True, help="private key file to create (mode 0600)")
    generate.add_argument("--name", help="key name = checkpoint origin (default CONSENT_LEDGER_LOG_ORIGIN)")
    generate.set_defaults(run=_keys_generate, logs=False)

    verify = sub.add_parser("verify", help="verify the log (live or exported) against its signed checkpoint")
    where = verify.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running service")
    where.add_argument("--export", help="file written by `consent-ledger export`")
    verify.add_argument("--key", required=True, help="verifier key (vkey text) or a file holding vkeys")
    verify.add_argument("--state", help="file remembering the last verified checkpoint (refuses rollback/fork)")
    verify.add_argument("--witness", action="append", metavar="VKEY",
                        help="a witness's cosigner vkey (repeat for several): verify against the latest checkpoint "
                             "they cosigned (/checkpoint/witnessed) and refuse one they did not")
    verify.add_argument("--witnesses-required", type=int, metavar="K",
                        help="how many of the --witness keys must have cosigned (default: all of them)")
    verify.add_argument("--token", help="auditor bearer token (default: CONSENT_LEDGER_TOKEN)")
    verify.add_argument("--decisions", action="store_true",
                        help="also replay every entry through the opt-out rule and re-check each data use's "
                             "statements (reads each cohort; exits 1 naming the first false claim)")
    verify.set_defaults(run=_verify)

    register = sub.add_parser("verify-register", help="rebuild the public register from the log's public "
                              "entries (each proved against the signed checkpoint) and report every row it does "
                              "not support")
    register.add_argument("--url", required=True, help="base URL of a running service")
    register.add_argument("--key", required=True, help="verifier key (vkey text) or a file holding vkeys")
    register.set_defaults(run=_verify_register)

    exp = sub.add_parser("export", help="write the checkpoint and every entry to a gzip file")
    exp.add_argument("--url", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--token", help="auditor bearer token (default: CONSENT_LEDGER_TOKEN)")
    exp.set_defaults(run=_export)

    doctor = sub.add_parser("doctor", help="check the set-up: data directory, keys, database, server, token, "
                                           "stray embedded PostgreSQL")
    doctor.add_argument("--url", default="http://127.0.0.1:8080", help="the server to check (default %(default)s)")
    doctor.add_argument("--token", help="bearer token to check (default: CONSENT_LEDGER_TOKEN)")
    doctor.set_defaults(run=_doctor)

    # Listed here for --help; main() hands its arguments to the witness's own parser.
    sub.add_parser("witness", help="run a C2SP witness for consent-ledger logs (see `witness --help`)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["witness"]:
        from service.witness.cli import main as witness_main

        return witness_main(argv[1:])
    args = parser().parse_args(argv)

    def run() -> None:
        cfg = config_module.load()
        if args.logs:  # on stderr: stdout carries only a command's result
            logs.configure(cfg.log_level, cfg.log_format)
        try:
            previous = nhs_number.accept_ranges(cfg.nhs_number_ranges)
        except ValueError as exc:
            raise CommandError(f"CONSENT_LEDGER_NHS_NUMBER_RANGES: {exc}") from None
        try:
            args.run(args)
        finally:  # main() may be called in a process that goes on (tests)
            nhs_number.accept_ranges(previous)

    return failures.run(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""The `consent-ledger` command line (the composition root for every command)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence

import structlog
from aiohttp import web

from contracts import nhs_number
from contracts.api import ROLES

from . import config as config_module
from . import logs
from .auth import issue_token, load_or_create_dev_key, verifier
from .checkpoints import load_signers
from .database import Database, describe, locate
from .schema import migrate

log = structlog.get_logger("consent_ledger")


class CommandError(Exception):
    """A failure to report as one line and a non-zero exit."""


def _serve(args: argparse.Namespace) -> None:
    cfg = config_module.load()
    logs.configure(cfg.log_level, cfg.log_format)
    database = asyncio.run(locate(cfg))
    verifier(cfg)  # fail fast on bad auth configuration, before any worker starts
    signers, dev_log_key = load_signers(cfg)  # creates the development key once, before any worker starts
    if dev_log_key:
        log.warning("DEVELOPMENT LOG KEY: checkpoints are signed by a key generated in the data directory;"
                    " set CONSENT_LEDGER_LOG_KEY (see `consent-ledger keys generate`)", vkey=signers[0].verifier.vkey)
    log.info("database", url=describe(database.owner_dsn), embedded=database.embedded)
    if cfg.production and not cfg.service_database_url:
        log.warning("CONSENT_LEDGER_SERVICE_DATABASE_URL is not set: the service connects with the migration "
                    "owner's login; see deploy/POSTGRES-ROLES.md")
    if args.workers > 1:
        _serve_workers(database, args)
        return
    _run_app(database, args.host, args.port, reuse_port=False)


def _run_app(database: Database, host: str, port: int, *, reuse_port: bool) -> None:
    from .http import create_app

    cfg = config_module.load()
    token_verifier, development = verifier(cfg)
    signers, _ = load_signers(cfg)
    if development:
        log.warning(
            "DEVELOPMENT AUTH: no CONSENT_LEDGER_JWKS configured, tokens are signed by a key generated in "
            "the data directory. Get one with: consent-ledger token issue --role patient-app",
            key_file=str(cfg.data_dir),
        )
    app = create_app(
        database,
        token_verifier,
        pool_size=cfg.pool_size,
        queue_size=cfg.writer_queue_size,
        max_batch=cfg.writer_max_batch,
        timeout=cfg.request_timeout_seconds,
        log_signers=signers,
        log_origin=cfg.log_origin,
        checkpoint_interval=cfg.checkpoint_interval,
        projection_poll_interval=cfg.projection_poll_interval,
        filter_wait=cfg.filter_wait,
        task_stall=cfg.task_stall_seconds,
    )
    log.info("serving", host=host, port=port)
    web.run_app(app, host=host, port=port, access_log=None, print=None, reuse_port=reuse_port or None)


def _worker(database: Database, host: str, port: int) -> None:
    cfg = config_module.load()
    logs.configure(cfg.log_level, cfg.log_format)
    _follow_parent()
    try:
        _run_app(database, host, port, reuse_port=True)
    except KeyboardInterrupt:
        pass


def _follow_parent(grace: float = 30.0) -> None:
    """Stop this worker when the `serve` process that started it is gone,
    however it died (even SIGKILL): a thread waits on the parent's sentinel
    (a pipe that closes with the parent), then stops this process as SIGTERM
    would, and exits outright if that has not finished within ``grace``."""
    import multiprocessing
    import multiprocessing.connection
    import signal
    import threading

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        log.warning("the serve process is gone; this worker stops too")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def _wait_for_free_port(host: str, port: int, seconds: float = 15.0) -> None:
    """Workers bind with SO_REUSEPORT, which would let them join old workers
    still listening on the port; wait (a bounded time) until none is left."""
    import socket

    deadline = time.monotonic() + seconds
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
            try:
                probe.bind((host, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise CommandError(f"{host}:{port} is in use (old workers still running?)") from None
        time.sleep(0.2)


def _serve_workers(database: Database, args: argparse.Namespace) -> None:
    """N processes share the port (SO_REUSEPORT; the kernel spreads
    connections).  Each has its own pool and batching writer; the chain-head
    row lock keeps their appends gap-free and correctly chained."""
    import multiprocessing
    import signal

    async def migrate_once() -> None:
        conn = await database.connect_owner()
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(migrate_once())  # once here rather than racing in every worker
    _wait_for_free_port(args.host, args.port)
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(database, args.host, args.port), name=f"worker-{i}")
               for i in range(args.workers)]
    for w in workers:
        w.start()
    log.info("workers started", workers=args.workers, pids=[w.pid for w in workers])

    def forward(signum: int, _frame: object) -> None:
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signum)  # type: ignore[arg-type]

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # If one worker dies the others stop too: the orchestrator restarts the whole unit.
    while all(w.is_alive() for w in workers):
        time.sleep(0.2)
    forward(signal.SIGTERM, None)
    deadline = time.monotonic() + 30
    for w in workers:
        w.join(timeout=max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.is_alive():  # never leave a worker behind on the port
            log.error("worker did not stop in 30 s; killing it", worker=w.name, pid=w.pid)
            w.kill()
            w.join()
    failed = [w.name for w in workers if w.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    if failed:
        raise CommandError(f"worker(s) {', '.join(failed)} failed; all workers stopped")


def _migrate(args: argparse.Namespace) -> None:
    cfg = config_module.load()

    async def run() -> list[int]:
        database = await locate(cfg)
        conn = await database.connect_owner()
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    applied = asyncio.run(run())
    print(f"migrations applied: {applied or 'none (up to date)'}")


def _token_issue(args: argparse.Namespace) -> None:
    cfg = config_module.load()
    if cfg.jwks:
        raise CommandError("token issue signs development tokens only; CONSENT_LEDGER_JWKS is set")
    if cfg.production:
        raise CommandError("token issue is not available when CONSENT_LEDGER_ENV=production")
    if args.lifetime > cfg.token_max_lifetime_seconds:
        raise CommandError(f"--lifetime {args.lifetime} is longer than the service accepts "
                           f"(CONSENT_LEDGER_TOKEN_MAX_LIFETIME_SECONDS={cfg.token_max_lifetime_seconds:g})")
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
    print(f"# development token for role {', '.join(args.role)}, valid {args.lifetime}s", file=sys.stderr)
    print(token)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    cfg = config_module.load()
    logs.configure(cfg.log_level, cfg.log_format)
    summary = asyncio.run(run_demo(cfg, patients=args.patients, seed=args.seed))
    print(summary)


def _keys_generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from contracts.note import Signer

    from .checkpoints import write_key

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

    from . import auditor

    try:
        keys = auditor.read_key(args.key)
        source = auditor.ExportSource(Path(args.export)) if args.export else auditor.HttpSource(args.url, _token(args))
        outcome = auditor.verify(source, keys, Path(args.state) if args.state else None, auditor.progress_stream(),
                                 decisions=args.decisions)
    except (auditor.SourceError, ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    print(outcome.report())
    if not outcome.ok:
        raise SystemExit(1)


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from . import auditor

    try:
        size = auditor.export(auditor.HttpSource(args.url, _token(args)), Path(args.out), auditor.progress_stream())
    except (auditor.SourceError, ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    print(f"exported {size} entries and their checkpoint to {args.out}")
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
            position = await projection_admin.rebuild(
                conn, args.name, progress=lambda at, head: print(f"# {args.name}: {at}/{head}", file=sys.stderr)
            )
            print(f"{args.name} rebuilt from position 0 to {position}")
        finally:
            await conn.close()

    asyncio.run(run())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="consent-ledger", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1,
                       help="server processes sharing the port (SO_REUSEPORT); default 1")
    serve.set_defaults(run=_serve)

    sub.add_parser("migrate", help="create or upgrade the database schema").set_defaults(run=_migrate)

    demo = sub.add_parser("demo", help="load realistic synthetic data (test-range NHS numbers)")
    demo.add_argument("--patients", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=2021)
    demo.set_defaults(run=_demo)

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
    issue.add_argument("--lifetime", type=int, default=3600)
    issue.set_defaults(run=_token_issue)

    keys = sub.add_parser("keys", help="checkpoint signing keys").add_subparsers(dest="keys_command", required=True)
    generate = keys.add_parser("generate", help="write a new Ed25519 log key; print its vkey")
    generate.add_argument("--out", required=True, help="private key file to create (mode 0600)")
    generate.add_argument("--name", help="key name = checkpoint origin (default CONSENT_LEDGER_LOG_ORIGIN)")
    generate.set_defaults(run=_keys_generate)

    verify = sub.add_parser("verify", help="verify the log (live or exported) against its signed checkpoint")
    where = verify.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running service")
    where.add_argument("--export", help="file written by `consent-ledger export`")
    verify.add_argument("--key", required=True, help="verifier key (vkey text) or a file holding vkeys")
    verify.add_argument("--state", help="file remembering the last verified checkpoint (refuses rollback/fork)")
    verify.add_argument("--token", help="auditor bearer token (default: CONSENT_LEDGER_TOKEN)")
    verify.add_argument("--decisions", action="store_true",
                        help="also replay every entry through the opt-out rule and re-check each data use's "
                             "statements (reads each cohort; exits 1 naming the first false claim)")
    verify.set_defaults(run=_verify)

    exp = sub.add_parser("export", help="write the checkpoint and every entry to a gzip file")
    exp.add_argument("--url", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--token", help="auditor bearer token (default: CONSENT_LEDGER_TOKEN)")
    exp.set_defaults(run=_export)

    # Listed here for --help; main() hands its arguments to the witness's own parser.
    sub.add_parser("witness", help="run a C2SP witness for consent-ledger logs (see `witness --help`)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["witness"]:
        from .witness.cli import main as witness_main

        return witness_main(argv[1:])
    args = parser().parse_args(argv)
    previous = None
    try:
        try:
            previous = nhs_number.accept_ranges(config_module.load().nhs_number_ranges)
        except ValueError as exc:
            raise CommandError(f"CONSENT_LEDGER_NHS_NUMBER_RANGES: {exc}") from None
        args.run(args)
    except CommandError as exc:
        print(f"consent-ledger: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for operators
        print(f"consent-ledger: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:  # main() may be called in a process that goes on (tests)
            nhs_number.accept_ranges(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

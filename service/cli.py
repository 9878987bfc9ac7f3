"""The `consent-ledger` command line (the composition root for every command)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import structlog
from aiohttp import web

from contracts.api import ROLES

from . import config as config_module
from . import logs
from .auth import issue_token, load_or_create_dev_key, verifier
from .database import describe, locate
from .schema import migrate

log = structlog.get_logger("consent_ledger")


class CommandError(Exception):
    """A failure to report as one line and a non-zero exit."""


def _serve(args: argparse.Namespace) -> None:
    from .http import create_app

    cfg = config_module.load()
    logs.configure(cfg.log_level, cfg.log_format)
    database = asyncio.run(locate(cfg))
    token_verifier, development = verifier(cfg)
    log.info("database", url=describe(database.owner_dsn), embedded=database.embedded)
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
    )
    log.info("serving", host=args.host, port=args.port)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


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
    key = load_or_create_dev_key(cfg)
    token = issue_token(
        key,
        issuer=cfg.jwt_issuer,
        audience=cfg.jwt_audience,
        subject=args.subject or f"dev-{args.role}",
        roles=[args.role],
        org=args.org,
        nhs_number=args.nhs_number,
        lifetime=args.lifetime,
    )
    print(f"# development token for role {args.role}, valid {args.lifetime}s", file=sys.stderr)
    print(token)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    cfg = config_module.load()
    logs.configure(cfg.log_level, cfg.log_format)
    summary = asyncio.run(run_demo(cfg, patients=args.patients, seed=args.seed))
    print(summary)


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
    issue.add_argument("--role", required=True, choices=ROLES)
    issue.add_argument("--org")
    issue.add_argument("--nhs-number")
    issue.add_argument("--subject")
    issue.add_argument("--lifetime", type=int, default=3600)
    issue.set_defaults(run=_token_issue)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except CommandError as exc:
        print(f"consent-ledger: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for operators
        print(f"consent-ledger: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`consent-ledger serve`: one process, or several sharing the port, each
stopping when the `serve` that started it is gone."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import time

import structlog
from aiohttp import web

from service import config as config_module
from service.app.transparency import load_key as load_transparency_key
from service.auth.tokens import (
    dev_key_path,
    verifier,
)
from service.composition import migrated
from service.console.failures import CommandError
from service.runtime import logs
from service.store.checkpoints import load_signers
from service.store.database import Database, describe, locate

log = structlog.get_logger("consent_ledger")


def serve(args: argparse.Namespace) -> None:
    cfg = config_module.load()
    if args.workers <= 1:
        _check_port_free(args.host, args.port)  # before minutes of database start-up, not after
    database = asyncio.run(locate(cfg))
    verifier(cfg)  # fail fast on bad auth configuration, before any worker starts
    signers, dev_log_key = load_signers(cfg)  # creates the development key once, before any worker starts
    if dev_log_key:
        log.warning("DEVELOPMENT LOG KEY: checkpoints are signed by a key generated in the data directory;"
                    " set CONSENT_LEDGER_LOG_KEY (see `consent-ledger keys generate`)", vkey=signers[0].verifier.vkey)
    if database.embedded:
        log.info("database: embedded PostgreSQL", data=str(cfg.data_dir / "pgdata"), url=describe(database.owner_dsn))
    else:
        log.info("database", url=describe(database.owner_dsn))
    if cfg.production and not cfg.service_database_url:
        log.warning("CONSENT_LEDGER_SERVICE_DATABASE_URL is not set: the service connects with the migration "
                    "owner's login; see deploy/POSTGRES-ROLES.md")
    if args.workers > 1:
        _serve_workers(database, args)
        return
    _run_app(database, args.host, args.port, reuse_port=False)


def _run_app(database: Database, host: str, port: int, *, reuse_port: bool) -> None:
    from service.http.app import create_app

    cfg = config_module.load()
    token_verifier, development = verifier(cfg)
    signers, _ = load_signers(cfg)
    if development:
        log.warning(
            "DEVELOPMENT AUTH: no CONSENT_LEDGER_JWKS configured, tokens are signed by a key generated in "
            "the data directory. Get one with: consent-ledger token issue --role patient-app",
            key_file=str(dev_key_path(cfg)),
        )
    app = create_app(cfg, database, token_verifier, signers=signers, transparency_key=load_transparency_key(cfg))

    def serving(_banner: str) -> None:  # aiohttp calls this once the port is bound
        log.info("serving", host=host, port=port, url=f"http://{host}:{port}")

    try:
        web.run_app(app, host=host, port=port, access_log=None, print=serving, reuse_port=reuse_port or None)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _port_in_use(host, port) from None
        raise
    log.info("stopped", host=host, port=port)


def _port_in_use(host: str, port: int) -> CommandError:
    return CommandError(f"{host}:{port} is already in use, perhaps by another `consent-ledger serve`: stop it "
                        f"(`consent-ledger doctor` lists this data directory's processes) or use --port")


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _port_in_use(host, port) from None
            raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host") from None


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

    asyncio.run(migrated(database))  # once here rather than racing in every worker
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

"""What a failed command says: one line, in plain words, with the next step.

``consent-ledger`` never shows a traceback or an exception's class name
unless asked (``--debug``): a newcomer should read what went wrong and
what to do about it.  Failures of a known kind are explained here; anything
else is a bug, reported as such (exit status 3).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import asyncpg

from service import config as config_module
from service.domain.errors import AlreadyExists, NotFound, NotPermitted, RuleBroken
from service.store.database import describe, unavailable

# Exit statuses, also listed in `consent-ledger --help`.
OK = 0
NOT_VERIFIED = 1  # verify: the log does not verify; doctor: a check failed
FAILED = 2  # the command could not do what was asked; its one line says why and what to do
BUG = 3  # an unexpected error
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)

EXIT_STATUSES = f"""exit status:
  {OK}    success
  {NOT_VERIFIED}    verify: the log does not verify; doctor: a check failed
  {FAILED}    the command could not do what was asked (one line on stderr says why and what to do)
  {BUG}    an unexpected error: run again with --debug and report the traceback
  {INTERRUPTED}  interrupted (Ctrl-C)
"""


class CommandError(Exception):
    """A failure with a known cause: reported as its one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one line too, naming the --help to read; every
    command also takes --debug (after its name, where people type it)."""

    def __init__(self, *args: Any, top: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Only the top parser sets the default: a subcommand's would overwrite a --debug given before it.
        self.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                          help="show the traceback of a failure")

    def error(self, message: str) -> NoReturn:
        self.exit(FAILED, f"consent-ledger: {message}; see `{self.prog} --help`\n")


def run(command: Callable[[], None], *, debug: bool) -> int:
    """Run a command; report a failure as one line on stderr; the exit status."""
    try:
        command()
    except KeyboardInterrupt:
        print("consent-ledger: interrupted; every entry already written is complete (a write is whole or "
              "absent), so the command can simply be run again", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, unless --debug
        if debug:
            import traceback

            traceback.print_exc()
        reason = explain(exc)
        if reason is not None:
            print(f"consent-ledger: {reason}", file=sys.stderr)
            return FAILED
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        print(f"consent-ledger: unexpected error ({detail}); run the command again with --debug and report "
              "what it prints", file=sys.stderr)
        return BUG
    return OK


def explain(exc: BaseException) -> str | None:
    """The one line for a failure of a known kind; None for a bug."""
    match exc:
        case CommandError() | config_module.ConfigError():
            return str(exc)
        case RuleBroken():
            return exc.detail
        case NotFound() | AlreadyExists() | NotPermitted():
            return str(exc)
        case asyncpg.InvalidAuthorizationSpecificationError() | asyncpg.InvalidPasswordError():
            return f"the database at {_where()} refused the login ({_first_line(exc)}): check the user and " \
                   "password in DATABASE_URL"
        case asyncpg.InvalidCatalogNameError():
            return f"no such database at {_where()} ({_first_line(exc)}): create it, or fix DATABASE_URL"
        case OSError() if exc.filename is not None:  # before `unavailable`, which takes any OSError
            return f"{exc.strerror or 'cannot use'}: {exc.filename}; check the path and its permissions " \
                   "(CONSENT_LEDGER_DATA_DIR and the key files are paths)"
        case _ if unavailable(exc):
            return f"cannot reach the database at {_where()} ({_first_line(exc) or 'no answer'}): start " \
                   "PostgreSQL there or fix DATABASE_URL; `consent-ledger doctor` checks the setup"
        case subprocess.CalledProcessError() | subprocess.TimeoutExpired():
            data_dir = config_module.load().data_dir
            return f"the embedded PostgreSQL did not start; its log is {data_dir / 'pgdata' / 'log'}; " \
                   "`consent-ledger doctor` lists what else runs on this data directory"
    return None


def _where() -> str:
    cfg = config_module.load()
    return describe(cfg.database_url) if cfg.database_url else f"the embedded PostgreSQL in {cfg.data_dir}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.errno:
        text = os.strerror(exc.errno)
    return text.splitlines()[0].lower() if text else ""

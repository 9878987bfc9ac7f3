"""What a failed command says: one line, in plain words, with the next step.

``consent-ledger`` never shows a traceback or an exception's class name
unless asked (``--debug``): a newcomer should read what went wrong and
what to do about it.  Failures of a known kind are explained here; anything
else is a bug, reported as such (exit status 3).
"""

from __future__ import annotations

import os
import subprocess

import asyncpg

from . import config as config_module
from .database import describe, unavailable
from .domain import AlreadyExists, NotFound, NotPermitted, RuleBroken

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
        case _ if unavailable(exc):
            return f"cannot reach the database at {_where()} ({_first_line(exc) or 'no answer'}): start " \
                   "PostgreSQL there or fix DATABASE_URL; `consent-ledger doctor` checks the setup"
        case subprocess.CalledProcessError() | subprocess.TimeoutExpired():
            data_dir = config_module.load().data_dir
            return f"the embedded PostgreSQL did not start; its log is {data_dir / 'pgdata' / 'log'}; " \
                   "`consent-ledger doctor` lists what else runs on this data directory"
        case PermissionError() | FileNotFoundError() | IsADirectoryError() | NotADirectoryError():
            return f"{exc.strerror or 'cannot use'}: {exc.filename}; check the path and its permissions " \
                   "(CONSENT_LEDGER_DATA_DIR and the key files are paths)"
    return None


def _where() -> str:
    cfg = config_module.load()
    return describe(cfg.database_url) if cfg.database_url else f"the embedded PostgreSQL in {cfg.data_dir}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.errno:
        text = os.strerror(exc.errno)
    return text.splitlines()[0].lower() if text else ""

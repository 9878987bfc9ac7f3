"""`consent-ledger doctor`: what this command line would use, and whether it works.

In plain words, for a newcomer: which data directory and keys are in use,
whether the database is there and running, whether a server answers at the
URL, whether the token in CONSENT_LEDGER_TOKEN is good for that server (and
until when), and which embedded PostgreSQL processes run on data
directories like this one, with how to stop a stray one.  It changes
nothing: no database is started, no key is made.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

from service import config as config_module
from service.auth.tokens import DEV_KEY_FILE, dev_key_path, is_url
from service.store.checkpoints import DEV_LOG_KEY_FILE
from service.store.database import (
    EMBEDDED_DATABASE,
    Postmaster,
    describe,
    pgdata_of,
    running_postmaster,
)


@dataclass(frozen=True)
class Finding:
    verdict: str  # "ok" | "FAIL" | "note"
    topic: str
    text: str

    def __str__(self) -> str:
        return f"{self.verdict:<5} {self.topic}: {self.text}"


def ok(topic: str, text: str) -> Finding:
    return Finding("ok", topic, text)


def fail(topic: str, text: str) -> Finding:
    return Finding("FAIL", topic, text)


def note(topic: str, text: str) -> Finding:
    return Finding("note", topic, text)


def examine(url: str, token: str | None) -> list[Finding]:
    cfg = config_module.load()
    findings = [_data_dir(cfg), _token_keys(cfg), _log_key(cfg)]
    findings += asyncio.run(_database(cfg))
    findings += _embedded_processes(cfg)
    server = _server(url)
    findings.append(server)
    if server.verdict == "ok":
        findings.append(_token(url, token))
    return findings


# --- local set-up -----------------------------------------------------------------


def _data_dir(cfg: config_module.Config) -> Finding:
    where = f"{cfg.data_dir} (CONSENT_LEDGER_DATA_DIR; default ./.consent-ledger in the folder you run from)"
    if cfg.data_dir.is_dir():
        return ok("data directory", where)
    return fail("data directory", f"{where} does not exist: run commands in the folder where `consent-ledger "
                                  "serve` runs, or set CONSENT_LEDGER_DATA_DIR to its data directory")


def _token_keys(cfg: config_module.Config) -> Finding:
    if cfg.jwks:
        kind = "URL" if is_url(cfg.jwks) else "file"
        if kind == "file" and not Path(cfg.jwks).is_file():
            return fail("token keys", f"CONSENT_LEDGER_JWKS names the file {cfg.jwks}, which does not exist")
        return ok("token keys", f"JWKS {kind} {cfg.jwks}: tokens come from that issuer "
                                f"(iss {cfg.jwt_issuer!r}, aud {cfg.jwt_audience!r})")
    if cfg.production:
        return fail("token keys", "CONSENT_LEDGER_ENV=production needs CONSENT_LEDGER_JWKS (the issuer's public keys)")
    key = dev_key_path(cfg)
    if key.is_file():
        return ok("token keys", f"development key {key}: `consent-ledger token issue` signs with it")
    return note("token keys", f"no development key yet ({key}): `consent-ledger serve` makes it on first start")


def _log_key(cfg: config_module.Config) -> Finding:
    if cfg.log_key_file:
        if not cfg.log_key_file.is_file():
            return fail("checkpoint key", f"CONSENT_LEDGER_LOG_KEY names {cfg.log_key_file}, which does not exist")
        return ok("checkpoint key", f"{cfg.log_key_file} (CONSENT_LEDGER_LOG_KEY), origin {cfg.log_origin!r}")
    key = cfg.data_dir / DEV_LOG_KEY_FILE
    if key.is_file():
        return ok("checkpoint key", f"development key {key} (set CONSENT_LEDGER_LOG_KEY in production)")
    return note("checkpoint key", f"no development key yet ({key}): `consent-ledger serve` makes it on first start")


async def _database(cfg: config_module.Config) -> list[Finding]:
    if cfg.database_url:
        return [await _connect("database", cfg.database_url, f"DATABASE_URL {describe(cfg.database_url)}")]
    pgdata = pgdata_of(cfg)
    if not (pgdata / "PG_VERSION").is_file():
        return [note("database", f"embedded PostgreSQL, not created yet ({pgdata}): `consent-ledger serve` or "
                                 "`demo` creates it")]
    running = running_postmaster(pgdata)
    if running is None:
        return [ok("database", f"embedded PostgreSQL in {pgdata}, stopped (it runs while a command uses it)")]
    return [await _connect("database", _embedded_dsn(pgdata), f"embedded PostgreSQL in {pgdata}, running "
                                                                 f"(pid {running.pid})")]


def _embedded_dsn(pgdata: Path) -> str:
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    port, socket_dir = lines[3].strip(), lines[4].strip()
    return f"postgresql://postgres@/{EMBEDDED_DATABASE}?host={socket_dir}&port={port}"


async def _connect(topic: str, dsn: str, what: str) -> Finding:
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        return fail(topic, f"{what}: cannot connect ({_plain(exc)}): is PostgreSQL running there?")
    try:
        head = await conn.fetchval("SELECT position FROM ledger_head")
    except asyncpg.UndefinedTableError:
        return note(topic, f"{what}: reachable, no ledger yet (`consent-ledger migrate` or `serve` creates it)")
    finally:
        await conn.close()
    return ok(topic, f"{what}: reachable, ledger head at position {head}")


def _embedded_processes(cfg: config_module.Config) -> list[Finding]:
    """Embedded PostgreSQL servers on this data directory, and strays on others like it."""
    mine = pgdata_of(cfg).resolve()
    found = []
    for postmaster in _postmasters():
        here = postmaster.pgdata.resolve() == mine
        if not (here or postmaster.stray and _looks_like_a_data_dir(postmaster.pgdata.parent)):
            continue
        where = "this data directory" if here else f"another data directory, {postmaster.pgdata}"
        if postmaster.stray:
            killed = f" (its process{'es' if len(postmaster.gone) > 1 else ''} " \
                     f"{', '.join(map(str, postmaster.gone))} ended without stopping it)" if postmaster.gone else ""
            found.append(fail("stray PostgreSQL", f"pid {postmaster.pid} runs on {where} and nothing will stop "
                                                  f"it{killed}: stop it with `{postmaster.how_to_stop()}`"
                                                  + (", or run any consent-ledger command here: it takes the "
                                                     "server over and stops it when it ends" if here else "")))
        else:
            found.append(ok("embedded PostgreSQL", f"pid {postmaster.pid} on {where}, used by process(es) "
                                                   f"{', '.join(map(str, postmaster.holders))}"))
    return found


def _postmasters() -> list[Postmaster]:
    import psutil

    seen = []
    for process in psutil.process_iter(["name", "cmdline", "ppid"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] != "postgres" or "-D" not in cmdline:
            continue
        pgdata = Path(cmdline[cmdline.index("-D") + 1])
        if pgdata.name != "pgdata":  # the embedded layout: <data dir>/pgdata
            continue
        found = running_postmaster(pgdata)
        if found is not None and found.pid == process.pid:
            seen.append(found)
    return seen


def _looks_like_a_data_dir(path: Path) -> bool:
    """A consent-ledger data directory: the default name, or the keys it makes."""
    return path.name == ".consent-ledger" or any(
        (path / name).exists() for name in (DEV_KEY_FILE, DEV_LOG_KEY_FILE))


# --- the server and the token ------------------------------------------------------


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _server(url: str) -> Finding:
    try:
        status, body = _get(f"{url.rstrip('/')}/readyz")
    except (OSError, ValueError) as exc:
        return fail("server", f"nothing answers at {url} ({_plain(exc)}): start it with `consent-ledger serve`, "
                              "or pass --url")
    detail = _field(body, "detail") or _field(body, "status") or f"HTTP {status}"
    if status != 200:
        return fail("server", f"{url} answers but is not ready: {detail}")
    return ok("server", f"{url} is ready, ledger head at position {_field(body, 'position')}")


def _token(url: str, token: str | None) -> Finding:
    if not token:
        return note("token", "CONSENT_LEDGER_TOKEN is not set (verify, export and API calls need one): on a "
                             "development server, export CONSENT_LEDGER_TOKEN=$(consent-ledger token issue "
                             "--role auditor | tail -1)")
    status, body = _get(f"{url.rstrip('/')}/v1/whoami", token)
    if status != 200:
        return fail("token", f"{url} refuses CONSENT_LEDGER_TOKEN: {_field(body, 'detail') or f'HTTP {status}'}")
    who = json.loads(body)
    expires = _expiry(token)
    until = ""
    if expires is not None:
        left = expires - time.time()
        until = f", until {datetime.fromtimestamp(expires, timezone.utc):%Y-%m-%d %H:%M:%S} UTC " \
                f"({_left(left)})"
    roles = ", ".join(who["roles"]) or "no role this service knows"
    org = f", organisation {who['org']}" if who.get("org") else ""
    return ok("token", f"valid for {url}{until}: subject {who['subject']!r}, roles {roles}{org}")


def _expiry(token: str) -> float | None:
    """The token's `exp` (its signature is the server's business; this is only for the reader)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _left(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0, int(seconds))} s left"
    if seconds < 7200:
        return f"{int(seconds // 60)} min left"
    return f"{seconds / 3600:.0f} h left"


def _field(body: bytes, name: str) -> str | None:
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


def _plain(exc: BaseException) -> str:
    import os

    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, OSError):
        exc = exc.reason
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc).splitlines()[0] if str(exc) else "no answer"

"""`consent-ledger serve` as a real subprocess on loopback, for tests that
need a live server (fuzzing, log capture)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
from joserfc.jwk import OKPKey

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until_ready(session: aiohttp.ClientSession, url: str, process: subprocess.Popen,
                           *, seconds: float = 60.0, log: Path | None = None) -> None:
    """Poll /readyz until 200 (bounded); fail at once if the server exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise AssertionError(f"server exited with {process.returncode} before it was ready:\n{tail}")
        try:
            async with session.get(f"{url}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"server at {url} did not become ready in {seconds:.0f} s")


class LiveServer:
    def __init__(self, *, database_url: str, signing_key: OKPKey, issuer: str, audience: str, workdir: Path,
                 extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        jwks = workdir / "jwks.json"
        jwks.write_text(json.dumps({"keys": [signing_key.as_dict(private=False)]}))
        self.log_path = workdir / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")}
        env.update({
            "DATABASE_URL": database_url,
            "CONSENT_LEDGER_DATA_DIR": str(workdir / "data"),
            "CONSENT_LEDGER_JWKS": str(jwks),
            "CONSENT_LEDGER_JWT_ISSUER": issuer,
            "CONSENT_LEDGER_JWT_AUDIENCE": audience,
            "CONSENT_LEDGER_LOG_LEVEL": "debug",
            "CONSENT_LEDGER_LOG_FORMAT": "json",
            "CONSENT_LEDGER_POOL_SIZE": "4",
            **(extra_env or {}),
        })
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, attempts: int = 600) -> None:
        for _ in range(attempts):
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server never became ready")

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return self.log_path.read_text(errors="replace")

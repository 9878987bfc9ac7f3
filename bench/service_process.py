"""Run `consent-ledger serve` as a subprocess against a benchmark database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

import aiohttp

PORT = 8097


class Service:
    def __init__(self, dsn: str, port: int = PORT):
        self.dsn, self.port = dsn, port
        self.data_dir = tempfile.mkdtemp(prefix="cl-bench-")
        self.env = {**os.environ, "DATABASE_URL": dsn, "CONSENT_LEDGER_DATA_DIR": self.data_dir,
                    "CONSENT_LEDGER_LOG_LEVEL": "warning"}
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def token(self, role: str, org: str | None = None) -> str:
        args = [sys.executable, "-m", "service.cli.main", "token", "issue", "--role", role, "--lifetime", "36000"]
        if org:
            args += ["--org", org]
        out = subprocess.run(args, env=self.env, check=True, capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1]

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--port", str(self.port)], env=self.env,
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.data_dir, "serve.log"), "wb"))
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("service did not become ready")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

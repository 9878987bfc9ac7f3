"""A PostgreSQL cluster of the test's own, from the binaries pgserver ships,
on a free loopback port: fault tests restart it, kill it and terminate its
backends without disturbing the server every other test shares."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg
import pgserver
from live_server import free_port


class PrivateCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="consent-ledger-faults-"))
        self.pgdata = self.dir / "pgdata"
        self.log = self.dir / "postgres.log"
        # initdb refuses to run as root; pgserver runs its clusters as this user then.
        self.user = "pgserver" if os.geteuid() == 0 else None
        if self.user is not None:
            from pgserver.utils import ensure_user_exists

            entry = ensure_user_exists(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        pgserver.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres", "--no-sync"],
                        pgdata=self.pgdata, user=self.user)
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def start(self, seconds: float = 30.0) -> None:
        """Start the postmaster; after a kill -9 its orphaned backends may
        hold the old shared memory for a moment, so keep trying."""
        # fsync off: a killed postmaster keeps what the OS has; only a machine crash would lose it.
        options = f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off -c max_connections=60"
        deadline = time.monotonic() + seconds
        while True:
            try:
                pgserver.pg_ctl(["-w", "-t", "20", "-l", str(self.log), "-o", options, "start"],
                                pgdata=self.pgdata, user=self.user, timeout=30)
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        pgserver.pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=self.user, timeout=60)

    def kill_postmaster(self) -> None:
        """``kill -9`` of the postmaster, then wait until it is gone (and
        give its orphaned backends, which exit on noticing, a moment)."""
        pid = int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        time.sleep(0.3)

    async def terminate_backends(self, database: str) -> int:
        """pg_terminate_backend for every connection to ``database``; how many."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()", database)
        finally:
            await conn.close()

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)

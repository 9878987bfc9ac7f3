"""A PostgreSQL cluster of the test's own, on a free loopback port: fault
tests restart it, kill it and terminate its backends without disturbing the
server every other test shares; replication tests make a second one a
streaming replica of the first (``tests/replication.py``).

By default the binaries are the ones pgserver ships; a cluster can be made
from another installation's (``bin_dir``), as long as all clusters that
replicate to each other use the same one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import asyncpg
from live_server import free_port
from pgserver._commands import POSTGRES_BIN_PATH

PGSERVER_BIN = POSTGRES_BIN_PATH


class PrivateCluster:
    """``initdb`` a new cluster, or, given ``replica_of``, take a base backup of
    that (running) cluster with ``pg_basebackup -R`` through the physical
    replication slot ``slot`` (created on it), so this one starts as its hot
    standby and the primary keeps the WAL it has not replayed yet, however long
    it is stopped.  ``settings`` go into postgresql.conf (a replica inherits
    its primary's)."""

    def __init__(self, *, bin_dir: Path = PGSERVER_BIN, settings: Mapping[str, str] | None = None,
                 replica_of: PrivateCluster | None = None, slot: str = "replica") -> None:
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="consent-ledger-pg-"))
        self.pgdata = self.dir / "pgdata"
        self.log = self.dir / "postgres.log"
        # initdb refuses to run as root; pgserver runs its clusters as this user then.
        self.user = "pgserver" if os.geteuid() == 0 else None
        if self.user is not None:
            from pgserver.utils import ensure_user_exists

            entry = ensure_user_exists(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        if replica_of is None:
            self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres",
                      "--no-sync")
        else:
            self._run("pg_basebackup", "-D", str(self.pgdata), "-d",
                      f"host=127.0.0.1 port={replica_of.port} user=postgres",
                      "--write-recovery-conf", "--create-slot", f"--slot={slot}",
                      "--wal-method=stream", "--checkpoint=fast", "--no-sync")
        if settings:
            with (self.pgdata / "postgresql.conf").open("a") as conf:
                conf.write("".join(f"{name} = '{value}'\n" for name, value in settings.items()))
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        # Output to a file, not a pipe: the postmaster pg_ctl starts would inherit a pipe and hold it open.
        with tempfile.TemporaryFile("w+") as out:
            try:
                subprocess.run([str(self.bin_dir / tool), *args], check=True, stdout=out, stderr=subprocess.STDOUT,
                               text=True, user=self.user, timeout=timeout)
            except subprocess.CalledProcessError as exc:
                out.seek(0)
                exc.add_note(out.read()[-4000:])
                raise

    def start(self, seconds: float = 30.0) -> None:
        """Start the postmaster; after a kill -9 its orphaned backends may
        hold the old shared memory for a moment, so keep trying."""
        # fsync off: a killed postmaster keeps what the OS has; only a machine crash would lose it.
        options = f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off -c max_connections=60"
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "20", "-l", str(self.log), "-o", options,
                          "start", timeout=30)
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")

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

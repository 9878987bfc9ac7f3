"""Machine details printed at the top of every benchmark.

Figures mean little without the machine they came from, the PostgreSQL
durability settings (fsync off would make any append figure meaningless for
a ledger) and how busy the machine was while they were taken.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any

import asyncpg

_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method", "shared_buffers",
             "max_connections", "commit_delay")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"') + f" (kernel {platform.release()})"
    except OSError:
        pass
    return platform.platform()


def load_average() -> str:
    """Other work on the machine skews every figure: print this before and after each run."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} cores)"


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(who).ru_maxrss / 1024


def process_peak_rss_mib(pid: int) -> float | None:
    """Peak RSS (VmHWM) of another running process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def postgres_details(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        details: dict[str, Any] = {"server": await conn.fetchval("SHOW server_version")}
        for name in _SETTINGS:
            details[name] = await conn.fetchval(f"SHOW {name}")
        return details
    finally:
        await conn.close()


def machine_lines() -> list[str]:
    return [
        f"cpu:      {cpu_model()}, {os.cpu_count()} cores",
        f"memory:   {memory_total()}",
        f"os:       {os_name()}",
        f"python:   {sys.version.split()[0]} ({platform.python_implementation()})",
    ]


def print_machine(pg: dict[str, Any] | None = None) -> None:
    for line in machine_lines():
        print(line)
    if pg is not None:
        print(f"postgres: {pg['server']}; " + ", ".join(f"{k}={v}" for k, v in pg.items() if k != "server"))
    print(f"load:     {load_average()}")
    sys.stdout.flush()


async def describe(dsn: str | None) -> str:
    """The machine (and PostgreSQL, given a DSN) as text, for scripts that print a header."""
    lines = machine_lines()
    if dsn:
        pg = await postgres_details(dsn)
        lines.append(f"postgres: {pg['server']}; " + ", ".join(f"{k}={v}" for k, v in pg.items() if k != "server"))
    lines.append(f"load:     {load_average()}")
    return "\n".join(lines)


def require_durable(pg: dict[str, Any]) -> None:
    """Refuse to measure a server that does not make commits durable."""
    if pg["fsync"] != "on" or pg["synchronous_commit"] not in ("on", "remote_apply", "remote_write", "local"):
        raise SystemExit(f"refusing to benchmark: fsync={pg['fsync']} synchronous_commit={pg['synchronous_commit']}"
                         " (a ledger's appends are only meaningful when durable)")


if __name__ == "__main__":
    print_machine()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 if it is gone).

    CPU per request or per event is the figure that stays meaningful when
    other work shares the machine; wall-clock throughput does not.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def backend_pids(admin_dsn: str, database: str) -> list[int]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", database)
        return [r["pid"] for r in rows]
    finally:
        await conn.close()


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

"""Machine and PostgreSQL details printed next to every benchmark figure."""

from __future__ import annotations

import os
import platform

import asyncpg


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


async def describe(dsn: str | None) -> str:
    lines = [
        f"cpu: {_cpu_model()}, {os.cpu_count()} logical cores (shared with other work while measured)",
        f"ram: {_ram_gib():.1f} GiB; python {platform.python_version()}",
    ]
    if dsn:
        conn = await asyncpg.connect(dsn)
        try:
            settings = {k: await conn.fetchval(f"SHOW {k}") for k in ("server_version", "fsync", "synchronous_commit")}
        finally:
            await conn.close()
        lines.append("postgresql: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return "\n".join(lines)

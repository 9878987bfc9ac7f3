"""Machine details printed with every benchmark's figures."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kb / 1024 / 1024:.1f} GiB RAM"
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            "(cores shared with other work while measuring)")


def peak_rss_mib(pid: int | None = None) -> float:
    """VmHWM (peak resident set) of a process, in MiB."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        kb = int(next(line.split()[1] for line in f if line.startswith("VmHWM")))
    return kb / 1024

"""CPU-heavy request work off the event loop, in a few worker threads.

Parsing millions of NHS numbers, encoding a cohort and filtering take a
second or more of CPU per 5M-number request.  On the event loop they would
stall every other request; in these threads they do not, because numpy,
hashlib and zlib release the GIL for most of it (and the work is cut into
pieces so that no single call holds it for long).  There are as many
threads as cores: more big requests than that wait their turn rather than
each getting slower and holding its memory longer.

(Lowering these threads' OS priority was tried and made things worse: a
descheduled low-priority thread that holds the GIL stalls the event loop.)
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class WorkerThreads:
    def __init__(self, threads: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 2, thread_name_prefix="bulk-work")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in a worker thread, with this task's context (log fields)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

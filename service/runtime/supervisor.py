"""Long-lived background tasks, supervised: none of them dies silently.

Each task (checkpoint signer, projection runner and the opt-out filter it
feeds, JWKS refresher, ...) is a coroutine function that loops forever and
calls ``beat()`` whenever it has done a round of work successfully.  The
supervisor logs any exception with the task's name when it happens, restarts
the task after a backoff (doubling up to ``max_backoff``, back to the start
once the task makes progress again), and reports a task that has made no
progress for ``stall_after`` seconds beyond its own period, so that
``/readyz`` can say which task is stuck and why.  Stopping cancels every
task and never raises because a task failed earlier.

Adding a task is one call: ``supervisor.start("name", work, every=period)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

Beat = Callable[[], None]
Work = Callable[[Beat], Awaitable[None]]

FIRST_BACKOFF = 0.1


@dataclass
class TaskState:
    name: str
    every: float
    started: float  # monotonic
    last_progress: float | None = None  # monotonic
    last_success_at: float | None = None  # unix time, for /metrics
    restarts: int = 0
    last_error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def beat(self) -> None:
        self.last_progress = time.monotonic()
        self.last_success_at = time.time()
        self.last_error = None


@dataclass(frozen=True)
class Stall:
    task: str
    reason: str

    def __str__(self) -> str:
        return f"{self.task}: {self.reason}"


class Supervisor:
    def __init__(self, *, stall_after: float = 30.0, max_backoff: float = 5.0):
        self.stall_after = stall_after
        self.max_backoff = max_backoff
        self.tasks: dict[str, TaskState] = {}

    def start(self, name: str, work: Work, *, every: float = 0.0) -> None:
        """Run ``work(beat)`` until stopped; ``every`` is how long the task
        may normally go between beats (e.g. its polling interval)."""
        if name in self.tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        state = TaskState(name, every, time.monotonic())
        state.task = asyncio.create_task(self._keep_running(state, work), name=name)
        self.tasks[name] = state

    async def _keep_running(self, state: TaskState, work: Work) -> None:
        backoff = FIRST_BACKOFF
        while True:
            attempt_started = time.monotonic()
            try:
                await work(state.beat)
                raise RuntimeError("the task returned; it is meant to run until stopped")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is logged here, then retried
                if state.last_progress is not None and state.last_progress >= attempt_started:
                    backoff = FIRST_BACKOFF  # it worked for a while: a fresh failure, retry soon
                state.restarts += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                log.error("background task failed; restarting", task=state.name, error=state.last_error,
                          restarts=state.restarts, retry_in=round(backoff, 2), exc_info=exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    def stalls(self) -> list[Stall]:
        """Tasks without progress for longer than their period plus ``stall_after``."""
        now = time.monotonic()
        out = []
        for state in self.tasks.values():
            since = state.last_progress if state.last_progress is not None else state.started
            quiet = now - since
            if quiet > state.every + self.stall_after:
                what = "no progress" if state.last_progress is not None else "no progress since start"
                why = f" (last error: {state.last_error})" if state.last_error else ""
                out.append(Stall(state.name, f"{what} for {quiet:.0f} s{why}"))
        return out

    async def stop(self, *names: str) -> None:
        """Cancel the named tasks (all if none are named) and wait for them.
        Never raises for a task that failed earlier: its failure was logged
        and retried when it happened."""
        chosen = names or tuple(self.tasks)
        states = [self.tasks.pop(name) for name in chosen if name in self.tasks]
        for state in states:
            assert state.task is not None
            state.task.cancel()
        for state in states:
            assert state.task is not None
            try:
                await state.task  # failures were caught, logged and retried inside
            except asyncio.CancelledError:
                # The task cancelled above has ended. If the caller is itself
                # being cancelled (Ctrl-C while a command shuts down), that
                # cancellation must go on, not end here as a normal stop.
                if (me := asyncio.current_task()) is not None and me.cancelling():
                    raise

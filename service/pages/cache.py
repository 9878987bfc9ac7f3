"""A value computed at most once per period, however many visitors ask at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Expiring(Generic[T]):
    def __init__(self, seconds: float):
        self.seconds = seconds
        self._value: T | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self, compute: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at > self.seconds:
                self._value, self._at = await compute(), time.monotonic()
            return self._value

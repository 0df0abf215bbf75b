"""A change counter that threads and asyncio tasks can wait on.

The federation's state changes on several threads (the journal writer acknowledging chunks, the
selection worker, the deadline watcher); rpc handlers run on an asyncio event loop and must wait
for changes without holding a thread (a site waiting for the bank is a parked coroutine, not a
blocked worker). Every change bumps the counter; a waiter passes the last value it saw and
wakes when it differs (or at its timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

__all__ = ["ChangeFeed"]


class ChangeFeed:
    """Monotonic change counter with thread and asyncio waiters."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._value = 0
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = []

    @property
    def value(self) -> int:
        return self._value

    def notify(self) -> None:
        """Record a change and wake every waiter (callable from any thread)."""
        with self._condition:
            self._value += 1
            value = self._value
            waiters, self._async_waiters = self._async_waiters, []
            self._condition.notify_all()
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: its waiter is gone
                loop.call_soon_threadsafe(_resolve, future, value)

    def wait(self, seen: int, timeout: float) -> int:
        """Block this thread until the counter differs from ``seen`` or ``timeout`` s passed."""
        with self._condition:
            self._condition.wait_for(lambda: self._value != seen, timeout=timeout)
            return self._value

    async def wait_async(self, seen: int, timeout: float) -> int:
        """Wait in a coroutine (no thread held) until the counter differs from ``seen`` or
        ``timeout`` seconds passed; returns the current value."""
        loop = asyncio.get_running_loop()
        with self._condition:
            if self._value != seen:
                return self._value
            future: asyncio.Future[int] = loop.create_future()
            self._async_waiters.append((loop, future))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return self._value
        finally:
            with self._condition:
                self._async_waiters = [w for w in self._async_waiters if w[1] is not future]


def _resolve(future: asyncio.Future[int], value: int) -> None:
    if not future.done():
        future.set_result(value)

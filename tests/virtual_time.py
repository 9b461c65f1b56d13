"""A virtual clock for tests with many concurrent tasks: nothing really sleeps.

Every wait goes through :meth:`VirtualTime.sleep`; time jumps to the next wake-up only when
every task is blocked, so waits are exact and a minute of virtual time takes milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import anyio
import sniffio


async def all_tasks_blocked() -> None:
    """Return once every other task is blocked, as :func:`anyio.wait_all_tasks_blocked`
    does; on asyncio without its 0.1 s of real sleep each time a task is still runnable
    (the same test of each task's pending future, re-checked after a bare yield)."""
    if sniffio.current_async_library() != "asyncio":
        await anyio.wait_all_tasks_blocked()
        return
    this = asyncio.current_task()
    while True:
        await asyncio.sleep(0)
        for task in asyncio.all_tasks():
            if task is this:
                continue
            waiter = task._fut_waiter  # type: ignore[attr-defined]
            if waiter is None or waiter.done():
                break
        else:
            return


class VirtualTime:
    """A clock (:meth:`clock`) and a sleep (:meth:`sleep`) on virtual time starting at
    ``start``. :meth:`advance` wakes the next sleeper; :meth:`drive`, run as a task beside
    the others, advances until they are done. :attr:`sleeps` records every requested sleep.

    ``threads``: the tasks also wait on worker threads (a runner checks images in them). A
    task waiting on a thread looks blocked, and time would race ahead of the thread's real
    work; anyio's own wait, which sleeps 0.1 s of real time whenever a task is still
    runnable, leaves threads that time, and every sleeper due at one instant wakes together.
    """

    def __init__(self, start: float = 0.0, *, threads: bool = False) -> None:
        self.now = start
        self.threads = threads
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        """The virtual time now."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of virtual time."""
        self.sleeps.append(seconds)
        event = anyio.Event()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), event))
        await event.wait()

    async def advance(self) -> bool:
        """Run everything that can run, then wake the next sleeper; False when none sleeps."""
        if self.threads:
            await anyio.wait_all_tasks_blocked()
        else:
            await all_tasks_blocked()
        if not self._sleepers:
            return False
        wake, _, event = heapq.heappop(self._sleepers)
        self.now = max(self.now, wake)
        event.set()
        while self.threads and self._sleepers and self._sleepers[0][0] <= self.now:
            heapq.heappop(self._sleepers)[2].set()
        return True

    async def drive(self, done: anyio.Event | None = None) -> None:
        """Advance time until ``done`` is set, or (without ``done``) until nothing sleeps.
        With ``done``, a moment with no sleeper is a thread at work: wait for it."""
        while done is None or not done.is_set():
            if not await self.advance():
                if done is None:
                    return
                await anyio.sleep(0.001)

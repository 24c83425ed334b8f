"""The driver's own threads, which share the work of an embedded Ray's run (see ``ray_runner``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from engine.runners.base import run_item
from engine.runners.cost import LaneMeasurement, measure_lane

WAIT_STEP = 0.25  # seconds the driver's main thread waits at a time


class LocalLane:
    """Items the driver runs itself, on up to ``threads`` threads; results in completion order.

    ``fn`` must be safe to run in threads (the engine's unit and shard functions share nothing
    but read-only context). The clocks at each item's end are kept for :meth:`measured`."""

    def __init__(self, fn: Callable[..., Any], threads: int):
        self._fn, self.threads = fn, max(threads, 1)
        self._pool: ThreadPoolExecutor | None = None
        self._running: set[Future] = set()
        self._ends: list[tuple[float, float]] = []  # (wall clock, process CPU clock) as each item ended
        self._lock = threading.Lock()

    def _timed(self, args: tuple) -> Any:
        try:
            return run_item(self._fn, args)
        finally:
            with self._lock:
                self._ends.append((time.perf_counter(), time.process_time()))

    @property
    def num_items(self) -> int:
        return len(self._ends)

    def measured(self) -> LaneMeasurement | None:
        """What the threads measured so far (``cost.measure_lane``)."""
        with self._lock:  # reads two of the clocks, not a copy of them all
            return measure_lane(self._ends, self.threads)

    def has_room(self) -> bool:
        return len(self._running) < self.threads

    @property
    def idle(self) -> bool:
        return not self._running

    def fill(self, pending: Iterator[tuple]) -> tuple[int, bool]:
        """Submit items from ``pending`` until every thread has one; returns how many were
        submitted and whether ``pending`` ran out."""
        submitted = 0
        while self.has_room():
            args = next(pending, None)
            if args is None:
                return submitted, True
            self.submit(args)
            submitted += 1
        return submitted, False

    def submit(self, args: tuple) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="engine-driver")
        self._running.add(self._pool.submit(self._timed, args))

    def collect(self, timeout: float | None) -> Iterator[Any]:
        """Results of the items that finished, waiting up to ``timeout`` (None: until one does)."""
        if not self._running:
            return
        while True:  # in steps: Ctrl-C may reach another thread, and acts only when a wait ends
            step = WAIT_STEP if timeout is None else min(timeout, WAIT_STEP)
            done, self._running = wait(self._running, timeout=step, return_when=FIRST_COMPLETED)
            if done or timeout is not None:
                break
        for future in done:
            yield future.result()

    def close(self, wait_running: bool = True) -> None:
        """Let running items finish (their files must not be cut off), drop the rest; after
        Ctrl-C, do not wait (a unit's part is written under a temporary name until it is whole)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait_running, cancel_futures=True)

"""The Ray runner: the scheduler that shares a run between the driver's threads and Ray's tasks.

Without an address, Ray starts embedded on this machine with one CPU per worker. Starting and
stopping it costs seconds of CPU, so the driver first works through the items itself, in one
thread per worker, measures them, and starts Ray only when Ray's processes would finish the rest
sooner by more than that ("lazy start"): small jobs never pay for Ray, and neither does image work
on a machine whose cores the driver's threads already keep busy. Ray then starts in a background
thread while the driver keeps working ("warm start"); the rest goes to Ray once its workers
deliver. With an address (or ``RAY_ADDRESS``), it joins that cluster. Tasks receive small
descriptors, never image bytes, and in-flight tasks are bounded so driver and object-store
memory stay flat. When Ray pays is ``cost``'s model; starting and stopping it, ``ray_startup``'s.
This module and ``ray_startup`` are the only ones that import ``ray``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from engine.errors import EngineError, ShardError, UsageError, reason
from engine.runners.base import describe
from engine.runners.cost import estimate_ray, worth_starting_ray
from engine.runners.lane import WAIT_STEP, LocalLane
from engine.runners.ray_startup import ray_running, start_ray, stop_ray

log = logging.getLogger(__name__)
MAX_TASK_RETRIES = 3  # a worker process that dies is retried this many times
IN_FLIGHT_PER_WORKER = 2


def _call(fn: Callable[..., Any], args: tuple) -> tuple[Any, str]:
    import ray

    return fn(*args), ray.get_runtime_context().get_node_id()


_REMOTE: dict[str, Any] = {}


def _remote_call(strategy: str):
    """One remote function per scheduling strategy for every task of the process (registering
    one is not free). On a cluster, SPREAD places tasks across nodes, so every node's CPUs and
    disks share the work even when tasks are short."""
    if strategy not in _REMOTE:
        import ray

        _REMOTE[strategy] = ray.remote(_call).options(
            num_cpus=1, max_retries=MAX_TASK_RETRIES, scheduling_strategy=strategy
        )
    return _REMOTE[strategy]


class RayRunner:
    def __init__(self, workers: int | None = None, address: str | None = None, lazy_start: bool = True):
        self._workers = workers
        self._address = address or os.environ.get("RAY_ADDRESS") or None
        # ENGINE_RAY_START=eager starts an embedded Ray at once, whatever the job's size (tests, benchmarks)
        self._lazy_start = lazy_start and os.environ.get("ENGINE_RAY_START", "lazy") != "eager"
        self._started = False
        self._init_thread: threading.Thread | None = None
        self._init_done = threading.Event()
        self._release = threading.Event()
        self._init_error: BaseException | None = None
        self.num_workers = workers or (os.cpu_count() or 1)
        self._lanes: list[LocalLane] = []  # the driver's own threads, one lane per map_unordered
        self._logged_estimate = False

    def __enter__(self) -> RayRunner:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if ray_running():  # read without importing ray (0.4 s, which a small job never needs)
            self._resolve_workers()
            self._init_done.set()
        elif self._address or not self._lazy_start:
            self._init()
            self._init_done.set()
            self._raise_init_error()
        return self  # an embedded Ray starts later, once the work is known to be worth it

    def _start_in_background(self) -> None:
        if self._init_thread is None:
            log.debug("starting Ray in the background")
            self._init_thread = threading.Thread(target=self._init_and_hold, name="ray-init", daemon=True)
            self._init_thread.start()

    def _worth_starting(self, lane: LocalLane, remaining: int | None) -> bool:
        """Whether Ray would save time, from what the driver's threads measured (``cost``)."""
        measured = lane.measured() if remaining is not None else None
        worth = worth_starting_ray(measured, remaining, self.num_workers)
        if measured is not None and remaining is not None and (worth or not self._logged_estimate):
            self._logged_estimate = True
            estimate = estimate_ray(measured, remaining, self.num_workers)
            log.debug(
                "driver threads: %.3f s per item, %.2f cores busy; Ray could be %.2fx faster and save %.1f s "
                "on %d items: %s",
                measured.seconds_per_item,
                measured.cores_used,
                estimate.speedup,
                estimate.saved,
                remaining,
                "starting it" if worth else "not worth it yet",
            )
        return worth

    def _init(self) -> None:
        import ray  # noqa: F401 - a missing ray fails here, not as a failed start

        started = time.perf_counter()
        try:
            start_ray(self._address, self.num_workers)
            log.debug("Ray started in %.2f s", time.perf_counter() - started)
            self._started = True
            self._resolve_workers()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the driver's thread
            self._init_error = exc

    def _init_and_hold(self) -> None:
        """Start Ray, then keep this thread alive until shutdown: Ray's processes are started with
        a parent-death signal tied to the thread that spawned them, so they would die with it."""
        try:
            self._init()
        finally:
            self._init_done.set()
        self._release.wait()

    def _resolve_workers(self) -> None:
        import ray

        cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        self.num_workers = min(self._workers or cpus, cpus)

    def _raise_init_error(self) -> None:
        if self._init_error is not None:
            where = self._address or "an embedded instance"
            first = str(self._init_error).strip().splitlines()[0] if str(self._init_error).strip() else ""
            raise UsageError(f"cannot start or join Ray ({where}): {type(self._init_error).__name__} {first}")

    def _ready(self) -> bool:
        if not self._init_done.is_set():
            return False
        self._raise_init_error()
        return True

    def __exit__(self, *exc: object) -> None:
        if self._init_thread is not None:
            self._init_done.wait()
        if self.num_local_items:
            log.debug(
                "the driver ran %d items itself; Ray %s",
                self.num_local_items,
                "was started" if self._started else "was not needed",
            )
        if self._started:
            stop_ray(embedded=self._address is None)
        self._release.set()

    @property
    def embedded(self) -> bool:
        """Ray runs on this machine only, so the driver may share the work."""
        return self._address is None

    @property
    def driver_takes_first_units(self) -> bool:
        """The driver's threads take the first units (Ray starts later, if at all): rows fetched
        early in the driver are then the ones its units use, not fetched again by a worker."""
        return self.embedded and self._lazy_start and not ray_running()

    @property
    def in_process(self) -> bool:
        """No Ray was started or joined: everything so far ran in the driver's threads."""
        return self._init_thread is None and not self._init_done.is_set()

    @property
    def num_local_items(self) -> int:
        """Items the driver ran itself."""
        return sum(lane.num_items for lane in self._lanes)

    def _lane(self, fn: Callable[..., Any]) -> LocalLane:
        """The driver's own threads: one per worker of an embedded Ray, one when Ray is elsewhere."""
        lane = LocalLane(fn, self.num_workers if self.embedded else 1)
        self._lanes.append(lane)
        return lane

    def map_unordered(
        self, fn: Callable[..., Any], items: Iterable[tuple], local_first: bool = False
    ) -> Iterator[Any]:
        """Run ``fn`` over ``items`` on Ray. With an embedded Ray, the driver also works, in
        threads: before Ray is worth starting, while it starts, until Ray's workers deliver their
        first result, and, with ``local_first``, on the first item (a single short task runs faster
        here than through a fresh worker). Ray's start is mostly waiting, so without these threads
        a core would sit idle for seconds."""
        items = list(items) if not isinstance(items, Iterator) else items
        remaining = len(items) if isinstance(items, list) else None
        pending = iter(items)
        lane = self._lane(fn)
        try:
            exhausted = False
            while not self._ready():  # lazy and warm start: work here until Ray is up
                if self._init_thread is None and self._worth_starting(lane, remaining):
                    self._start_in_background()
                if not exhausted:
                    submitted, exhausted = lane.fill(pending)
                    remaining = None if remaining is None else remaining - submitted
                if exhausted and lane.idle:
                    return
                yield from lane.collect(timeout=None if self._init_thread is None else 0.05)
            yield from self._map_ray(fn, pending, lane, local_first and self.embedded and lane.idle)
        except KeyboardInterrupt:
            lane.close(wait_running=False)  # the user asked to stop now: running units are dropped
            raise
        finally:
            lane.close()

    def _map_ray(
        self, fn: Callable[..., Any], pending: Iterator[tuple], lane: LocalLane, local_first: bool
    ) -> Iterator[Any]:
        import ray

        remote = _remote_call("DEFAULT" if self.embedded else "SPREAD")
        in_flight: dict[Any, tuple] = {}
        limit = max(1, self.num_workers) * IN_FLIGHT_PER_WORKER
        if local_first:
            args = next(pending, None)
            if args is not None:
                lane.submit(args)
        exhausted, seen_result = False, False
        while in_flight or not exhausted or not lane.idle:
            while not exhausted and len(in_flight) < limit:
                args = next(pending, None)
                if args is None:
                    exhausted = True
                    break
                in_flight[remote.remote(fn, args)] = args
            if self.embedded and not seen_result and not exhausted:  # Ray's workers are still starting
                exhausted = lane.fill(pending)[1]
            yield from lane.collect(timeout=0)
            if not in_flight:
                if not lane.idle:
                    yield from lane.collect(timeout=None)
                continue
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_STEP if lane.idle else 0.05)
            if not done:
                continue
            if not seen_result:
                log.debug("first result from Ray's workers (the driver ran %d items)", self.num_local_items)
            seen_result = True
            for ref in done:
                args = in_flight.pop(ref)
                try:
                    result, node = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if exc.cause is not None else exc
                    if isinstance(cause, EngineError):
                        raise cause from None
                    raise ShardError(describe(args), reason(cause)) from cause
                except ray.exceptions.RayError as exc:
                    raise ShardError(
                        describe(args), f"failed after {MAX_TASK_RETRIES} retries: {exc}"
                    ) from exc
                if hasattr(result, "node"):
                    result.node = node
                yield result

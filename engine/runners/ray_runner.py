"""The Ray runner: the only module that imports ``ray``.

Without an address, Ray starts embedded on this machine with one CPU per worker. Starting and
stopping it costs seconds, so the driver works through the first items itself, measures them,
and starts Ray only when the remaining work spread over the other cores saves more than that
("lazy start"; small jobs never pay for Ray). Ray then starts in a background thread while the
driver keeps working ("warm start"); the rest goes to Ray once it is up.
With an address (or ``RAY_ADDRESS``), it joins that cluster. Tasks receive small descriptors,
never image bytes, and in-flight tasks are bounded so driver and object-store memory stay flat.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from engine.errors import EngineError, ShardError, UsageError
from engine.runners.base import describe, reason, run_item

log = logging.getLogger(__name__)
MAX_TASK_RETRIES = 3  # a worker process that dies is retried this many times
IN_FLIGHT_PER_WORKER = 2
RAY_START_SECONDS = 5.0  # what an embedded Ray costs on 2 cores: start, first tasks, shutdown


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

        _REMOTE[strategy] = ray.remote(_call).options(num_cpus=1, max_retries=MAX_TASK_RETRIES,
                                                      scheduling_strategy=strategy)
    return _REMOTE[strategy]


def _shutdown(embedded: bool) -> None:
    """``ray.shutdown()``, faster for an embedded Ray. It stops Ray's processes one after the other
    and gives each up to a second to exit after SIGTERM; the autoscaler monitor, which a
    single-node Ray never uses, always takes that whole second (measured: 1.0 of 1.4 s). It is
    stopped first here. If Ray's internals differ, the plain shutdown still runs."""
    import ray

    if embedded:
        try:
            from ray._private import ray_constants, worker

            node = worker._global_node
            for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, ()) if node else ():
                info.process.kill()
                info.process.wait(timeout=5)
        except Exception as exc:  # noqa: BLE001 - an optimisation only
            log.debug("could not stop Ray's monitor early: %s", exc)
    ray.shutdown()


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
        self._local_seconds: list[float] = []  # wall time of each item the driver ran itself

    def __enter__(self) -> RayRunner:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray = sys.modules.get("ray")  # importing ray costs 0.4 s, which a small job never needs
        if ray is not None and ray.is_initialized():
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

    def expect_work(self, seconds: float | None) -> None:
        """The driver's estimate of the whole job, single-core: start an embedded Ray right away
        when it clearly pays, instead of after the first measured item."""
        if seconds is not None and not self._init_done.is_set() and self._init_thread is None:
            if seconds * (1 - 1 / max(self.num_workers, 1)) > 2 * RAY_START_SECONDS:
                self._start_in_background()

    def _worth_starting(self, remaining: int | None) -> bool:
        """Whether Ray would save time: the remaining items, at the driver's measured pace,
        spread over the other cores, against Ray's fixed cost. The first item is not a measure:
        it also pays the process's one-off costs (first imports, thread and codec start-up)."""
        if remaining is None:
            return True
        if len(self._local_seconds) < 2:
            return False
        per_item = sum(self._local_seconds[1:]) / (len(self._local_seconds) - 1)
        saved = remaining * per_item * (1 - 1 / max(self.num_workers, 1))
        return saved > RAY_START_SECONDS

    def _init(self) -> None:
        import ray

        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
        if self._address:
            kwargs["address"] = self._address
        else:
            kwargs["num_cpus"] = self.num_workers
            kwargs["object_store_memory"] = 256 * 2**20  # results are small; images never go through it
        started = time.perf_counter()
        try:
            ray.init(**kwargs)
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
            log.debug("the driver ran %d items itself; Ray %s", self.num_local_items,
                      "was started" if self._started else "was not needed")
        if self._started:
            _shutdown(embedded=self._address is None)
        self._release.set()

    @property
    def num_local_items(self) -> int:
        return len(self._local_seconds)

    @property
    def embedded(self) -> bool:
        """Ray runs on this machine only, so the driver may share the work."""
        return self._address is None

    def _run_here(self, fn: Callable[..., Any], args: tuple) -> Any:
        started = time.perf_counter()
        try:
            return run_item(fn, args)
        finally:
            self._local_seconds.append(time.perf_counter() - started)

    def map_unordered(self, fn: Callable[..., Any], items: Iterable[tuple], local_first: bool = False) -> Iterator[Any]:
        """Run ``fn`` over ``items`` on Ray. With an embedded Ray, the driver also works: before
        Ray is worth starting, while it starts, until Ray's workers deliver their first result,
        and, with ``local_first``, on the first item (a single short task runs faster here than
        through a fresh worker)."""
        items = list(items) if not isinstance(items, Iterator) else items
        remaining = len(items) if isinstance(items, list) else None
        pending = iter(items)
        while not self._ready():  # lazy and warm start: work here until Ray is up
            if self._init_thread is None and self._worth_starting(remaining):
                self._start_in_background()
            args = next(pending, None)
            if args is None:
                return
            yield self._run_here(fn, args)
            if remaining is not None:
                remaining -= 1
        yield from self._map_ray(fn, pending, local_first and self.embedded)

    def _map_ray(self, fn: Callable[..., Any], pending: Iterator[tuple], local_first: bool) -> Iterator[Any]:
        import ray

        remote = _remote_call("DEFAULT" if self.embedded else "SPREAD")
        in_flight: dict[Any, tuple] = {}
        limit = max(1, self.num_workers) * IN_FLIGHT_PER_WORKER
        mine = next(pending, None) if local_first else None
        exhausted, seen_result = False, False
        while in_flight or not exhausted or mine is not None:
            while not exhausted and len(in_flight) < limit:
                args = next(pending, None)
                if args is None:
                    exhausted = True
                    break
                in_flight[remote.remote(fn, args)] = args
            if mine is not None:
                yield self._run_here(fn, mine)
                mine = None
                continue
            if not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0 if self.embedded and not seen_result else None)
            if not done:  # Ray's workers are still starting: keep the driver busy meanwhile
                args = next(pending, None)
                if args is None:
                    exhausted = True
                    done, _ = ray.wait(list(in_flight), num_returns=1)
                else:
                    yield self._run_here(fn, args)
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
                    raise ShardError(describe(args), f"failed after {MAX_TASK_RETRIES} retries: {exc}") from exc
                if hasattr(result, "node"):
                    result.node = node
                yield result

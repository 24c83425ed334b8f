"""The Ray runner: the only module that imports ``ray``.

Without an address, Ray starts embedded on this machine with one CPU per worker. Starting and
stopping it costs seconds of CPU, so the driver first works through the items itself, in one
thread per worker, measures them, and starts Ray only when Ray's processes would finish the rest
sooner by more than that ("lazy start"): small jobs never pay for Ray, and neither does image work
on a machine whose cores the driver's threads already keep busy. Ray then starts in a background
thread while the driver keeps working ("warm start"); the rest goes to Ray once its workers
deliver. With an address (or ``RAY_ADDRESS``), it joins that cluster. Tasks receive small
descriptors, never image bytes, and in-flight tasks are bounded so driver and object-store
memory stay flat.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from typing import Any

from engine.errors import EngineError, ShardError, UsageError, reason
from engine.runners.base import describe, run_item

log = logging.getLogger(__name__)
MAX_TASK_RETRIES = 3  # a worker process that dies is retried this many times
IN_FLIGHT_PER_WORKER = 2
# What starting an embedded Ray costs a job whose threads keep the machine busy: Ray's start
# takes CPU from them (3.7-5.2 s to start under load, against 1.7 s idle), then its workers'
# imports, the first tasks and the shutdown. Measured on 2 cores as the gap between the
# estimate's promise and the A/B result: 100k tiny pass-through rows, promised 11-14 s, saved
# 1-3 s; 50k rows of 150 KB, promised 8-10 s, lost 3.6 s (31.2 s threads, 34.8 s Ray), and,
# once pass-through parts stopped copying the images, promised 11.5-14 s and saved nothing
# (units done at 11.8 s with Ray, 11.3 s without; 1.0 GB against 270 MB).
RAY_START_SECONDS = 20.0
# The least gain, estimated from the driver's threads, that starts Ray. The estimate cannot see
# disk limits: on 2 cores, pass-through of 1M tiny images (threads at about 1 core) ran 2.1x
# faster on Ray, but 50k pass-through rows of 150 KB images did not.
# Photos (threads at 1.8-1.9 cores) never start it.
RAY_MIN_SPEEDUP = 1.5


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


@contextmanager
def _lean_embedded_head() -> Iterator[None]:
    """Start an embedded Ray without the head processes a single-machine run never uses: the
    autoscaler monitor (nothing to scale), the log monitor (workers' output stays in Ray's session
    logs; the engine's workers report through their results, never through stdout) and the API
    server behind ``ray job``/``ray list`` (the plain ``ray`` package has no dashboard UI). On
    2 cores they cost 1.4 CPU-seconds, 0.7 s of ``ray.init`` and 250 MB of memory per command
    (bench/GAP.md). Ray's ``init`` does not expose these switches, so its private ``RayParams``
    and ``Node`` are adjusted for the duration of this one call; if they are not what this code
    expects, Ray starts with everything, as before. ``ENGINE_RAY_HEAD=full`` keeps everything."""
    if os.environ.get("ENGINE_RAY_HEAD", "lean") == "full":
        yield
        return
    try:
        from ray._private import node as ray_node
        from ray._private import parameter

        base_params, base_api = parameter.RayParams, ray_node.Node.start_api_server
        if not {"no_monitor", "include_log_monitor"} <= set(inspect.signature(base_params).parameters):
            raise AttributeError("RayParams has no no_monitor/include_log_monitor")
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        log.debug("starting Ray with all its head processes: %s", exc)
        yield
        return

    class LeanParams(base_params):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("no_monitor", True)
            kwargs.setdefault("include_log_monitor", False)
            super().__init__(*args, **kwargs)

    def no_api_server(node: Any, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
        if include_dashboard:
            base_api(node, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)
        else:
            node._webui_url = ""

    parameter.RayParams, ray_node.Node.start_api_server = LeanParams, no_api_server
    try:
        yield
    finally:
        parameter.RayParams, ray_node.Node.start_api_server = base_params, base_api


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
        self._lanes: list[_LocalLane] = []  # the driver's own threads, one lane per map_unordered
        self._logged_estimate = False

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

    def _worth_starting(self, lane: _LocalLane, remaining: int | None) -> bool:
        """Whether Ray would save time, from what the driver's threads measured.

        The driver's threads share one interpreter: decoding, resizing and encoding run in
        parallel (Pillow releases the GIL), Python code does not. The process's CPU time over
        the threads' wall time says how many cores they keep busy (``cores_used``); Ray's
        processes could keep all of the workers' cores busy, so at best they would be
        ``workers / cores_used`` times faster. Disk and network waits cut both alike, so that
        bound is optimistic: Ray starts only when it promises at least RAY_MIN_SPEEDUP and the
        time it would save exceeds its own cost (see RAY_MIN_SPEEDUP for what was measured).
        Each thread's first item is not a measure: it also pays one-off costs (first imports,
        codec start-up)."""
        if remaining is None:
            return True
        measured = lane.measured()
        if measured is None:
            return False
        seconds_per_item, cores_used = measured
        speedup = max(self.num_workers, 1) / max(cores_used, 0.05)
        saved = remaining * seconds_per_item * (1 - 1 / speedup)
        worth = speedup >= RAY_MIN_SPEEDUP and saved > RAY_START_SECONDS
        if worth or not self._logged_estimate:
            self._logged_estimate = True
            log.debug("driver threads: %.3f s per item, %.2f cores busy; Ray could be %.2fx faster and save %.1f s "
                      "on %d items: %s", seconds_per_item, cores_used, speedup, saved, remaining,
                      "starting it" if worth else "not worth it yet")
        return worth

    def _init(self) -> None:
        import ray

        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
        if self._address:
            kwargs["address"] = self._address
        else:  # "local": an instance of its own, even when `ray start` left a cluster on this machine
            kwargs["address"] = "local"
            kwargs["num_cpus"] = self.num_workers
            kwargs["object_store_memory"] = 256 * 2**20  # results are small; images never go through it
        started = time.perf_counter()
        try:
            with nullcontext() if self._address else _lean_embedded_head():
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
    def embedded(self) -> bool:
        """Ray runs on this machine only, so the driver may share the work."""
        return self._address is None

    @property
    def in_process(self) -> bool:
        """No Ray was started or joined: everything so far ran in the driver's threads."""
        return self._init_thread is None and not self._init_done.is_set()

    @property
    def num_local_items(self) -> int:
        """Items the driver ran itself."""
        return sum(lane.num_items for lane in self._lanes)

    def _lane(self, fn: Callable[..., Any]) -> _LocalLane:
        """The driver's own threads: one per worker of an embedded Ray, one when Ray is elsewhere."""
        lane = _LocalLane(fn, self.num_workers if self.embedded else 1)
        self._lanes.append(lane)
        return lane

    def map_unordered(self, fn: Callable[..., Any], items: Iterable[tuple], local_first: bool = False) -> Iterator[Any]:
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
        finally:
            lane.close()

    def _map_ray(self, fn: Callable[..., Any], pending: Iterator[tuple], lane: _LocalLane,
                 local_first: bool) -> Iterator[Any]:
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
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=None if lane.idle else 0.05)
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
                    raise ShardError(describe(args), f"failed after {MAX_TASK_RETRIES} retries: {exc}") from exc
                if hasattr(result, "node"):
                    result.node = node
                yield result


class _LocalLane:
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

    def measured(self) -> tuple[float, float] | None:
        """(wall seconds per item, cores used) from the end of each thread's first item to the
        latest item's end; None until each thread has finished two items."""
        with self._lock:
            if len(self._ends) < 2 * self.threads:
                return None
            (wall0, cpu0), (wall1, cpu1) = self._ends[self.threads - 1], self._ends[-1]
            items = len(self._ends) - self.threads
        elapsed = max(wall1 - wall0, 1e-6)
        return elapsed / items, (cpu1 - cpu0) / elapsed

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
        done, self._running = wait(self._running, timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            yield future.result()

    def close(self) -> None:
        """Let running items finish (their files must not be cut off), drop the rest."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

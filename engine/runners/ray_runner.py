"""The Ray runner: the only module that imports ``ray``.

Without an address, Ray starts embedded on this machine with one CPU per worker. With an
address (or ``RAY_ADDRESS``), it joins that cluster. Tasks receive small descriptors, never
image bytes; in-flight tasks are bounded so driver and object-store memory stay flat.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from engine.errors import ShardError, UsageError

log = logging.getLogger(__name__)
MAX_TASK_RETRIES = 3  # a worker process that dies is retried this many times


def _call(fn: Callable[..., Any], args: tuple) -> tuple[Any, str]:
    import ray

    return fn(*args), ray.get_runtime_context().get_node_id()


class RayRunner:
    def __init__(self, workers: int | None = None, address: str | None = None):
        self._workers = workers
        self._address = address or os.environ.get("RAY_ADDRESS") or None
        self._started = False
        self.num_workers = workers or (os.cpu_count() or 1)

    def __enter__(self) -> RayRunner:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                      "configure_logging": True, "log_to_driver": True}
            if self._address:
                kwargs["address"] = self._address
            else:
                kwargs["num_cpus"] = self.num_workers
                kwargs["object_store_memory"] = 256 * 2**20  # results are small; images never go through it
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = self._address or "an embedded instance"
                raise UsageError(f"cannot start or join Ray ({where}): {str(exc).splitlines()[0]}") from None
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.num_workers = min(self._workers or cpus, max(cpus, 1))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            ray.shutdown()

    def map_unordered(self, fn: Callable[..., Any], items: Iterable[tuple]) -> Iterator[Any]:
        import ray

        remote = ray.remote(_call).options(num_cpus=1, max_retries=MAX_TASK_RETRIES)
        in_flight: dict[Any, tuple] = {}
        pending = iter(items)
        limit = max(1, self.num_workers) * 2
        exhausted = False
        while in_flight or not exhausted:
            while not exhausted and len(in_flight) < limit:
                args = next(pending, None)
                if args is None:
                    exhausted = True
                    break
                in_flight[remote.remote(fn, args)] = args
            if not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                args = in_flight.pop(ref)
                try:
                    result, node = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if exc.cause is not None else exc
                    raise ShardError(_describe(args), f"{type(cause).__name__}: {cause}") from cause
                except ray.exceptions.RayError as exc:
                    raise ShardError(_describe(args), f"failed after {MAX_TASK_RETRIES} retries: {exc}") from exc
                if hasattr(result, "node"):
                    result.node = node
                yield result


def _describe(args: tuple) -> str:
    first = args[0] if args else None
    index = getattr(first, "index", None)
    kind = type(first).__name__
    return f"{kind} {index}" if index is not None else kind

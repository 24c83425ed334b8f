"""Starting and stopping Ray: ``ray.init``'s arguments, and the adjustments of Ray's private
start-up and shutdown that make an embedded, single-machine Ray cheaper. Every adjustment is
an optimisation only: where Ray's internals are not what this code expects, Ray starts and
stops as it always does."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)
EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20  # results are small; images never go through it


def ray_running() -> bool:
    """Whether this process has started (or joined) Ray; read from sys.modules, so a run
    without Ray never imports it."""
    # ray may be half imported (the lazy start imports it in a thread): not running yet
    is_initialized = getattr(sys.modules.get("ray"), "is_initialized", None)
    return is_initialized is not None and is_initialized()


def start_ray(address: str | None, num_cpus: int) -> None:
    """Join the cluster at ``address``, or start an embedded Ray with ``num_cpus`` CPUs."""
    import ray

    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": True,
    }
    if address:
        kwargs["address"] = address
    else:  # "local": an instance of its own, even when `ray start` left a cluster on this machine
        kwargs["address"] = "local"
        kwargs["num_cpus"] = num_cpus
        kwargs["object_store_memory"] = EMBEDDED_OBJECT_STORE_BYTES
    with nullcontext() if address else lean_embedded_head():
        ray.init(**kwargs)


@contextmanager
def lean_embedded_head() -> Iterator[None]:
    """Start an embedded Ray without the head processes a single-machine run never uses: the
    autoscaler monitor (nothing to scale), the log monitor (workers' output stays in Ray's session
    logs; the engine's workers report through their results, never through stdout) and the API
    server behind ``ray job``/``ray list`` (the plain ``ray`` package has no dashboard UI); what
    they cost is in bench/GAP.md. Ray's ``init`` does not expose these switches, so its private
    ``RayParams`` and ``Node`` are adjusted for the duration of this one call; if they are not
    what this code expects, Ray starts with everything, as before. ``ENGINE_RAY_HEAD=full`` keeps
    everything."""
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


def stop_ray(embedded: bool) -> None:
    """``ray.shutdown()``, faster for an embedded Ray. It stops Ray's processes one after the other
    and gives each up to a second to exit after SIGTERM; the autoscaler monitor, which a
    single-node Ray never uses, always takes that whole second (bench/GAP.md). It is stopped
    first here. If Ray's internals differ, the plain shutdown still runs."""
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

"""Output layouts: the registry. Adding a layout is one module with a ``Layout`` subclass and
``@register``; the driver, the shard writers and ``engine update`` reach it through ``layout_for``."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from engine.errors import UsageError

if TYPE_CHECKING:
    from engine.config import ConvertOptions
    from engine.layouts.base import Layout
    from engine.sinks.shards import ShardResult, ShardSpec
    from engine.sinks.store import Finisher

log = logging.getLogger(__name__)
LAYOUTS: dict[str, type[Layout]] = {}


def register(cls: type[Layout]) -> type[Layout]:
    """Make ``cls`` available as ``--layout cls.name``."""
    LAYOUTS[cls.name] = cls
    return cls


def layout_for(opts: ConvertOptions) -> Layout:
    """The run's layout, chosen once from the options."""
    cls = LAYOUTS.get(opts.layout)
    if cls is None:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, not {opts.layout!r}")
    return cls.from_options(opts)


def write_shard(spec: ShardSpec, finisher: Finisher | None = None) -> ShardResult:
    """Assemble and write one final shard with its layout's writer (runs in a worker, or in the
    driver with a finisher that fsyncs and renames it in the background)."""
    started = time.perf_counter()
    result = spec.layout.write_shard(spec, finisher)
    log.debug("wrote %s (%d rows) in %.2f s", spec.relpath, result.num_rows, time.perf_counter() - started)
    return result


from engine.layouts import parquet  # noqa: E402,F401,I001 - register the built-in layouts, in this order
from engine.layouts import packed  # noqa: E402,F401
from engine.layouts import messages  # noqa: E402,F401

"""Fan work out: in-process (``LocalRunner``) or over Ray (``RayRunner``), same interface.

A runner maps a module-level function over small picklable argument tuples and yields the
results as they complete (in any order). It knows nothing of formats.
"""

from __future__ import annotations

from engine.config import ConvertOptions
from engine.runners.base import Runner
from engine.runners.local import LocalRunner


def make_runner(opts: ConvertOptions) -> Runner:
    if opts.runner == "local":
        return LocalRunner()
    from engine.runners.ray_runner import RayRunner

    return RayRunner(workers=opts.workers, address=opts.ray_address)


__all__ = ["LocalRunner", "Runner", "make_runner"]

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from engine.runners.base import run_item


class LocalRunner:
    """Everything in this process, one item after another. For tests, debugging and tiny jobs."""

    num_workers = 1
    embedded = True  # everything runs on this machine
    in_process = True  # ... in this process
    driver_takes_first_units = True

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map_unordered(
        self, fn: Callable[..., Any], items: Iterable[tuple], local_first: bool = False
    ) -> Iterator[Any]:
        for args in items:
            yield run_item(fn, args)

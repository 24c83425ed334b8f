from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol


class Runner(Protocol):
    """Runs ``fn(*args)`` for every ``args`` and yields results in completion order."""

    num_workers: int

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def map_unordered(self, fn: Callable[..., Any], items: Iterable[tuple], local_first: bool = False) -> Iterator[Any]: ...

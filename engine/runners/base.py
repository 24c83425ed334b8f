from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from engine.errors import EngineError, ShardError, reason


class Runner(Protocol):
    """Runs ``fn(*args)`` for every ``args`` and yields results in completion order."""

    num_workers: int
    embedded: bool  # every process runs on this machine (no cluster)
    in_process: bool  # so far everything ran in this process (no Ray started or joined)
    driver_takes_first_units: bool  # the driver's threads run the first units

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def map_unordered(
        self, fn: Callable[..., Any], items: Iterable[tuple], local_first: bool = False
    ) -> Iterator[Any]: ...


def describe(args: tuple) -> str:
    """How an item is named in errors: ``unit 12`` or a shard's path."""
    first = args[0] if args else None
    index = getattr(first, "index", None)
    if index is not None:
        return f"unit {index}"
    return getattr(first, "relpath", type(first).__name__)


def run_item(fn: Callable[..., Any], args: tuple) -> Any:
    """Run one item here; a failure that is not already an EngineError names its item."""
    try:
        return fn(*args)
    except EngineError:
        raise
    except Exception as exc:
        raise ShardError(describe(args), reason(exc)) from exc

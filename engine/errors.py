"""Exceptions. Per-sample failures are *data* (see :class:`engine.records.Reject`), never raised."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose. The CLI prints it as one line."""

    exit_code = 1


class UsageError(EngineError):
    """Bad options, a missing or unreadable input, an output folder that is in the way."""

    exit_code = 2


class ConfigError(UsageError):
    """A task configuration (config.json) that is missing, unreadable or invalid."""


class ShardError(EngineError):
    """A work unit or output shard that failed as a whole (I/O error, worker lost)."""

    def __init__(self, shard: str, message: str):
        super().__init__(f"{shard}: {message}")
        self.shard = shard


class RejectRatioExceeded(EngineError):
    """The run finished, but more rows were rejected than --max-reject-ratio allows."""


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"

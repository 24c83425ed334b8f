"""Where an image's unchanged bytes lie in a local file: light enough for the HTTP fetch process,
which imports no pyarrow (``engine.records`` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SourceRef:
    """An image kept as it is, stored in a part file as a reference to its local source file
    instead of a copy: the shard writer reads it from there (see ``engine.sinks.parts``).
    ``size`` and ``mtime_ns`` are the file's when it was converted; a file that no longer
    matches them stops the run rather than write other bytes than were checked. With an
    ``offset`` the image is ``size`` bytes inside the file from there (a tar member), and the
    file's mtime must match and still hold the range."""

    path: str
    size: int
    mtime_ns: int
    offset: int | None = None  # None: the whole file

"""Atomic file placement: nothing appears under a final name until it is complete."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(final: str, tmp_dir: str | None = None) -> Iterator[str]:
    """Yield a temporary path; on success, fsync it and rename it to ``final``; else delete it.

    The temporary file lives in ``tmp_dir`` (same filesystem as ``final``), never beside the
    final name, so a reader globbing the data folder cannot pick up a partial file.
    """
    folder = tmp_dir or os.path.dirname(final) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(final)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_bytes_atomic(final: str, data: bytes, tmp_dir: str | None = None) -> None:
    with atomic_path(final, tmp_dir) as tmp, open(tmp, "wb") as f:
        f.write(data)

"""Pure arithmetic for cutting rows into row groups and shards, and the shard names."""

from __future__ import annotations

from collections.abc import Sequence


def plan_chunks(sizes: Sequence[int], max_bytes: int, max_rows: int | None = None) -> list[tuple[int, int]]:
    """Cut consecutive rows into ``[start, end)`` chunks of at most ``max_bytes`` and ``max_rows``.

    A chunk closes before the row that would take it over ``max_bytes``; a single row larger
    than ``max_bytes`` gets a chunk of its own. Depends only on the sizes, so the same rows are
    always cut the same way, whatever produced them.
    """
    chunks: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        full = max_rows is not None and i - start >= max_rows
        if i > start and (full or total + size > max_bytes):
            chunks.append((start, i))
            start, total = i, 0
        total += size
    if len(sizes) > start:
        chunks.append((start, len(sizes)))
    return chunks


def shard_name(prefix: str, index: int, count: int, extension: str) -> str:
    """``train-00000-of-00003.parquet`` / ``data-00000-of-00002.arrow``."""
    return f"{prefix}-{index:05d}-of-{count:05d}.{extension}"

"""Shard planning: cut each split's rows into shards and row groups by their byte sizes alone,
so the cut is the same whatever the number of units or workers; the layout names the shards."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from engine.sinks.chunking import plan_chunks
from engine.sinks.shards import Piece, ShardSpec

if TYPE_CHECKING:
    from engine.config import ConvertOptions
    from engine.layouts.base import Layout
    from engine.sinks.store import Store


def cut_shards(
    segments: dict[str, list[tuple[str, np.ndarray]]],
    opts: ConvertOptions,
    store: Store,
    layout: Layout,
    features,
    reader=None,
    path_prefix: str = "",
) -> list[ShardSpec]:
    """The shards of each split (in the given order) from its segments: (part file, the byte size
    of each of its rows in this split). ``reader`` reads a piece when it is not a part file
    (``engine update`` reads the rows of a finished dataset)."""
    schema = features.arrow_schema
    specs: list[ShardSpec] = []
    for split, split_segments in segments.items():
        sizes = np.concatenate([s for _, s in split_segments] or [np.zeros(0, np.int64)]).astype(np.int64)
        chunks = plan_chunks(sizes.tolist(), opts.max_shard_bytes, opts.shard_rows) or [(0, 0)]
        counts = [(part, len(s)) for part, s in split_segments]
        for index, (start, stop) in enumerate(chunks):
            specs.append(
                ShardSpec(
                    layout=layout,
                    split=split,
                    relpath=layout.shard_path(split, index, len(chunks), len(segments)),
                    pieces=pieces_for(counts, start, stop),
                    schema=schema,
                    row_groups=tuple(
                        b - a
                        for a, b in plan_chunks(
                            sizes[start:stop].tolist(), opts.row_group_bytes, opts.row_group_rows
                        )
                    ),
                    store=store,
                    path_prefix=path_prefix,
                    reader=reader,
                )
            )
    return specs


def pieces_for(segments: list[tuple[str, int]], start: int, stop: int) -> tuple[Piece, ...]:
    """Map the global row range ``[start, stop)`` onto (part, local start, local stop) pieces."""
    pieces, offset = [], 0
    for part, count in segments:
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            pieces.append(Piece(part, lo - offset, hi - offset))
        offset += count
        if offset >= stop:
            break
    return tuple(pieces)

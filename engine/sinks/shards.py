"""Final shards: the descriptor the driver builds, reading their rows back from the parts, and
the dispatch to each layout's writer."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from engine.records import PART_SCHEMA
from engine.sinks.parts import read_part_rows


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows ``[start, stop)`` of one split inside one part file."""

    part: str
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """A small, picklable description of one final shard, built by the driver."""

    layout: str  # parquet | arrow
    split: str
    relpath: str  # final path relative to OUT
    pieces: tuple[Piece, ...]
    schema: pa.Schema  # final schema with the huggingface metadata, built once on the driver
    meta_keys: tuple[str, ...]
    text_column: str  # arrow layout: conversations | text
    images_as_paths: bool
    row_group_rows: int
    row_group_bytes: int
    out: str
    tmp_dir: str


@dataclass(frozen=True, slots=True)
class ShardResult:
    path: str  # relative to OUT
    split: str
    num_rows: int
    num_bytes: int  # file size


def read_shard_rows(spec: ShardSpec) -> pa.Table:
    """The shard's rows, in line order, still in the part schema."""
    tables = [read_part_rows(p.part, spec.split, p.start, p.stop) for p in spec.pieces]
    return pa.concat_tables(tables).combine_chunks() if tables else PART_SCHEMA.empty_table()


def list_parts(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """(zero-based offsets, flattened values) of a list column, without copying the values."""
    arr = column.combine_chunks()
    offsets = pc.subtract(arr.offsets, arr.offsets[0]) if len(arr) else pa.array([0], pa.int32())
    return offsets, arr.flatten()


def write_shard(spec: ShardSpec) -> ShardResult:
    """Assemble and write one final shard (runs in a worker)."""
    if spec.layout == "parquet":
        from engine.sinks.parquet import write_parquet_shard

        return write_parquet_shard(spec)
    from engine.sinks.arrow import write_arrow_shard

    return write_arrow_shard(spec)

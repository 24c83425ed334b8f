"""The Hugging Face LLM image-extraction layout (FORMATS.md §3).

``OUT/data/{split}-{i:05d}-of-{n:05d}.parquet`` with the ``huggingface`` schema metadata made
by ``datasets.Features``, ``OUT/config.json`` and the dataset card ``OUT/README.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from engine.records import PART_SCHEMA, meta_struct_array
from engine.sinks.chunking import plan_chunks, shard_name
from engine.sinks.files import atomic_path
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

    split: str
    index: int
    num_shards: int
    pieces: tuple[Piece, ...]
    meta_keys: tuple[str, ...]
    schema: pa.Schema  # final schema with the huggingface metadata, built once on the driver
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


def parquet_shard_path(split: str, index: int, count: int) -> str:
    return os.path.join("data", shard_name(split, index, count, "parquet"))


def shard_table(spec: ShardSpec, schema: pa.Schema) -> tuple[pa.Table, list[int]]:
    """The final rows of a shard, in the final schema, and their byte sizes."""
    tables = [read_part_rows(p.part, spec.split, p.start, p.stop) for p in spec.pieces]
    parts = pa.concat_tables(tables).combine_chunks() if tables else PART_SCHEMA.empty_table()
    meta = meta_struct_array(parts["meta"].combine_chunks(), list(spec.meta_keys))
    table = pa.Table.from_arrays(
        [parts["image_id"], parts["image"], parts["output"], meta], schema=schema
    )
    return table, parts["num_bytes"].to_pylist()


def write_parquet_shard(spec: ShardSpec) -> ShardResult:
    """Assemble and write one final Parquet shard (runs in a worker)."""
    schema = spec.schema
    table, sizes = shard_table(spec, schema)
    relpath = parquet_shard_path(spec.split, spec.index, spec.num_shards)
    final = os.path.join(spec.out, relpath)
    leaves = ["image_id", "image.bytes", "image.path", "output"] + [f"meta.{k}" for k in spec.meta_keys]
    compression = {c: "zstd" for c in leaves}
    compression["image.bytes"] = "none"  # encoded images do not compress (FORMATS.md §6)
    with atomic_path(final, spec.tmp_dir) as tmp:
        with pq.ParquetWriter(
            tmp,
            schema,
            compression=compression,
            use_dictionary=[f"meta.{k}" for k in spec.meta_keys],  # never on image bytes
            write_statistics=[c for c in leaves if c not in ("image.bytes", "image.path")],
            write_page_index=True,
            use_content_defined_chunking=True,
        ) as writer:
            for start, stop in plan_chunks(sizes, spec.row_group_bytes, spec.row_group_rows):
                writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
    return ShardResult(relpath, spec.split, table.num_rows, os.path.getsize(final))

"""The Hugging Face LLM image-extraction layout (FORMATS.md §3).

``OUT/data/{split}-{i:05d}-of-{n:05d}.parquet`` with the ``huggingface`` schema metadata made
by ``datasets.Features``, ``OUT/config.json`` and the dataset card ``OUT/README.md``.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.records import meta_struct_array
from engine.sinks.chunking import plan_chunks, shard_name
from engine.sinks.shards import ShardResult, ShardSpec, read_shard_rows


def parquet_shard_path(split: str, index: int, count: int) -> str:
    return f"data/{shard_name(split, index, count, 'parquet')}"


def write_parquet_shard(spec: ShardSpec) -> ShardResult:
    parts = read_shard_rows(spec)
    image = pc.list_flatten(parts["images"])  # exactly one image per extraction row
    meta = meta_struct_array(parts["meta"].combine_chunks(), list(spec.meta_keys))
    table = pa.Table.from_arrays([parts["image_id"], image, parts["output"], meta], schema=spec.schema)
    leaves = ["image_id", "image.bytes", "image.path", "output"] + [f"meta.{k}" for k in spec.meta_keys]
    compression = {c: "zstd" for c in leaves}
    compression["image.bytes"] = "none"  # encoded images do not compress (FORMATS.md §6)
    with spec.store.writing(spec.relpath) as tmp:
        with pq.ParquetWriter(
            tmp,
            spec.schema,
            compression=compression,
            use_dictionary=[f"meta.{k}" for k in spec.meta_keys],  # never on image bytes
            write_statistics=[c for c in leaves if c not in ("image.bytes", "image.path")],
            write_page_index=True,
            use_content_defined_chunking=True,
        ) as writer:
            sizes = parts["num_bytes"].to_pylist()
            for start, stop in plan_chunks(sizes, spec.row_group_bytes, spec.row_group_rows):
                # combined per group: the bytes must not depend on how units chunked the rows
                writer.write_table(table.slice(start, stop - start).combine_chunks(), row_group_size=stop - start)
        size = os.path.getsize(tmp)
    return ShardResult(spec.relpath, spec.split, table.num_rows, size)

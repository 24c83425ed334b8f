"""The Hugging Face LLM image-extraction layout (FORMATS.md §3).

``OUT/data/{split}-{i:05d}-of-{n:05d}.parquet`` with the ``huggingface`` schema metadata made
by ``datasets.Features``, ``OUT/config.json`` and the dataset card ``OUT/README.md``.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.records import meta_struct_array
from engine.sinks.chunking import shard_name
from engine.sinks.shards import ShardResult, ShardSpec, write_row_groups
from engine.sinks.store import Finisher


# datasets' own (config.DEFAULT_CDC_OPTIONS); it writes them beside its shards as the key-value
# metadata `content_defined_chunking`, which tools use to tell how a file was chunked
CDC_OPTIONS = {"min_chunk_size": 262144, "max_chunk_size": 1048576, "norm_level": 0}
CDC_METADATA = {"content_defined_chunking": json.dumps(CDC_OPTIONS)}


def parquet_shard_path(split: str, index: int, count: int) -> str:
    return f"data/{shard_name(split, index, count, 'parquet')}"


def extraction_table(group: pa.Table, spec: ShardSpec) -> pa.Table:
    """Part rows -> the final columns: one image per row, meta as a struct of the run's keys."""
    image = pc.list_flatten(group["images"])
    meta = meta_struct_array(group["meta"].combine_chunks(), list(spec.meta_keys))
    return pa.Table.from_arrays([group["image_id"], image, group["output"], meta], schema=spec.schema)


def write_parquet_shard(spec: ShardSpec, finisher: Finisher | None = None) -> ShardResult:
    leaves = ["image_id", "image.bytes", "image.path", "output"] + [f"meta.{k}" for k in spec.meta_keys]
    compression = {c: "zstd" for c in leaves}
    compression["image.bytes"] = "none"  # encoded images do not compress (FORMATS.md §6)
    with spec.store.writing(spec.relpath, finisher=finisher) as tmp:
        with pq.ParquetWriter(
            tmp,
            spec.schema,
            compression=compression,
            use_dictionary=[f"meta.{k}" for k in spec.meta_keys],  # never on image bytes
            write_statistics=[c for c in leaves if c not in ("image.bytes", "image.path")],
            write_page_index=True,
            use_content_defined_chunking=CDC_OPTIONS,
        ) as writer:
            writer.add_key_value_metadata(CDC_METADATA)
            num_rows = write_row_groups(
                spec, lambda group: writer.write_table(extraction_table(group, spec), row_group_size=group.num_rows))
        size = os.path.getsize(tmp)
    return ShardResult(spec.relpath, spec.split, num_rows, size)

"""The packed trainer layout: ``datasets.save_to_disk`` folders (FORMATS.md §4).

Arrow IPC *stream* shards ``data-{i:05d}-of-{n:05d}.arrow`` written directly with pyarrow,
plus ``state.json`` and ``dataset_info.json`` as ``save_to_disk`` writes them, and
``dataset_dict.json`` when there are several splits. ``datasets`` only provides the schema.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from engine.sinks.chunking import plan_chunks, shard_name
from engine.sinks.shards import ShardResult, ShardSpec, map_list_chunks, write_row_groups
from engine.sinks.store import Finisher, Store


BATCH_BYTES = 16 * 2**20  # a record batch's rows are copied into one block; this bounds the copy


def arrow_shard_path(split: str, index: int, count: int, nested: bool) -> str:
    name = shard_name("data", index, count, "arrow")
    return f"{split}/{name}" if nested else name


def packed_batch(group: pa.Table, spec: ShardSpec) -> pa.RecordBatch:
    """Part rows -> one record batch of conversations (or text) and modalities."""
    schema = spec.schema
    if spec.text_column == "conversations":
        turns_type = schema.field("conversations").type
        text = pa.array([orjson.loads(c) for c in group["conversations"].to_pylist()], turns_type)
    else:
        text = group["text"].combine_chunks()
    modalities_type = schema.field("modalities").type

    value_type = modalities_type.value_type.field("value").type

    def modality_items(images: pa.StructArray) -> pa.StructArray:
        if spec.images_as_paths:
            value = images.field("path")
            if spec.path_prefix:  # --absolute-paths / --paths-relative-to: OUT's own location, prefixed
                value = pc.binary_join_element_wise(spec.path_prefix, value, "")
        elif value_type == images.type:  # the Image() feature: struct<bytes, path>, as the parts hold it
            value = images
        else:  # the recipe's struct<path: null, bytes: binary>: no file name, as from_generator writes it
            value = pa.StructArray.from_arrays([pa.nulls(len(images)), images.field("bytes")],
                                               fields=list(value_type),
                                               mask=images.is_null() if images.null_count else None)
        kinds = pa.array(["image"] * len(images), pa.string())
        return pa.StructArray.from_arrays([kinds, value], fields=list(modalities_type.value_type))

    modalities = map_list_chunks(group["images"], modality_items, modalities_type)
    return pa.RecordBatch.from_arrays([text, modalities.combine_chunks()], schema=schema)


def write_arrow_shard(spec: ShardSpec, finisher: Finisher | None = None) -> ShardResult:
    with spec.store.writing(spec.relpath, finisher=finisher) as tmp:
        with pa.OSFile(tmp, "wb") as sink, ipc.new_stream(sink, spec.schema) as writer:

            def write_group(group: pa.Table) -> None:
                # A record batch is one block per column, so its rows are copied out of the parts'
                # chunks, while the group itself and the next one (being read) are still held.
                # Cutting the group by the rows' byte sizes bounds that third copy to BATCH_BYTES
                # instead of a whole group (up to 100 MB); the cut depends only on the rows, so
                # the bytes still do not depend on how units chunked them.
                for start, stop in plan_chunks(group["num_bytes"].to_pylist(), BATCH_BYTES):
                    writer.write_batch(packed_batch(group.slice(start, stop - start), spec))

            num_rows = write_row_groups(spec, write_group)
        size = os.path.getsize(tmp)
    return ShardResult(spec.relpath, spec.split, num_rows, size)


def write_save_to_disk_metadata(store: Store, split: str, shards: list[ShardResult], features, num_bytes: int,
                                nested: bool) -> None:
    """state.json and dataset_info.json of one split's folder, as ``Dataset.save_to_disk`` writes them."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.utils.py_utils import asdict

    folder = f"{split}/" if nested else ""
    files = sorted(os.path.basename(s.path) for s in shards)
    num_rows = sum(s.num_rows for s in shards)
    fingerprint = hashlib.sha256(orjson.dumps([split, files, [s.num_rows for s in sorted(shards, key=lambda s: s.path)],
                                               features.to_dict()])).hexdigest()[:16]
    state: dict[str, Any] = {
        "_data_files": [{"filename": f} for f in files],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": split,
    }
    splits = SplitDict()
    splits.add(SplitInfo(name=split, num_bytes=num_bytes, num_examples=num_rows))
    info = asdict(DatasetInfo(features=features, splits=splits, dataset_size=num_bytes,
                              size_in_bytes=sum(s.num_bytes for s in shards)))
    info = {key: info[key] for key in sorted(info)}
    store.write_bytes(f"{folder}state.json", json.dumps(state, indent=2, sort_keys=True).encode())
    store.write_bytes(f"{folder}dataset_info.json", json.dumps(info, indent=2).encode())


def write_dataset_dict(store: Store, splits: list[str]) -> None:
    store.write_bytes("dataset_dict.json", json.dumps({"splits": splits}).encode())

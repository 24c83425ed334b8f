"""The Hugging Face LLM image-extraction layout (FORMATS.md §3).

``OUT/data/{split}-{i:05d}-of-{n:05d}.parquet`` with the ``huggingface`` schema metadata made
by ``datasets.Features``, ``OUT/config.json`` and the dataset card ``OUT/README.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from engine.layouts import register
from engine.layouts.base import Checked, Layout, SeenColumns, validated_output
from engine.records import Reject, order_meta_keys
from engine.sinks.chunking import shard_name
from engine.sinks.shards import ShardResult, ShardSpec, write_row_groups
from engine.sinks.store import Finisher, Store

# datasets' own (config.DEFAULT_CDC_OPTIONS); it writes them beside its shards as the key-value
# metadata `content_defined_chunking`, which tools use to tell how a file was chunked
CDC_OPTIONS = {"min_chunk_size": 262144, "max_chunk_size": 1048576, "norm_level": 0}
CDC_METADATA = {"content_defined_chunking": json.dumps(CDC_OPTIONS)}


def extraction_features(meta_keys: list[str]):
    """``datasets.Features`` of the LLM image-extraction layout (FORMATS.md §3)."""
    from datasets import Features, Image, Value

    return Features(
        {
            "image_id": Value("string"),
            "image": Image(),
            "output": Value("string"),
            "meta": {k: Value("string") for k in meta_keys},
        }
    )


@dataclass(frozen=True)
class CardFeatures:
    """An existing dataset's features as its shards' schema and its card's YAML hold them:
    ``engine update`` passes them where the features do not change, so it needs no ``datasets``
    (whose import is a second or two of CPU)."""

    arrow_schema: pa.Schema
    yaml: list  # the card's dataset_info.features


def meta_struct_array(meta: pa.Array, meta_keys: list[str]) -> pa.StructArray:
    """The parts' meta map column as the struct column of the run's keys, in order (a key a row
    lacks is null)."""
    columns = [pc.map_lookup(meta, pa.scalar(k, pa.string()), "first") for k in meta_keys]
    return pa.StructArray.from_arrays(columns, names=meta_keys)


def parquet_shard_path(split: str, index: int, count: int) -> str:
    return f"data/{shard_name(split, index, count, 'parquet')}"


def meta_keys_of(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema.field("meta").type]


def extraction_table(group: pa.Table, spec: ShardSpec) -> pa.Table:
    """Part rows -> the final columns: one image per row, meta as a struct of the run's keys."""
    image = pc.list_flatten(group["images"])
    meta = meta_struct_array(group["meta"].combine_chunks(), meta_keys_of(spec.schema))
    return pa.Table.from_arrays([group["image_id"], image, group["output"], meta], schema=spec.schema)


def parquet_writer(where, schema: pa.Schema) -> pq.ParquetWriter:
    """The layout's ParquetWriter for ``schema`` (the shard's, or a subset of its columns, whose
    column chunks then come out byte for byte as in the whole shard: ``engine update`` splices)."""
    leaves = [
        f"{f.name}.{c.name}" if pa.types.is_struct(f.type) else f.name
        for f in schema
        for c in (f.type if pa.types.is_struct(f.type) else [f])
    ]
    compression = {c: "zstd" for c in leaves}
    if "image.bytes" in compression:
        compression["image.bytes"] = "none"  # encoded images do not compress (FORMATS.md §6)
    writer = pq.ParquetWriter(
        where,
        schema,
        compression=compression,
        use_dictionary=[c for c in leaves if c.startswith("meta.")],  # never on image bytes
        write_statistics=[c for c in leaves if c not in ("image.bytes", "image.path")],
        write_page_index=True,
        use_content_defined_chunking=CDC_OPTIONS,
    )
    writer.add_key_value_metadata(CDC_METADATA)
    return writer


def write_parquet_shard(spec: ShardSpec, finisher: Finisher | None = None) -> ShardResult:
    with spec.store.writing(spec.relpath, finisher=finisher) as tmp:
        with parquet_writer(tmp, spec.schema) as writer:
            num_rows = write_row_groups(
                spec,
                lambda group: writer.write_table(
                    extraction_table(group, spec), row_group_size=group.num_rows
                ),
            )
        size = os.path.getsize(tmp)
    return ShardResult(spec.relpath, spec.split, num_rows, size)


def dataset_card(
    *,
    features,
    splits: dict[str, dict[str, int]],
    data_glob: str,
    title: str,
    instructions: str | None,
    stats: dict[str, Any],
    command: str,
    tags: tuple[str, ...] = ("image-to-text", "llm-image-extraction"),
) -> str:
    """The dataset card (README.md): YAML front matter the Hub and ``load_dataset(OUT)`` read, plus
    a short human summary."""
    if isinstance(features, CardFeatures):  # as datasets' DatasetInfo._to_yaml_dict writes them
        info = {
            "features": features.yaml,
            "splits": [
                {"name": n, "num_bytes": s["num_bytes"], "num_examples": s["num_rows"]}
                for n, s in splits.items()
            ],
        }
    else:
        from datasets import DatasetInfo, SplitDict, SplitInfo

        split_dict = SplitDict()
        for name, s in splits.items():
            split_dict.add(SplitInfo(name=name, num_bytes=s["num_bytes"], num_examples=s["num_rows"]))
        info = DatasetInfo(features=features, splits=split_dict)._to_yaml_dict()
    info["download_size"] = sum(s["file_bytes"] for s in splits.values())
    info["dataset_size"] = sum(s["num_bytes"] for s in splits.values())
    front = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": n, "path": data_glob.format(split=n)} for n in splits],
            }
        ],
        "dataset_info": info,
        "tags": list(tags),
    }
    rows = "\n".join(
        f"| {n} | {s['num_rows']:,} | {s['num_shards']} | {s['file_bytes'] / 1e6:,.1f} MB |"
        for n, s in splits.items()
    )
    rejected = ", ".join(f"{k}: {v}" for k, v in stats["rejected_by_reason"].items()) or "none"
    body = [
        f"# {title}",
        "",
        "Made by `engine` with:",
        "",
        f"```\n{command}\n```",
        "",
        "| split | rows | shards | size |",
        "|---|---|---|---|",
        rows,
        "",
        f"{stats['num_input_rows']:,} input rows: {stats['num_written']:,} written, "
        f"{stats['num_rejected']:,} rejected ({rejected}). Rejected rows are listed in `rejects.jsonl`, "
        "run statistics in `stats.json`.",
        "",
        "Images are stored upright (EXIF orientation applied and removed).",
    ]
    if instructions is not None:
        quoted = "\n".join("> " + line for line in instructions.splitlines())
        body += [
            "",
            "## Instructions",
            "",
            quoted,
            "",
            "The JSON schema every `output` follows is in `config.json` (`json_schema`).",
        ]
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + "\n".join(body)
        + "\n"
    )


def write_card(
    store: Store,
    features,
    splits: dict[str, dict[str, Any]],
    stats_doc: dict[str, Any],
    command: str,
    instructions: str | None,
    title: str | None,
    **card: Any,
) -> None:
    text = dataset_card(
        features=features,
        splits=splits,
        data_glob="data/{split}-*",
        title=title or store.root.rstrip("/").rsplit("/", 1)[-1],
        stats=stats_doc,
        command=command,
        instructions=instructions,
        **card,
    )
    store.write_bytes("README.md", text.encode())


@register
@dataclass(frozen=True, slots=True)
class ParquetLayout(Layout):
    """One image per row, its validated ``output``, and the manifest's meta as a struct."""

    name = "parquet"
    updatable = True

    def check_row(self, row, ctx) -> Checked | Reject:
        if row.kind == "trainer":
            return Reject(
                row.line,
                row.image_id,
                "manifest",
                "a trainer-style row (conversations/text + modalities) needs --layout arrow",
            )
        output = validated_output(row, ctx)
        return output if isinstance(output, Reject) else Checked(row, output=output)

    def features(self, seen: SeenColumns):
        return extraction_features(order_meta_keys(seen.meta_keys))

    def shard_path(self, split: str, index: int, count: int, num_splits: int) -> str:
        return parquet_shard_path(split, index, count)

    def write_shard(self, spec: ShardSpec, finisher: Finisher | None) -> ShardResult:
        return write_parquet_shard(spec, finisher)

    def on_write_complete(
        self, store, splits, shards, features, stats_doc, command, instructions, title=None
    ):
        write_card(store, features, splits, stats_doc, command, instructions, title)

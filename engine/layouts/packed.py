"""The packed trainer layout: ``datasets.save_to_disk`` folders (FORMATS.md §4).

Arrow IPC *stream* shards ``data-{i:05d}-of-{n:05d}.arrow`` written directly with pyarrow,
plus ``state.json`` and ``dataset_info.json`` as ``save_to_disk`` writes them, and
``dataset_dict.json`` when there are several splits. ``datasets`` only provides the schema.
Raw-image rows embed their images; fs-image rows (``--images-as-paths``) store paths of files
written under ``OUT/images``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from engine.conversation import build_conversation, count_attachments
from engine.errors import UsageError
from engine.layouts import register
from engine.layouts.base import Checked, Layout, SeenColumns, prompt_turn, validated_output
from engine.naming import safe_stem
from engine.records import Reject
from engine.sinks.chunking import plan_chunks, shard_name
from engine.sinks.shards import ShardResult, ShardSpec, map_list_chunks, write_row_groups
from engine.sinks.store import Finisher, Store

BATCH_BYTES = 16 * 2**20  # a record batch's rows are copied into one block; this bounds the copy
IMAGES_DIR = "images"  # fs-image files, relative to OUT
LINE_DIGITS = 8  # fs-image names: images/{line:08d}-{stem}.{ext}


def packed_features(*, text_column: str, images_as_paths: bool, modality_feature: str = "recipe"):
    """``datasets.Features`` of the packed trainer layout (FORMATS.md §4).

    ``recipe`` is what the trainer's documented recipe (``from_generator`` yielding PIL images,
    then ``save_to_disk``) produces: a plain ``{path: null, bytes: binary}`` struct, because
    ``datasets`` infers no ``Image`` inside a list of dicts. Trainers concatenate datasets, which
    needs equal features. ``image`` is the ``Image()`` feature, decoded to PIL by ``datasets``."""
    from datasets import Features, Image, List, Value

    if images_as_paths:
        value = Value("string")
    elif modality_feature == "image":
        value = Image()
    else:
        value = {"path": Value("null"), "bytes": Value("binary")}
    turns = List({"role": Value("string"), "content": Value("string")})
    return Features(
        {
            text_column: turns if text_column == "conversations" else Value("string"),
            "modalities": List({"type": Value("string"), "value": value}),
        }
    )


def arrow_shard_path(split: str, index: int, count: int, nested: bool) -> str:
    name = shard_name("data", index, count, "arrow")
    return f"{split}/{name}" if nested else name


def packed_batch(group: pa.Table, spec: ShardSpec) -> pa.RecordBatch:
    """Part rows -> one record batch of conversations (or text) and modalities."""
    schema = spec.schema
    text_column = schema.names[0]
    text = group[text_column].combine_chunks()
    if text.type != schema.field(text_column).type:
        text = text.cast(schema.field(text_column).type)
    modalities_type = schema.field("modalities").type

    value_type = modalities_type.value_type.field("value").type

    def modality_items(images: pa.StructArray) -> pa.StructArray:
        if spec.layout.images_as_paths:
            value = images.field("path")
            if spec.path_prefix:  # --absolute-paths / --paths-relative-to: OUT's own location, prefixed
                value = pc.binary_join_element_wise(spec.path_prefix, value, "")
        elif value_type == images.type:  # the Image() feature: struct<bytes, path>, as the parts hold it
            value = images
        else:  # the recipe's struct<path: null, bytes: binary>: no file name, as from_generator writes it
            value = pa.StructArray.from_arrays(
                [pa.nulls(len(images)), images.field("bytes")],
                fields=list(value_type),
                mask=images.is_null() if images.null_count else None,
            )
        kinds = pa.array(["image"] * len(images), pa.string())
        return pa.StructArray.from_arrays([kinds, value], fields=list(modalities_type.value_type))

    modalities = map_list_chunks(group["images"], modality_items, modalities_type)
    return pa.RecordBatch.from_arrays([text, modalities.combine_chunks()], schema=schema)


def write_arrow_shard(spec: ShardSpec, finisher: Finisher | None = None) -> ShardResult:
    with spec.store.writing(spec.relpath, finisher=finisher) as tmp:
        with pa.OSFile(tmp, "wb") as sink, ipc.new_stream(sink, spec.schema) as writer:

            def write_group(group: pa.Table) -> None:
                # a record batch copies its rows into one block: cut by row sizes, which bounds
                # the copy to BATCH_BYTES and depends only on the rows
                for start, stop in plan_chunks(group["num_bytes"].to_pylist(), BATCH_BYTES):
                    writer.write_batch(packed_batch(group.slice(start, stop - start), spec))

            num_rows = write_row_groups(spec, write_group)
        size = os.path.getsize(tmp)
    return ShardResult(spec.relpath, spec.split, num_rows, size)


def write_save_to_disk_metadata(
    store: Store, split: str, shards: list[ShardResult], features, num_bytes: int, nested: bool
) -> None:
    """state.json and dataset_info.json of one split's folder, as ``Dataset.save_to_disk`` writes them."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.utils.py_utils import asdict

    folder = f"{split}/" if nested else ""
    files = sorted(os.path.basename(s.path) for s in shards)
    num_rows = sum(s.num_rows for s in shards)
    fingerprint = hashlib.sha256(
        orjson.dumps(
            [split, files, [s.num_rows for s in sorted(shards, key=lambda s: s.path)], features.to_dict()]
        )
    ).hexdigest()[:16]
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
    info = asdict(
        DatasetInfo(
            features=features,
            splits=splits,
            dataset_size=num_bytes,
            size_in_bytes=sum(s.num_bytes for s in shards),
        )
    )
    info = {key: info[key] for key in sorted(info)}
    store.write_bytes(f"{folder}state.json", json.dumps(state, indent=2, sort_keys=True).encode())
    store.write_bytes(f"{folder}dataset_info.json", json.dumps(info, indent=2).encode())


def write_dataset_dict(store: Store, splits: list[str]) -> None:
    store.write_bytes("dataset_dict.json", json.dumps({"splits": splits}).encode())


@register
@dataclass(frozen=True, slots=True)
class PackedLayout(Layout):
    """Conversations (or pretraining text) + image modalities, as the trainer's packed loader reads."""

    name = "arrow"
    keeps_row_ids = True
    updatable = True
    images_as_paths: bool = False  # fs-image: image files under OUT/images, their paths in the rows
    modality_feature: str = "recipe"
    prompt_template: str = "plain"
    attachment_token: str = "<|reserved_special_token_0|>"
    attachment_position: str = "after"
    absolute_paths: bool = False
    paths_relative_to: str | None = None

    @classmethod
    def from_options(cls, opts) -> PackedLayout:
        return cls(
            images_as_paths=opts.images_as_paths,
            modality_feature=opts.modality_feature,
            prompt_template=opts.prompt_template,
            attachment_token=opts.attachment_token,
            attachment_position=opts.attachment_position,
            absolute_paths=opts.absolute_paths,
            paths_relative_to=opts.paths_relative_to,
        )

    @property
    def image_files(self) -> bool:  # type: ignore[override]
        return self.images_as_paths

    def user_content(self, task) -> str | None:
        return prompt_turn(task, self.prompt_template, self.attachment_token, self.attachment_position)

    def check_row(self, row, ctx) -> Checked | Reject:
        if row.kind == "trainer":
            found = count_attachments(row.conversations, row.text, self.attachment_token)
            if found != len(row.locations):
                return Reject(
                    row.line,
                    row.image_id,
                    "manifest",
                    f"{found} attachment token(s) {self.attachment_token!r} in the text but "
                    f"{len(row.locations)} image modality(ies)",
                )
            turns = list(row.conversations) if row.conversations is not None else None
            return Checked(row, conversations=turns, text=row.text)
        output = validated_output(row, ctx)
        if isinstance(output, Reject):
            return output
        return Checked(
            row, conversations=build_conversation(ctx.user_content or "", output, ctx.system_prompt)
        )

    def image_names(self, row, extensions: Sequence[str]) -> list[str]:
        """fs-image names also start with the manifest line number, which no other row shares, so
        two rows can never write the same file (an id like ``two-0`` next to a two-image row ``two``)."""
        if not self.images_as_paths:
            return Layout.image_names(self, row, extensions)
        stem = safe_stem(row.image_id)
        suffixes = [""] if len(extensions) == 1 else [f"-{i}" for i in range(len(extensions))]
        return [
            f"{IMAGES_DIR}/{row.line:0{LINE_DIGITS}d}-{stem}{sfx}.{ext}"
            for sfx, ext in zip(suffixes, extensions)
        ]

    def features(self, seen: SeenColumns):
        columns = set(seen.text_columns)
        if len(columns) > 1:
            raise UsageError(
                "the manifest mixes 'text' (pretraining) and 'conversations' rows; "
                "convert them into separate datasets (then run again with --overwrite)"
            )
        text_column = columns.pop() if columns else "conversations"
        return packed_features(
            text_column=text_column,
            images_as_paths=self.images_as_paths,
            modality_feature=self.modality_feature,
        )

    def shard_path(self, split: str, index: int, count: int, num_splits: int) -> str:
        return arrow_shard_path(split, index, count, nested=num_splits > 1)

    def path_prefix(self, store: Store) -> str:
        """What goes before the stored ``images/...`` paths: nothing (relative to OUT), OUT itself
        (--absolute-paths), or OUT's path from --paths-relative-to, so datasets in several folders
        share one trainer base_path."""
        if not self.images_as_paths:
            return ""
        if self.absolute_paths:
            return store.root + os.sep
        if self.paths_relative_to:
            rel = os.path.relpath(store.root, os.path.abspath(self.paths_relative_to))
            return "" if rel == os.curdir else rel + os.sep
        return ""

    def write_shard(self, spec: ShardSpec, finisher: Finisher | None) -> ShardResult:
        return write_arrow_shard(spec, finisher)

    def on_write_complete(
        self, store, splits, shards, features, stats_doc, command, instructions, title=None
    ):
        nested = len(splits) > 1
        for name, s in splits.items():
            write_save_to_disk_metadata(
                store, name, [x for x in shards if x.split == name], features, s["num_bytes"], nested
            )
        if nested:
            write_dataset_dict(store, list(splits))
        # the folder each split's trainer `packed_path` must name: with several splits, OUT/<split>
        # (OUT itself would load dataset_dict.json's folder as a one-row dataset)
        stats_doc["packed_paths"] = {name: store.path(name) if nested else store.root for name in splits}

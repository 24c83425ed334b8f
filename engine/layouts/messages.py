"""The messages layout (``--layout messages``, issue 22): Hub-ready Parquet in the shape TRL's
``SFTTrainer`` and HuggingFaceH4/llava-instruct-mix-vsft use.

``messages`` is ``list<struct<content: list<struct<index, text, type>>, role>>`` and ``images``
``Sequence(Image)``: each ``{"type": "image", "index": i}`` part stands for ``images[i]``. A labelr
row becomes a user turn (the prompt, then the image) and an assistant turn (the validated
output); a trainer row keeps its turns, each attachment token becoming an image part where it
stood. Written as the extraction layout is: ``data/{split}-*.parquet``, row groups cut by
size for the viewer, image bytes uncompressed and without dictionary, content-defined
chunking, a dataset card and config.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from engine.conversation import build_conversation, count_attachments
from engine.layouts import register
from engine.layouts.base import Checked, Layout, prompt_turn, validated_output
from engine.layouts.parquet import CDC_METADATA, CDC_OPTIONS, parquet_shard_path, write_card
from engine.records import Reject
from engine.sinks.shards import ShardResult, ShardSpec, write_row_groups
from engine.sinks.store import Finisher

_MESSAGE = "messages.list.element"
_PART = f"{_MESSAGE}.content.list.element"
LEAVES = (
    f"{_MESSAGE}.role",
    f"{_PART}.index",
    f"{_PART}.text",
    f"{_PART}.type",
    "images.list.element.bytes",
    "images.list.element.path",
)
IMAGE_BYTES = "images.list.element.bytes"


def messages_features():
    """``datasets.Features`` of the messages layout: those of HuggingFaceH4/llava-instruct-mix-vsft."""
    from datasets import Features, Image, List, Value

    part = {"index": Value("int64"), "text": Value("string"), "type": Value("string")}
    return Features(
        {"messages": List({"content": List(part), "role": Value("string")}), "images": List(Image())}
    )


def to_messages(turns: list[dict[str, str]], token: str) -> list[dict]:
    """{role, content} turns whose text holds attachment tokens -> messages of text and image
    parts, images numbered in order. The whitespace next to a token goes with it (``"<image>\\nWhat"``
    is an image, then ``"What"``)."""
    messages, index = [], 0
    for turn in turns:
        pieces = turn["content"].split(token)
        content = []
        for i, piece in enumerate(pieces):
            if i > 0:
                content.append({"index": index, "text": None, "type": "image"})
                index += 1
                piece = piece.lstrip()
            if i < len(pieces) - 1:
                piece = piece.rstrip()
            if piece:
                content.append({"index": None, "text": piece, "type": "text"})
        messages.append({"content": content, "role": turn["role"]})
    return messages


def messages_table(group: pa.Table, spec: ShardSpec) -> pa.Table:
    """Part rows -> the two columns; the images are the parts' own list (no bytes copied)."""
    token = spec.layout.attachment_token
    turns = group["conversations"].to_pylist()
    messages = pa.array([to_messages(t, token) for t in turns], spec.schema.field("messages").type)
    images = group["images"]
    if images.type != spec.schema.field("images").type:
        images = images.cast(spec.schema.field("images").type)
    return pa.Table.from_arrays([messages, images], schema=spec.schema)


def write_messages_shard(spec: ShardSpec, finisher: Finisher | None = None) -> ShardResult:
    compression = {c: "zstd" for c in LEAVES}
    compression[IMAGE_BYTES] = "none"  # encoded images do not compress (FORMATS.md §6)
    with spec.store.writing(spec.relpath, finisher=finisher) as tmp:
        with pq.ParquetWriter(
            tmp,
            spec.schema,
            compression=compression,
            use_dictionary=[f"{_MESSAGE}.role", f"{_PART}.type"],  # never on image bytes
            write_statistics=[c for c in LEAVES if not c.startswith("images.")],
            write_page_index=True,
            use_content_defined_chunking=CDC_OPTIONS,
        ) as writer:
            writer.add_key_value_metadata(CDC_METADATA)
            num_rows = write_row_groups(
                spec,
                lambda group: writer.write_table(messages_table(group, spec), row_group_size=group.num_rows),
            )
        size = os.path.getsize(tmp)
    return ShardResult(spec.relpath, spec.split, num_rows, size)


@register
@dataclass(frozen=True, slots=True)
class MessagesLayout(Layout):
    """Conversations of text and image parts plus their images, as TRL's vision SFT reads them."""

    name = "messages"
    prompt_template: str = "plain"
    attachment_token: str = "<|reserved_special_token_0|>"
    attachment_position: str = "after"

    @classmethod
    def from_options(cls, opts) -> MessagesLayout:
        return cls(
            prompt_template=opts.prompt_template,
            attachment_token=opts.attachment_token,
            attachment_position=opts.attachment_position,
        )

    def user_content(self, task) -> str | None:
        return prompt_turn(task, self.prompt_template, self.attachment_token, self.attachment_position)

    def check_row(self, row, ctx) -> Checked | Reject:
        def reject(stage: str, reason: str) -> Reject:
            return Reject(row.line, row.image_id, stage, reason)

        if row.kind == "trainer":
            if row.conversations is None:
                return reject(
                    "manifest",
                    "a pretraining 'text' row has no turns; --layout messages needs "
                    "'conversations' (or a labelr row with 'output')",
                )
            turns = list(row.conversations)
        else:
            output = validated_output(row, ctx)
            if isinstance(output, Reject):
                return output
            turns = build_conversation(ctx.user_content or "", output, ctx.system_prompt)
        found = count_attachments(turns, None, self.attachment_token)
        if found != len(row.locations):
            return reject(
                "manifest",
                f"{found} attachment token(s) {self.attachment_token!r} in the turns but "
                f"{len(row.locations)} image(s)",
            )
        return Checked(row, conversations=turns)

    def features(self, seen):
        return messages_features()

    def shard_path(self, split: str, index: int, count: int, num_splits: int) -> str:
        return parquet_shard_path(split, index, count)

    def write_shard(self, spec: ShardSpec, finisher: Finisher | None) -> ShardResult:
        return write_messages_shard(spec, finisher)

    def on_write_complete(
        self, store, splits, shards, features, stats_doc, command, instructions, title=None
    ):
        write_card(
            store,
            features,
            splits,
            stats_doc,
            command,
            instructions,
            title,
            tags=("image-text-to-text", "conversational", "messages"),
        )

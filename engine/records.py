"""The sample record, the reject record, and the schema of the per-unit part files every
layout is assembled from (each layout's output schema is in ``engine.layouts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import orjson
import pyarrow as pa

from engine.refs import SourceRef  # noqa: F401 - re-exported: where it was first

# Fixed meta fields of the LLM image-extraction layout, in this order; extra manifest keys
# follow, sorted by name.
META_FIXED = ("barcode", "off_image_id", "image_url")
# Manifest keys that are the record itself, never copied into meta.
RESERVED_KEYS = frozenset(
    {"image_id", "image_url", "image_path", "output", "split", "conversations", "text", "modalities", "id"}
)

STAGES = ("manifest", "duplicate", "validate", "fetch", "decode", "write")


@dataclass(frozen=True, slots=True)
class Reject:
    """One input row that was not written: where it came from, which stage refused it, why."""

    line: int
    image_id: str | None
    stage: str
    reason: str

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"line": self.line, "image_id": self.image_id, "stage": self.stage, "reason": self.reason}
        )


class StoredImage(NamedTuple):
    """One image of a sample as its part file keeps it: ``data`` is the encoded bytes, a
    reference to the unchanged local source, or None (fs-image); ``name`` the embedded file
    name, or the path relative to OUT (fs-image)."""

    data: bytes | SourceRef | None
    name: str


@dataclass(frozen=True, slots=True)
class Sample:
    """One converted row, ready for a sink: its encoded images and its text fields."""

    line: int
    split: str
    image_id: str
    images: tuple[StoredImage, ...]
    meta: dict[str, str | None]
    output: str | None = None  # compact JSON (extraction rows)
    conversations: list[dict[str, str]] | None = None  # {role, content} turns (packed layout)
    text: str | None = None  # pretraining text (packed layout)

    def sizes(self) -> tuple[int, int]:
        """(num_bytes, text_chars): the uncompressed size estimate that cuts row groups and
        shards, and the part of it the text column makes (a conversation counts as its compact JSON)."""
        if self.conversations is not None:
            chars = len(orjson.dumps(self.conversations).decode())
        else:
            chars = len(self.text) if self.text else 0
        size = len(self.image_id) + sum(len(v) for v in self.meta.values() if v)
        size += sum(
            (b.size if isinstance(b, SourceRef) else len(b or b"")) + len(name) for b, name in self.images
        )
        return size + (len(self.output) if self.output else 0) + chars, chars

    @property
    def num_bytes(self) -> int:
        return self.sizes()[0]


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SOURCE_STRUCT = pa.struct(
    [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("offset", pa.int64())]
)
# as datasets' List({role, content})
TURNS_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
META_TYPE = pa.map_(pa.string(), pa.string())

# Intermediate per-unit part files (Arrow IPC streams), shared by every output layout.
PART_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("split", pa.string()),
        ("image_id", pa.string()),
        ("images", pa.list_(IMAGE_STRUCT)),  # bytes null where the source is referenced
        # null for a row whose images are all embedded, else one entry per image (null: embedded)
        ("image_sources", pa.list_(SOURCE_STRUCT)),
        ("output", pa.string()),
        ("conversations", TURNS_TYPE),
        ("text", pa.string()),
        # a map: the row's own keys; the extraction layout makes it a struct once all keys are known
        ("meta", META_TYPE),
        ("num_bytes", pa.int64()),
        ("text_chars", pa.int64()),  # the part of num_bytes the text column makes (engine update's row ids)
    ]
)


def samples_to_part_batch(samples: list[Sample], sizes: list[tuple[int, int]]) -> pa.RecordBatch:
    """The part file's rows; ``sizes`` are the samples' ``sizes()``, computed once by the caller."""
    return pa.RecordBatch.from_arrays(
        [
            pa.array([s.line for s in samples], pa.int64()),
            pa.array([s.split for s in samples], pa.string()),
            pa.array([s.image_id for s in samples], pa.string()),
            pa.array(
                [
                    [{"bytes": None if isinstance(b, SourceRef) else b, "path": p} for b, p in s.images]
                    for s in samples
                ],
                pa.list_(IMAGE_STRUCT),
            ),
            pa.array([_source_entries(s.images) for s in samples], pa.list_(SOURCE_STRUCT)),
            pa.array([s.output for s in samples], pa.string()),
            _turns_array([s.conversations for s in samples]),
            pa.array([s.text for s in samples], pa.string()),
            _meta_array([s.meta for s in samples]),
            pa.array([n for n, _ in sizes], pa.int64()),
            pa.array([c for _, c in sizes], pa.int64()),
        ],
        schema=PART_SCHEMA,
    )


def _turns_array(rows: list[list[dict[str, str]] | None]) -> pa.Array:
    """The turns as a list<struct<role, content>> column, built from flat columns (converting
    each dict to a struct costs twice the time)."""
    if all(t is None for t in rows):  # an extraction or pretraining row
        return pa.nulls(len(rows), TURNS_TYPE)
    offsets, roles, contents = [0], [], []
    for turns in rows:
        if turns is not None:
            roles += [t["role"] for t in turns]
            contents += [t["content"] for t in turns]
        offsets.append(len(roles))
    mask = pa.array([t is None for t in rows]) if None in rows else None
    values = pa.StructArray.from_arrays(
        [pa.array(roles, pa.string()), pa.array(contents, pa.string())], fields=list(TURNS_TYPE.value_type)
    )
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=TURNS_TYPE, mask=mask)


def _meta_array(rows: list[dict[str, str | None]]) -> pa.Array:
    offsets, keys, items = [0], [], []
    for meta in rows:
        keys += meta.keys()
        items += meta.values()
        offsets.append(len(keys))
    return pa.MapArray.from_arrays(
        pa.array(offsets, pa.int32()),
        pa.array(keys, pa.string()),
        pa.array(items, pa.string()),
        type=META_TYPE,
    )


def _source_entries(images: tuple[StoredImage, ...]) -> list[dict | None] | None:
    if not any(isinstance(b, SourceRef) for b, _ in images):
        return None
    return [
        {"path": b.path, "size": b.size, "mtime_ns": b.mtime_ns, "offset": b.offset}
        if isinstance(b, SourceRef)
        else None
        for b, _ in images
    ]


def order_meta_keys(keys: set[str] | frozenset[str]) -> list[str]:
    return list(META_FIXED) + sorted(set(keys) - set(META_FIXED))

"""The sample record, the reject record, and the Arrow schemas of every layout.

Schemas are declared up front from ``datasets.Features``, never inferred from the first row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

# Fixed meta fields of the LLM image-extraction layout, in this order; extra manifest keys
# follow, sorted by name.
META_FIXED = ("barcode", "off_image_id", "image_url")
# Manifest keys that are the record itself, never copied into meta.
RESERVED_KEYS = frozenset({"image_id", "image_url", "image_path", "output", "split", "conversations", "text",
                           "modalities", "id"})

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


@dataclass(frozen=True, slots=True)
class SourceRef:
    """An image kept as it is, stored in a part file as a reference to its local source file
    instead of a copy: the shard writer reads it from there (see ``engine.sinks.parts``).
    ``size`` and ``mtime_ns`` are the file's when it was converted; a file that no longer
    matches them stops the run rather than write other bytes than were checked."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Sample:
    """One converted row, ready for a sink: its encoded images and its text fields."""

    line: int
    split: str
    image_id: str
    # (encoded bytes or a reference to the unchanged local source, file name or path);
    # bytes None for fs-image
    images: tuple[tuple[bytes | SourceRef | None, str], ...]
    meta: dict[str, str | None]
    output: str | None = None  # compact JSON (extraction rows)
    conversations: str | None = None  # JSON list of {role, content} (packed layout)
    text: str | None = None  # pretraining text (packed layout)

    @property
    def num_bytes(self) -> int:
        """Uncompressed size estimate used to cut row groups and shards."""
        size = len(self.image_id) + sum(len(v) for v in self.meta.values() if v)
        size += sum((b.size if isinstance(b, SourceRef) else len(b or b"")) + len(name) for b, name in self.images)
        return size + sum(len(t) for t in (self.output, self.conversations, self.text) if t)


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SOURCE_STRUCT = pa.struct([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())])

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
        ("conversations", pa.string()),
        ("text", pa.string()),
        ("meta", pa.string()),  # compact JSON object; becomes a struct once all keys are known
        ("num_bytes", pa.int64()),
    ]
)


def samples_to_part_batch(samples: list[Sample], sizes: list[int]) -> pa.RecordBatch:
    """The part file's rows; ``sizes`` are the samples' ``num_bytes``, computed once by the caller."""
    return pa.RecordBatch.from_arrays(
        [
            pa.array([s.line for s in samples], pa.int64()),
            pa.array([s.split for s in samples], pa.string()),
            pa.array([s.image_id for s in samples], pa.string()),
            pa.array([[{"bytes": None if isinstance(b, SourceRef) else b, "path": p} for b, p in s.images]
                      for s in samples], pa.list_(IMAGE_STRUCT)),
            pa.array([_source_entries(s.images) for s in samples], pa.list_(SOURCE_STRUCT)),
            pa.array([s.output for s in samples], pa.string()),
            pa.array([s.conversations for s in samples], pa.string()),
            pa.array([s.text for s in samples], pa.string()),
            pa.array([orjson.dumps(s.meta).decode() for s in samples], pa.string()),
            pa.array(sizes, pa.int64()),
        ],
        schema=PART_SCHEMA,
    )


def _source_entries(images: tuple[tuple[bytes | SourceRef | None, str], ...]) -> list[dict | None] | None:
    if not any(isinstance(b, SourceRef) for b, _ in images):
        return None
    return [{"path": b.path, "size": b.size, "mtime_ns": b.mtime_ns} if isinstance(b, SourceRef) else None
            for b, _ in images]


def order_meta_keys(keys: set[str] | frozenset[str]) -> list[str]:
    return list(META_FIXED) + sorted(set(keys) - set(META_FIXED))


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


def meta_struct_array(meta_json: pa.Array, meta_keys: list[str]) -> pa.StructArray:
    """Turn the parts' compact-JSON meta column into the struct column, keys in order."""
    dicts: list[dict[str, Any]] = [orjson.loads(m) for m in meta_json.to_pylist()]
    columns = [pa.array([d.get(k) for d in dicts], pa.string()) for k in meta_keys]
    return pa.StructArray.from_arrays(columns, names=meta_keys)


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

"""The Layout seam (issue 20): shard planning, naming, the registry, chunking, typed part rows,
and a third layout added by one module + ``register`` that writes a dataset through ``convert``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import imagegen
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from conftest import CONFIG_BYTES, GOOD_OUTPUT, run_main, write_input

from engine.config import ConvertOptions
from engine.errors import UsageError
from engine.layouts import LAYOUTS, layout_for, register
from engine.layouts.base import Checked, Layout, SeenColumns, validated_output
from engine.layouts.packed import PackedLayout
from engine.layouts.parquet import ParquetLayout, meta_struct_array
from engine.layouts.plan import cut_shards, pieces_for
from engine.naming import safe_stem
from engine.records import PART_SCHEMA, Sample, SourceRef, StoredImage, samples_to_part_batch
from engine.sinks.chunking import plan_chunks
from engine.sinks.shards import Piece, ShardResult, write_row_groups
from engine.sinks.store import Store
from engine.sources.manifest import ManifestRow


def _opts(**kw) -> ConvertOptions:
    return ConvertOptions(manifest="m.jsonl", out="out", config="c.json", **kw)


def _row(image_id="id1", line=7, n=1) -> ManifestRow:
    return ManifestRow(
        line=line,
        kind="labelr",
        image_id=image_id,
        split="train",
        locations=tuple(f"{i}.jpg" for i in range(n)),
        meta={},
    )


# ---- registry -------------------------------------------------------------------------------


def test_layout_for_chooses_the_registered_class_with_its_options():
    assert set(LAYOUTS) >= {"parquet", "arrow"}
    assert isinstance(layout_for(_opts()), ParquetLayout)
    packed = layout_for(_opts(layout="arrow", images_as_paths=True, attachment_token="<img>"))
    assert isinstance(packed, PackedLayout)
    assert packed.images_as_paths and packed.image_files and packed.keeps_row_ids
    assert packed.attachment_token == "<img>"
    assert not ParquetLayout().image_files and not ParquetLayout.keeps_row_ids


def test_an_unknown_layout_is_one_line_naming_the_registered_ones():
    with pytest.raises(UsageError, match=r"--layout must be one of parquet, arrow.*, not 'nope'"):
        _opts(layout="nope")

    @dataclass
    class Stub:
        layout: str = "nope"

    with pytest.raises(UsageError, match="not 'nope'"):
        layout_for(Stub())


def test_layouts_are_picklable():
    import pickle

    packed = layout_for(_opts(layout="arrow", images_as_paths=True))
    assert pickle.loads(pickle.dumps(packed)) == packed
    assert pickle.loads(pickle.dumps(ParquetLayout())) == ParquetLayout()


# ---- naming ---------------------------------------------------------------------------------


def test_shard_paths():
    p, a = ParquetLayout(), PackedLayout()
    assert p.shard_path("train", 0, 3, 1) == "data/train-00000-of-00003.parquet"
    assert p.shard_path("validation", 2, 3, 2) == "data/validation-00002-of-00003.parquet"
    assert a.shard_path("train", 1, 2, 1) == "data-00001-of-00002.arrow"
    assert a.shard_path("test", 0, 1, 3) == "test/data-00000-of-00001.arrow"  # several splits: a folder each


def test_image_names_embedded_and_fs_image():
    assert ParquetLayout().image_names(_row("id1"), ["jpg"]) == ["id1.jpg"]
    assert PackedLayout().image_names(_row("id1", n=2), ["jpg", "png"]) == ["id1-0.jpg", "id1-1.png"]
    fs = PackedLayout(images_as_paths=True)
    assert fs.image_names(_row("id1", line=7), ["jpg"]) == ["images/00000007-id1.jpg"]
    assert fs.image_names(_row("two", line=12, n=2), ["webp", "webp"]) == [
        "images/00000012-two-0.webp",
        "images/00000012-two-1.webp",
    ]
    (name,) = ParquetLayout().image_names(_row("../../etc/passwd"), ["jpg"])
    assert "/" not in name and name.startswith("_.._etc_passwd-") and name.endswith(".jpg")


def test_safe_stem():
    assert safe_stem("abc-1.2_3") == "abc-1.2_3"
    assert safe_stem("a/b") != safe_stem("a_b")  # distinct ids keep distinct names
    assert safe_stem("a/b").startswith("a_b-")
    assert safe_stem("..").startswith("id-") and safe_stem("").startswith("id-")
    assert len(safe_stem("x" * 500)) <= 100 + 11


def test_fs_image_path_prefix(tmp_path):
    store = Store(str(tmp_path / "out"))
    assert PackedLayout(images_as_paths=True).path_prefix(store) == ""
    assert PackedLayout(images_as_paths=False, absolute_paths=True).path_prefix(store) == ""
    assert PackedLayout(images_as_paths=True, absolute_paths=True).path_prefix(store) == store.root + os.sep
    rel = PackedLayout(images_as_paths=True, paths_relative_to=str(tmp_path)).path_prefix(store)
    assert rel == "out" + os.sep


# ---- chunking and shard planning ------------------------------------------------------------


def test_plan_chunks_by_bytes_and_rows():
    assert plan_chunks([], 10) == []
    assert plan_chunks([4, 4, 4], 8) == [(0, 2), (2, 3)]
    assert plan_chunks([20, 1, 1], 8) == [(0, 1), (1, 3)]  # a row over the limit gets a chunk of its own
    assert plan_chunks([1] * 5, 100, max_rows=2) == [(0, 2), (2, 4), (4, 5)]


def test_pieces_for_maps_a_global_range_onto_parts():
    segments = [("a", 3), ("b", 0), ("c", 4)]
    assert pieces_for(segments, 0, 7) == (Piece("a", 0, 3), Piece("c", 0, 4))
    assert pieces_for(segments, 2, 5) == (Piece("a", 2, 3), Piece("c", 0, 2))
    assert pieces_for(segments, 3, 4) == (Piece("c", 0, 1),)
    assert pieces_for(segments, 5, 5) == ()


def test_cut_shards_names_sizes_and_row_groups(tmp_path):
    store = Store(str(tmp_path / "out"))
    opts = _opts(max_shard_bytes=100, row_group_bytes=30, row_group_rows=100)
    layout = ParquetLayout()
    features = layout.features(SeenColumns(meta_keys=frozenset({"zeta", "alpha"})))
    assert list(features["meta"]) == ["barcode", "off_image_id", "image_url", "alpha", "zeta"]
    segments = {
        "train": [("p0", np.array([40, 40, 40])), ("p1", np.array([40]))],
        "test": [("p1", np.array([10]))],
    }
    specs = cut_shards(segments, opts, store, layout, features)
    assert [s.relpath for s in specs] == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/test-00000-of-00001.parquet",
    ]
    assert [s.pieces for s in specs] == [
        (Piece("p0", 0, 2),),
        (Piece("p0", 2, 3), Piece("p1", 0, 1)),
        (Piece("p1", 0, 1),),
    ]
    assert [s.row_groups for s in specs] == [(1, 1), (1, 1), (1,)]
    assert all(s.layout is layout and s.schema == features.arrow_schema for s in specs)
    packed = cut_shards({"train": []}, opts, store, PackedLayout(), PackedLayout().features(SeenColumns()))
    assert [(s.relpath, s.pieces, s.row_groups) for s in packed] == [("data-00000-of-00001.arrow", (), ())]


def test_packed_features_refuse_mixed_text_columns():
    with pytest.raises(UsageError, match="mixes 'text'"):
        PackedLayout().features(SeenColumns(text_columns=frozenset({"text", "conversations"})))
    assert list(PackedLayout().features(SeenColumns(text_columns=frozenset({"text"})))) == [
        "text",
        "modalities",
    ]


# ---- row checks -----------------------------------------------------------------------------


@dataclass
class _Ctx:
    schema_json: str | None = json.dumps({"type": "object", "properties": {"price": {"type": "number"}}})
    user_content: str | None = "<img>Read it."
    system_prompt: str | None = None


def test_check_row_per_layout():
    row = ManifestRow(
        line=3,
        kind="labelr",
        image_id="a",
        split="train",
        locations=("a.jpg",),
        meta={},
        output='{"price": 1}',
    )
    assert ParquetLayout().check_row(row, _Ctx()) == Checked(row, output='{"price":1}')
    turns = PackedLayout().check_row(row, _Ctx()).conversations
    assert turns == [
        {"role": "user", "content": "<img>Read it."},
        {"role": "assistant", "content": '{"price":1}'},
    ]
    assert validated_output(row, _Ctx(schema_json=None)).stage == "manifest"
    trainer = ManifestRow(
        line=4,
        kind="trainer",
        image_id="t",
        split="train",
        locations=("a.jpg", "b.jpg"),
        meta={},
        conversations=({"role": "user", "content": "<img>"},),
    )
    assert ParquetLayout().check_row(trainer, _Ctx()).reason.endswith("needs --layout arrow")
    bad = PackedLayout(attachment_token="<img>").check_row(trainer, _Ctx())
    assert (
        bad.stage == "manifest" and "1 attachment token(s) '<img>'" in bad.reason and "2 image" in bad.reason
    )


# ---- typed part rows ------------------------------------------------------------------------


def test_part_rows_are_typed_and_sizes_are_todays():
    turns = [{"role": "user", "content": "<img>é"}, {"role": "assistant", "content": '{"p":1}'}]
    ref = SourceRef("/x/a.jpg", 1000, 1)
    samples = [
        Sample(
            line=1,
            split="train",
            image_id="a",
            images=(StoredImage(ref, "a.jpg"),),
            meta={"barcode": "123", "image_url": None},
            output='{"p":1}',
        ),
        Sample(
            line=2,
            split="train",
            image_id="b",
            images=(StoredImage(b"xyz", "b-0.png"), StoredImage(None, "images/b.png")),
            meta={},
            conversations=turns,
        ),
        Sample(line=3, split="train", image_id="c", images=(), meta={"k": ""}, text="plain text"),
    ]
    # the size the shard cut depends on, as it was computed from the JSON strings the parts held
    old = [1 + 3 + 1000 + 5 + 7, 1 + 3 + 7 + 12 + len(orjson.dumps(turns).decode()), 1 + 10]
    assert [s.num_bytes for s in samples] == old
    batch = samples_to_part_batch(samples, [s.sizes() for s in samples])
    assert batch.schema == PART_SCHEMA
    assert PART_SCHEMA.field("conversations").type == pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string())])
    )
    assert pa.types.is_map(PART_SCHEMA.field("meta").type)
    assert batch.column("conversations").to_pylist() == [None, turns, None]
    assert batch.column("text_chars").to_pylist() == [0, len(orjson.dumps(turns).decode()), 10]
    meta = meta_struct_array(batch.column("meta"), ["barcode", "image_url", "k"])
    assert meta.to_pylist() == [
        {"barcode": "123", "image_url": None, "k": None},
        {"barcode": None, "image_url": None, "k": None},
        {"barcode": None, "image_url": None, "k": ""},
    ]
    assert batch.column("images").to_pylist()[1] == [
        {"bytes": b"xyz", "path": "b-0.png"},
        {"bytes": None, "path": "images/b.png"},
    ]


# ---- a third layout: one module + register --------------------------------------------------


@dataclass(frozen=True, slots=True)
class TsvLayout(Layout):
    """A toy layout: one tab-separated text file per shard (id, image name, image size, output)."""

    name = "tsv"

    def check_row(self, row, ctx):
        output = validated_output(row, ctx)
        return output if not isinstance(output, str) else Checked(row, output=output)

    def features(self, seen):
        from datasets import Features, Value

        return Features(
            {
                "image_id": Value("string"),
                "name": Value("string"),
                "size": Value("int64"),
                "output": Value("string"),
            }
        )

    def shard_path(self, split, index, count, num_splits):
        return f"tsv/{split}-{index}-of-{count}.tsv"

    def write_shard(self, spec, finisher):
        lines: list[str] = []

        def write(group: pa.Table) -> None:
            for r in group.select(["image_id", "images", "output"]).to_pylist():
                (image,) = r["images"]
                lines.append(f"{r['image_id']}\t{image['path']}\t{len(image['bytes'])}\t{r['output']}\n")

        num_rows = write_row_groups(spec, write)
        data = "".join(lines).encode()
        with spec.store.writing(spec.relpath, finisher=finisher) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return ShardResult(spec.relpath, spec.split, num_rows, len(data))

    def on_write_start(self, store):
        store.write_bytes("tsv/started", b"")

    def on_write_complete(
        self, store, splits, shards, features, stats_doc, command, instructions, title=None
    ):
        store.write_bytes("tsv/index.json", json.dumps({n: s["files"] for n, s in splits.items()}).encode())


def test_a_registered_third_layout_writes_a_dataset_through_convert(tmp_path, monkeypatch):
    monkeypatch.setitem(LAYOUTS, "tsv", TsvLayout)
    assert register(TsvLayout) is TsvLayout  # what its module does on import
    images = {"a.jpg": imagegen.jpeg((64, 48)), "b.png": imagegen.png((32, 32)), "bad.jpg": b"not an image"}
    rows = [
        {"image_id": f"r{i}", "image_path": name, "output": GOOD_OUTPUT}
        for i, name in enumerate(["a.jpg", "b.png", "bad.jpg", "a.jpg", "b.png"])
    ]
    rows.append({"image_id": "r9", "image_path": "a.jpg", "output": {"price": "free"}})
    inp = write_input(tmp_path / "in", rows, images)
    out = tmp_path / "out"
    code = run_main(
        [
            "convert",
            "--manifest",
            str(inp.manifest),
            "--config",
            str(inp.config),
            "--out",
            str(out),
            "--layout",
            "tsv",
            "--runner",
            "local",
            "--quiet",
            "--shard-rows",
            "3",
            "--image-format",
            "keep",
        ]
    )
    assert code == 0
    index = json.loads((out / "tsv/index.json").read_text())
    assert index == {"train": ["tsv/train-0-of-2.tsv", "tsv/train-1-of-2.tsv"]}
    written = [line.split("\t") for f in index["train"] for line in (out / f).read_text().splitlines()]
    assert [w[0] for w in written] == ["r0", "r1", "r3", "r4"]
    assert [w[1] for w in written] == ["r0.jpg", "r1.png", "r3.jpg", "r4.png"]
    assert [int(w[2]) for w in written] == [len(images["a.jpg"]), len(images["b.png"])] * 2
    assert {json.loads(w[3])["price"] for w in written} == {GOOD_OUTPUT["price"]}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["image_id"], r["stage"]) for r in rejects] == [("r2", "decode"), ("r9", "validate")]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_written"] == 4 and stats["splits"]["train"]["num_shards"] == 2
    assert (out / "config.json").read_bytes() == CONFIG_BYTES
    assert not (out / ".engine").exists()
    assert (out / "tsv/started").stat().st_mtime_ns <= min(
        (out / f).stat().st_mtime_ns for f in index["train"]
    )


def test_a_part_file_of_another_schema_is_refused_in_one_line(tmp_path):
    """A run interrupted under an engine whose parts held JSON strings, then resumed, must not
    write shards from them."""
    from engine.errors import EngineError
    from engine.sinks.parts import iter_part_rows

    store = Store(str(tmp_path))
    old = pa.schema([("split", pa.string()), ("conversations", pa.string())])
    with pa.OSFile(str(tmp_path / "old.arrow"), "wb") as sink, ipc.new_stream(sink, old) as writer:
        writer.write_batch(pa.record_batch([pa.array(["train"]), pa.array(["[]"])], schema=old))
    with pytest.raises(EngineError, match="part file of another engine version.*--overwrite"):
        list(iter_part_rows(store, "old.arrow", "train", 0, 1))

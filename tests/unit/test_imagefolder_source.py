"""The image-folder source on its own, checked against datasets' own ImageFolder on the same
folders: the same rows in the same order, the same ids (file paths) and columns."""

from __future__ import annotations

import json
import os

import imagegen
import pytest

from engine.errors import UsageError
from engine.records import Reject
from engine.sources.base import Row
from engine.sources.imagefolder import ImageFolderSource


def rows_of(source: ImageFolderSource, grain: int = 2, split: str = "train") -> list[Row | Reject]:
    plan = source.plan(grain)
    return [r for u in plan.coalesce(grain * 2).units for r in source.read(u, base="/b", default_split=split)]


def put(root, rel: str, seed: int = 0) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(imagegen.noise_jpeg((16, 12), seed=seed) if rel.endswith(".jpg") else imagegen.png((8, 8)))


def load(root):
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=str(root))


def same_as_datasets(root, rows, columns_from_meta=()):
    loaded = load(root)
    for split in loaded:
        ours = [r for r in rows if r.split == split]
        theirs = loaded[split].cast_column("image", __import__("datasets").Image(decode=False))
        assert len(ours) == len(theirs), split
        assert [r.locations[0] for r in ours] == [os.path.abspath(x["path"]) for x in theirs["image"]]
        assert set(theirs.column_names) - {"image"} == {
            c for r in ours for c in (*r.meta, *(["output"] if r.output is not None else []))
        } | set(columns_from_meta)
    return loaded


def test_metadata_jsonl_in_split_folders(tmp_path):
    root = tmp_path / "folder"
    for split, names in (("train", ["b.jpg", "a.jpg", "sub/c.png"]), ("test", ["d.jpg"])):
        for i, n in enumerate(names):
            put(root, f"{split}/{n}", seed=i)
        lines = [
            {"file_name": n, "output": json.dumps({"price": i}), "lang": "fr", "score": i}
            for i, n in enumerate(names)
        ]
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = rows_of(ImageFolderSource(str(root)))
    loaded = same_as_datasets(root, rows)
    train = [r for r in rows if r.split == "train"]
    assert [r.image_id for r in train] == ["train/b.jpg", "train/a.jpg", "train/sub/c.png"]
    assert train[0].output == loaded["train"][0]["output"] == '{"price": 0}'
    assert train[2].meta == {"lang": "fr", "score": "2"} and loaded["train"][2]["score"] == 2
    assert [r.line for r in rows] == [1, 2, 3, 4]
    assert {r.split for r in rows} == {"train", "test"}


def test_metadata_csv_with_an_id_column(tmp_path):
    root = tmp_path / "folder"
    for i in range(5):
        put(root, f"img{i}.jpg", seed=i)
    (root / "metadata.csv").write_text(
        "file_name,image_id,caption\n"
        + "".join(f'img{i}.jpg,{100 + i},"a, quoted caption {i}"\n' for i in range(5))
    )
    rows = rows_of(ImageFolderSource(str(root)))
    loaded = load(root)["train"]
    assert [r.image_id for r in rows] == [str(x) for x in loaded["image_id"]]
    assert [r.meta["caption"] for r in rows] == loaded["caption"]
    assert all(r.split == "train" and r.output is None for r in rows)


def test_no_metadata_rows_have_no_output_and_class_labels(tmp_path):
    root = tmp_path / "folder"
    for i, rel in enumerate(
        ["train/cat/1.jpg", "train/cat/2.jpg", "train/dog/1.jpg", "validation/dog/3.jpg"]
    ):
        put(root, rel, seed=i)
    rows = rows_of(ImageFolderSource(str(root)))
    loaded = load(root)
    assert [r.image_id for r in rows] == [
        "train/cat/1.jpg",
        "train/cat/2.jpg",
        "train/dog/1.jpg",
        "validation/dog/3.jpg",
    ]
    names = loaded["train"].features["label"].names
    assert [r.meta["label"] for r in rows if r.split == "train"] == [
        names[i] for i in loaded["train"]["label"]
    ]
    assert all(r.output is None for r in rows)
    assert [r.split for r in rows] == ["train", "train", "train", "validation"]


def test_bad_metadata_rows(tmp_path):
    root = tmp_path / "folder"
    put(root, "ok.jpg")
    (root / "metadata.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"file_name": "ok.jpg"}),
                json.dumps({"file_name": "missing.jpg"}),
                json.dumps({"file_name": "../outside.jpg"}),
                json.dumps({"caption": "no file"}),
                "not json",
                json.dumps({"file_name": "ok.jpg"}),
            ]
        )
        + "\n"
    )
    source = ImageFolderSource(str(root))
    plan = source.plan(16)
    assert plan.units[0].duplicate_lines == (6,)  # the same file twice: the same id
    rows = rows_of(source)
    assert isinstance(rows[0], Row) and rows[1].locations == (
        str(root / "missing.jpg"),
    )  # the fetch stage rejects it
    assert [type(r).__name__ for r in rows[2:5]] == ["Reject"] * 3
    assert "relative path inside the folder" in rows[2].reason and "file_name" in rows[3].reason
    assert "not valid JSON" in rows[4].reason


def test_not_a_folder_of_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no image files"):
        ImageFolderSource(str(tmp_path / "empty")).check()
    assert not ImageFolderSource.detect(str(tmp_path / "empty"))
    put(tmp_path / "pics", "x/a.jpg")
    assert ImageFolderSource.detect(str(tmp_path / "pics"))


def test_fsspec_folder_ids_are_paths_in_the_folder():
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/imgfold/train/{i}.jpg", imagegen.jpeg((8, 8)))
    fs.pipe(
        "/imgfold/train/metadata.jsonl",
        b"".join(json.dumps({"file_name": f"{i}.jpg", "output": "{}"}).encode() + b"\n" for i in range(3)),
    )
    assert ImageFolderSource.detect("memory://imgfold")
    rows = rows_of(ImageFolderSource("memory://imgfold"))
    assert [r.image_id for r in rows] == ["train/0.jpg", "train/1.jpg", "train/2.jpg"]
    assert rows[0].locations[0].endswith("/imgfold/train/0.jpg") and rows[0].locations[0].startswith(
        "memory://"
    )


def test_detection_order(tmp_path):
    import types

    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.sources import source_for, source_kinds

    def kind(where) -> str:
        return source_for(types.SimpleNamespace(manifest=str(where))).kind

    put(tmp_path / "pics", "train/a.jpg")
    assert kind(tmp_path / "pics") == "imagefolder"
    both = tmp_path / "both"  # a dataset folder with a sample image in it is still a dataset
    put(both, "sample.jpg")
    pq.write_table(
        pa.table({"image": [{"bytes": imagegen.jpeg((8, 8)), "path": None}]}), both / "train.parquet"
    )
    assert kind(both) == "parquet"
    (tmp_path / "m.jsonl").write_text("{}\n")
    assert kind(tmp_path / "m.jsonl") == "jsonl"
    manifest_folder = tmp_path / "in"  # images beside a manifest: the manifest's folder, not an image folder
    put(manifest_folder, "img/a.jpg")
    (manifest_folder / "manifest.jsonl").write_text("{}\n")
    with pytest.raises(
        UsageError, match="cannot tell what kind of input .* expected one of: .*a JSONL manifest"
    ):
        kind(manifest_folder)
    kinds = source_kinds()
    assert kinds.index("parquet") < kinds.index("imagefolder") < kinds.index("jsonl") == len(kinds) - 1

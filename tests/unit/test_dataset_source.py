"""The existing-dataset source on its own: finding data files and splits as datasets does,
planning row-group units, and reading rows (inline images, meta, outputs, rejects)."""

from __future__ import annotations

import io
import json

import imagegen
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import UsageError
from engine.layouts.parquet import extraction_features
from engine.records import Reject
from engine.sources.base import InlineImage, Row
from engine.sources.dataset import DatasetSource, discover

FEATURES = extraction_features(["barcode", "off_image_id", "image_url", "lang"])


def extraction_table(
    n: int, start: int = 0, *, null_image_at: int | None = None, path_only_at: int | None = None
):
    images = []
    for i in range(start, start + n):
        if i == null_image_at:
            images.append(None)
        elif i == path_only_at:
            images.append({"bytes": None, "path": "pics/elsewhere.jpg"})
        else:
            images.append({"bytes": imagegen.noise_jpeg((32, 24), seed=i), "path": f"{i}.jpg"})
    rows = {
        "image_id": [f"id-{i}" for i in range(start, start + n)],
        "image": images,
        "output": [json.dumps({"price": i}) for i in range(start, start + n)],
        "meta": [
            {"barcode": str(1000 + i), "off_image_id": str(i), "image_url": None, "lang": "fr"}
            for i in range(start, start + n)
        ],
    }
    return pa.Table.from_pydict(rows, schema=FEATURES.arrow_schema)


def write(table: pa.Table, path, row_group_rows: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_rows)


def rows_of(source: DatasetSource, grain: int = 4, split: str = "train") -> list[Row | Reject]:
    plan = source.plan(grain)
    out = []
    for unit in plan.units:
        out += list(source.read(unit, base="/base", default_split=split))
    return out


def test_rows_stream_by_row_group_with_inline_images_meta_and_outputs(tmp_path):
    table = extraction_table(10)
    write(table, tmp_path / "ds" / "data" / "train-00000-of-00001.parquet", row_group_rows=3)
    source = DatasetSource(str(tmp_path / "ds"))
    source.check()
    plan = source.plan(3)
    assert [u.num_rows for u in plan.units] == [3, 3, 3, 1]  # one row group each
    assert plan.num_rows == 10 and plan.num_duplicates == 0
    rows = [r for u in plan.units for r in source.read(u, base="/b", default_split="train")]
    assert [r.line for r in rows] == list(range(1, 11))
    first = rows[0]
    assert first.kind == "labelr" and first.image_id == "id-0" and first.split == "train"
    assert isinstance(first.locations[0], InlineImage)
    assert first.locations[0].data == table["image"][0]["bytes"].as_py()
    assert first.locations[0].name == "0.jpg"
    assert first.output == '{"price": 0}'
    assert first.meta == {"barcode": "1000", "off_image_id": "0", "image_url": None, "lang": "fr"}
    merged = plan.coalesce(9)
    assert [u.num_rows for u in merged.units] == [3, 7]
    assert len(merged.units[1].pieces) == 1  # adjacent row groups of one file read as one piece
    again = [r for u in merged.units for r in source.read(u, base="/b", default_split="train")]
    assert again == rows


def test_splits_as_datasets_finds_them(tmp_path):
    import datasets

    root = tmp_path / "ds"
    write(extraction_table(3), root / "data" / "train-00000-of-00002.parquet")
    write(extraction_table(2, 3), root / "data" / "train-00001-of-00002.parquet")
    write(extraction_table(2, 5), root / "data" / "test-00000-of-00001.parquet")
    write(extraction_table(1, 7), root / "data" / "validation-00000-of-00001.parquet")
    files, _ = discover(str(root))
    assert [f.split for f in files] == ["train", "train", "validation", "test"]
    rows = rows_of(DatasetSource(str(root)))
    loaded = datasets.load_dataset(str(root))
    assert {s: [r.image_id for r in rows if r.split == s] for s in ("train", "validation", "test")} == {
        s: loaded[s]["image_id"] for s in ("train", "validation", "test")
    }


def test_split_folders_and_a_card_config(tmp_path):
    import datasets

    folders = tmp_path / "folders"
    write(extraction_table(2), folders / "train" / "part0.parquet")
    write(extraction_table(2, 2), folders / "valid" / "part0.parquet")
    rows = rows_of(DatasetSource(str(folders)))
    loaded = datasets.load_dataset(str(folders))
    assert sorted(loaded) == ["train", "validation"]
    assert [r.image_id for r in rows if r.split == "validation"] == loaded["validation"]["image_id"]

    carded = tmp_path / "carded"  # file names that name no split: the card's configs decide
    write(extraction_table(2), carded / "a.parquet")
    write(extraction_table(3, 2), carded / "b.parquet")
    (carded / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: b.parquet\n  - split: test\n    path: a.parquet\n---\n"
    )
    rows = rows_of(DatasetSource(str(carded)))
    loaded = datasets.load_dataset(str(carded))
    assert (
        [r.image_id for r in rows if r.split == "train"]
        == loaded["train"]["image_id"]
        == ["id-2", "id-3", "id-4"]
    )
    assert [r.image_id for r in rows if r.split == "test"] == loaded["test"]["image_id"]


def test_one_file_takes_the_runs_split(tmp_path):
    write(extraction_table(2), tmp_path / "rows.parquet")
    rows = rows_of(DatasetSource(str(tmp_path / "rows.parquet")), split="validation")
    assert [r.split for r in rows] == ["validation", "validation"]


def test_null_image_cell_and_path_only_cell(tmp_path):
    write(extraction_table(4, null_image_at=1, path_only_at=2), tmp_path / "d.parquet")
    rows = rows_of(DatasetSource(str(tmp_path / "d.parquet")))
    assert isinstance(rows[1], Reject) and rows[1].stage == "manifest" and "null" in rows[1].reason
    assert rows[1].line == 2 and rows[1].image_id == "id-1"
    assert rows[2].locations == ("/base/pics/elsewhere.jpg",)


def test_no_image_column_is_one_line_naming_the_columns(tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "caption": ["x"]}), tmp_path / "plain.parquet")
    with pytest.raises(UsageError, match=r"no image column .*its columns: image_id, caption"):
        DatasetSource(str(tmp_path / "plain.parquet")).check()
    with pytest.raises(UsageError, match=r"no column 'picture' \(--image-column\)"):
        DatasetSource(str(tmp_path / "plain.parquet"), image_column="picture").check()
    write(extraction_table(1), tmp_path / "ds.parquet")
    with pytest.raises(
        UsageError, match=r"no column 'answer' \(--output-column\); its columns: image_id, image"
    ):
        DatasetSource(str(tmp_path / "ds.parquet"), output_column="answer").check()


def test_a_file_without_image_column_among_others_rejects_its_rows(tmp_path):
    root = tmp_path / "ds"
    write(extraction_table(2), root / "train-0.parquet")
    pq.write_table(
        pa.table({"image_id": ["x", "y", "z"], "caption": ["1", "2", "3"]}), root / "train-1.parquet"
    )
    source = DatasetSource(str(root))
    source.check()
    rows = rows_of(source)
    assert len(rows) == 5
    bad = [r for r in rows if isinstance(r, Reject)]
    assert [r.line for r in bad] == [3, 4, 5] and all(
        "its columns: image_id, caption" in r.reason for r in bad
    )


def test_named_columns_binary_image_and_duplicates(tmp_path):
    table = pa.table(
        {
            "key": ["a", "b", "a"],
            "picture": [imagegen.jpeg((8, 8))] * 3,
            "answer": ["1", "2", "3"],
            "lang": ["fr", "de", "it"],
            "thumb": [b"\xff\xd8"] * 3,
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    source = DatasetSource(
        str(tmp_path / "t.parquet"), image_column="picture", id_column="key", output_column="answer"
    )
    plan = source.plan(16)
    assert plan.num_duplicates == 1 and plan.units[0].duplicate_lines == (3,)
    rows = rows_of(source)
    assert [r.image_id for r in rows] == ["a", "b", "a"]
    assert rows[1].output == "2" and rows[1].meta["lang"] == "de"
    assert "thumb" not in rows[1].meta  # bytes are never meta text
    assert isinstance(rows[0].locations[0], InlineImage)


def test_save_to_disk_folders_and_dataset_dicts(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "image_id": ["p", "q"],
            "image": [{"bytes": imagegen.jpeg((8, 8)), "path": None}] * 2,
            "output": ["{}", "{}"],
        },
        features=datasets.Features(
            {
                "image_id": datasets.Value("string"),
                "image": datasets.Image(),
                "output": datasets.Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "one"))
    rows = rows_of(DatasetSource(str(tmp_path / "one")))
    assert [r.image_id for r in rows] == ["p", "q"] and isinstance(rows[0].locations[0], InlineImage)
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    rows = rows_of(DatasetSource(str(tmp_path / "dict")))
    assert [(r.split, r.image_id, r.line) for r in rows] == [
        ("train", "p", 1),
        ("train", "q", 2),
        ("test", "q", 3),
    ]


def test_detection(tmp_path):
    write(extraction_table(1), tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    (tmp_path / "m.jsonl").write_text("{}\n")
    assert DatasetSource.detect(str(tmp_path / "ds"))
    assert DatasetSource.detect(str(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"))
    assert not DatasetSource.detect(str(tmp_path / "m.jsonl"))
    assert not DatasetSource.detect(str(tmp_path / "missing"))


def test_fsspec_folder(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    pq.write_table(extraction_table(3), buf, row_group_size=2)
    fs.pipe("/dsrc/data/train-00000-of-00001.parquet", buf.getvalue())
    source = DatasetSource("memory://dsrc")
    source.check()
    rows = rows_of(source)
    assert [r.image_id for r in rows] == ["id-0", "id-1", "id-2"]
    assert rows[0].split == "train"


@pytest.mark.parametrize(
    "data_files",
    [
        "  data_files: data/*.parquet\n",
        "  data_files:\n  - a/*.parquet\n  - data/train-*.parquet\n",
        "  data_files:\n  - split: train\n    path: [data/*, a/*]\n  - split: test\n    path: a/x.parquet\n",
    ],
)
def test_card_data_files_resolve_as_datasets_resolves_them(tmp_path, data_files):
    import datasets

    root = tmp_path / "ds"
    write(extraction_table(1), root / "data" / "train-00000-of-00001.parquet")
    write(extraction_table(1, 1), root / "data" / "other.parquet")
    write(extraction_table(1, 2), root / "a" / "x.parquet")
    write(extraction_table(1, 3), root / "data" / ".hidden" / "y.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: other\n  data_files: a/*\n"
        "- config_name: default\n  default: true\n" + data_files + "---\n# card\n"
    )
    files, _ = discover(str(root))
    expected = datasets.load_dataset_builder(str(root)).config.data_files
    assert {s: [f.location for f in files if f.split == s] for s in expected} == {
        s: [str(p) for p in found] for s, found in expected.items()
    }


def test_units_are_merged_up_to_a_byte_budget_not_only_rows(tmp_path):
    import os

    from engine.sources.dataset import UNIT_BYTES

    size = UNIT_BYTES // 4  # a row group of 3 such images is over half the budget
    table = pa.Table.from_pydict(
        {
            "image_id": [f"b{i}" for i in range(12)],
            "image": [{"bytes": os.urandom(size), "path": None} for _ in range(12)],
        },
        schema=pa.schema(
            [("image_id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
        ),
    )
    pq.write_table(
        table, tmp_path / "big.parquet", row_group_size=3, compression="none", use_dictionary=False
    )
    small = extraction_table(12)
    pq.write_table(small, tmp_path / "small.parquet", row_group_size=3)
    big_plan = DatasetSource(str(tmp_path / "big.parquet")).plan(3).coalesce(1000)
    assert [u.num_rows for u in big_plan.units] == [
        3,
        3,
        3,
        3,
    ]  # one row group a unit: each is 3/4 of the budget
    small_plan = DatasetSource(str(tmp_path / "small.parquet")).plan(3).coalesce(1000)
    assert [u.num_rows for u in small_plan.units] == [3, 9]  # small rows: merged by rows as before

"""Existing datasets and image folders as the input (issue 22), end to end through the CLI:
an engine Parquet dataset -> packed Arrow (load_from_disk: same rows, same pixels), a Parquet
re-shard under a new schema, a save_to_disk folder as input, image folders, and their bad
input (null and undecodable image cells, a Parquet file with no image column, a metadata row
naming a missing file), each accounted for in stats.json and rejects.jsonl."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import imagegen
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CONFIG_BYTES, SCHEMA, Output, convert, row, run_main, write_input
from PIL import Image

TOKEN = "<|reserved_special_token_0|>"


def engine(*argv: str) -> int:
    return run_main(["convert", *argv, "--runner", "local", "--quiet"])


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def rejects(out: Path) -> list[dict]:
    p = out / "rejects.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").tobytes()


@pytest.fixture(scope="module")
def source_dataset(tmp_path_factory):
    """An engine Parquet dataset (two splits, several shards, meta, a rotated image) to read back."""
    root = tmp_path_factory.mktemp("dsrc")
    images = {f"img/{i}.jpg": imagegen.noise_jpeg((40 + i, 30), seed=i) for i in range(7)}
    images["img/rot6.jpg"] = imagegen.oriented(6)
    rows = [
        row(
            f"id-{i}",
            f"img/{i}.jpg",
            output={"price": i / 2, "currency": "EUR"},
            barcode=str(100 + i),
            lang="fr",
            split="test" if i == 5 else None,
        )
        for i in range(7)
    ]
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    rows.append(row("rot", "img/rot6.jpg", off_image_id="9"))
    inp = write_input(root / "in", rows, images)
    out = root / "parquet"
    assert convert(inp, out, "--shard-rows", "3", "--row-group-rows", "2") == 0
    return inp, out


def test_parquet_dataset_to_packed_arrow(source_dataset, tmp_path):
    inp, src = source_dataset
    out = tmp_path / "packed"
    assert (
        engine("--input", str(src), "--config", str(inp.config), "--out", str(out), "--layout", "arrow") == 0
    )
    s = stats(out)
    assert s["num_input_rows"] == 8 and s["num_written"] == 8 and s["num_rejected"] == 0
    assert s["splits"]["train"]["num_rows"] == 7 and s["splits"]["test"]["num_rows"] == 1
    source = {split: Output(src).rows(split) for split in ("train", "test")}
    for split in ("train", "test"):
        packed = datasets.load_from_disk(str(out / split))
        assert len(packed) == len(source[split])
        for original, sample in zip(source[split], packed):
            assert sample["conversations"][-1] == {"role": "assistant", "content": original["output"]}
            assert TOKEN in sample["conversations"][0]["content"]
            value = sample["modalities"][0]["value"]
            assert value["bytes"] == original["image"]["bytes"]  # upright and small already: passed through
            assert pixels(value["bytes"]) == pixels(original["image"]["bytes"])
    row_ids = pq.read_table(out / "row_ids.parquet").to_pylist()
    assert [r["image_id"] for r in row_ids if r["split"] == "train"] == [
        r["image_id"] for r in source["train"]
    ]


def test_parquet_reshard_under_a_new_schema(source_dataset, tmp_path):
    _, src = source_dataset
    stricter = dict(SCHEMA, properties={**SCHEMA["properties"], "price": {"type": "number", "maximum": 1.5}})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"instructions": "Read the tag.", "json_schema": stricter}))
    out = tmp_path / "resharded"
    assert engine("--input", str(src), "--config", str(config), "--out", str(out), "--shard-rows", "2") == 0
    result = Output(out)
    train = result.rows("train")
    assert [r["image_id"] for r in train] == ["id-0", "id-1", "id-2", "id-3", "rot"]
    bad = rejects(out)
    # train's files come first in the input, then test's (id-5): lines follow the input's order
    assert [(r["image_id"], r["stage"], r["line"]) for r in bad] == [
        ("id-4", "validate", 5),
        ("id-6", "validate", 6),
        ("id-5", "validate", 8),
    ]
    assert "maximum" in bad[0]["reason"]
    assert s_ok(stats(out), 8)
    assert len(result.shards("train")) == 3
    before = Output(src).by_id("train")
    for r in train:  # images and meta carried over unchanged
        assert r["image"]["bytes"] == before[r["image_id"]]["image"]["bytes"]
        assert r["meta"] == before[r["image_id"]]["meta"]
    loaded = datasets.load_dataset(str(out), split="train")
    assert loaded.features["image"] == datasets.Image() and len(loaded) == 5


def s_ok(s: dict, rows: int) -> bool:
    return s["num_input_rows"] == rows == s["num_written"] + s["num_rejected"]


def test_save_to_disk_input_round_trips(source_dataset, tmp_path):
    inp, src = source_dataset
    packed = tmp_path / "packed"
    assert (
        engine("--input", str(src), "--config", str(inp.config), "--out", str(packed), "--layout", "arrow")
        == 0
    )
    again = tmp_path / "again"
    assert engine("--input", str(packed), "--out", str(again), "--layout", "arrow") == 0
    for split in ("train", "test"):
        a, b = datasets.load_from_disk(str(packed / split)), datasets.load_from_disk(str(again / split))
        assert a["conversations"] == b["conversations"]
        assert [m[0]["value"]["bytes"] for m in a["modalities"]] == [
            m[0]["value"]["bytes"] for m in b["modalities"]
        ]


def test_fs_image_packed_input_reads_its_image_files(source_dataset, tmp_path):
    inp, src = source_dataset
    fs_image = tmp_path / "fs"
    assert (
        engine(
            "--input",
            str(src),
            "--config",
            str(inp.config),
            "--out",
            str(fs_image),
            "--layout",
            "arrow",
            "--images-as-paths",
        )
        == 0
    )
    raw = tmp_path / "raw"
    assert engine("--input", str(fs_image), "--out", str(raw), "--layout", "arrow") == 0
    a, b = datasets.load_from_disk(str(fs_image / "train")), datasets.load_from_disk(str(raw / "train"))
    assert a["conversations"] == b["conversations"]
    assert [(fs_image / m[0]["value"]).read_bytes() for m in a["modalities"]] == [
        m[0]["value"]["bytes"] for m in b["modalities"]
    ]


def test_bad_cells_are_rejected_and_accounted_for(tmp_path):
    features = datasets.Features(
        {"image_id": datasets.Value("string"), "image": datasets.Image(), "output": datasets.Value("string")}
    )
    good = imagegen.jpeg((16, 16))
    table = pa.Table.from_pydict(
        {
            "image_id": ["ok", "null", "garbage", "ok2"],
            "image": [
                {"bytes": good, "path": None},
                None,
                {"bytes": b"not an image", "path": "x.jpg"},
                {"bytes": good, "path": "y.jpg"},
            ],
            "output": ['{"price": 1}'] * 4,
        },
        schema=features.arrow_schema,
    )
    pq.write_table(table, tmp_path / "rows.parquet")
    (tmp_path / "config.json").write_bytes(CONFIG_BYTES)
    out = tmp_path / "out"
    assert (
        engine(
            "--input",
            str(tmp_path / "rows.parquet"),
            "--config",
            str(tmp_path / "config.json"),
            "--out",
            str(out),
        )
        == 0
    )
    assert s_ok(stats(out), 4) and stats(out)["num_written"] == 2
    assert {r["image_id"]: r["stage"] for r in rejects(out)} == {"null": "manifest", "garbage": "decode"}
    assert [r["line"] for r in rejects(out)] == [2, 3]


def test_parquet_without_image_column_is_one_line(tmp_path, capsys):
    pq.write_table(pa.table({"image_id": ["a"], "caption": ["x"]}), tmp_path / "plain.parquet")
    (tmp_path / "config.json").write_bytes(CONFIG_BYTES)
    code = engine(
        "--input",
        str(tmp_path / "plain.parquet"),
        "--config",
        str(tmp_path / "config.json"),
        "--out",
        str(tmp_path / "out"),
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no image column" in err and "image_id, caption" in err
    assert not (tmp_path / "out").exists()


def test_unrecognised_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config.json").write_bytes(CONFIG_BYTES)
    for extra in ([], ["--input-format", "imagefolder"], ["--input-format", "parquet"]):
        code = engine(
            "--input",
            str(tmp_path / "empty"),
            "--config",
            str(tmp_path / "config.json"),
            "--out",
            str(tmp_path / "out"),
            *extra,
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, (extra, err)
    assert "holds no" in err
    code = engine(
        "--input",
        str(tmp_path / "empty"),
        "--config",
        str(tmp_path / "config.json"),
        "--out",
        str(tmp_path / "out"),
    )
    err = capsys.readouterr().err.strip()  # detected as nothing: one line naming what was expected
    assert (
        code == 2 and len(err.splitlines()) == 1 and "expected one of" in err and "a JSONL manifest" in err
    ), err
    assert not (tmp_path / "out").exists()


def test_manifest_is_still_accepted_and_input_format_names_the_kind(source_dataset, tmp_path):
    inp, src = source_dataset
    out = tmp_path / "named"
    assert (
        engine(
            "--manifest",
            str(src),
            "--input-format",
            "parquet",
            "--config",
            str(inp.config),
            "--out",
            str(out),
        )
        == 0
    )
    assert stats(out)["num_written"] == 8


# --- image folders --------------------------------------------------------------------------


def image_folder(root: Path, *, with_metadata: bool = True, missing: bool = False) -> Path:
    names = [f"{i}.jpg" for i in range(4)]
    for i, name in enumerate(names):
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "train" / name).write_bytes(imagegen.noise_jpeg((24, 20), seed=i))
    (root / "test").mkdir(exist_ok=True)
    (root / "test" / "t.png").write_bytes(imagegen.png((12, 12)))
    if with_metadata:
        lines = [
            {"file_name": n, "output": json.dumps({"price": i}), "source": "shelf"}
            for i, n in enumerate(names)
        ]
        if missing:
            lines.insert(1, {"file_name": "gone.jpg", "output": '{"price": 9}', "source": "shelf"})
        (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (root / "test" / "metadata.jsonl").write_text(
            json.dumps({"file_name": "t.png", "output": '{"price": 5}', "source": "bin"}) + "\n"
        )
    return root


def test_image_folder_to_parquet_matches_datasets_imagefolder(tmp_path):
    folder = image_folder(tmp_path / "folder", missing=True)
    (tmp_path / "config.json").write_bytes(CONFIG_BYTES)
    out = tmp_path / "out"
    assert engine("--input", str(folder), "--config", str(tmp_path / "config.json"), "--out", str(out)) == 0
    assert s_ok(stats(out), 6)
    [missing] = rejects(out)
    assert missing["stage"] == "fetch" and "gone.jpg" in missing["reason"] and missing["line"] == 2
    theirs = datasets.load_dataset("imagefolder", data_dir=str(folder))
    for split in ("train", "test"):
        ours = Output(out).rows(split)
        expected = [
            r
            for r in theirs[split].cast_column("image", datasets.Image(decode=False))
            if Path(r["image"]["path"]).exists()
        ]
        assert [r["image_id"] for r in ours] == [
            str(Path(r["image"]["path"]).relative_to(folder)) for r in expected
        ]
        assert [r["meta"]["source"] for r in ours] == [r["source"] for r in expected]
        assert [json.loads(r["output"]) for r in ours] == [json.loads(r["output"]) for r in expected]
        assert [pixels(r["image"]["bytes"]) for r in ours] == [
            pixels(Path(r["image"]["path"]).read_bytes()) for r in expected
        ]


def test_image_folder_without_metadata_needs_an_output_where_the_layout_does(tmp_path):
    folder = image_folder(tmp_path / "folder", with_metadata=False)
    (tmp_path / "config.json").write_bytes(CONFIG_BYTES)
    out = tmp_path / "out"
    assert engine("--input", str(folder), "--config", str(tmp_path / "config.json"), "--out", str(out)) == 0
    s = stats(out)
    assert s["num_written"] == 0 and s["num_rejected"] == 5
    assert all("output" in r["reason"] for r in rejects(out))


def data_hashes(out: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.suffix in (".parquet", ".arrow", ".jsonl")
    }


@pytest.mark.ray
def test_ray_workers_read_dataset_and_folder_inputs_identically(source_dataset, tmp_path, ray_instance):
    inp, src = source_dataset
    folder = image_folder(tmp_path / "folder")
    for name, where in (("dataset", src), ("folder", folder)):
        common = ("--input", str(where), "--config", str(inp.config), "--shard-rows", "2")
        assert engine(*common, "--out", str(tmp_path / f"{name}-local")) == 0
        assert (
            run_main(
                [
                    "convert",
                    *common,
                    "--out",
                    str(tmp_path / f"{name}-ray"),
                    "--runner",
                    "ray",
                    "--workers",
                    "2",
                    "--unit-rows",
                    "2",
                    "--quiet",
                ]
            )
            == 0
        )
        local, ray = data_hashes(tmp_path / f"{name}-local"), data_hashes(tmp_path / f"{name}-ray")
        assert local == ray and any(k.endswith(".parquet") for k in local)


def test_out_is_never_the_input_folder(source_dataset, capsys):
    inp, src = source_dataset
    assert engine("--input", str(src), "--config", str(inp.config), "--out", str(src), "--overwrite") == 2
    assert "must not be the input folder" in capsys.readouterr().err
    assert (src / "stats.json").exists()


def test_update_add_to_a_dataset_made_from_a_named_input_kind(source_dataset, tmp_path):
    inp, src = source_dataset
    out = tmp_path / "out"
    assert (
        engine(
            "--input", str(src), "--input-format", "parquet", "--config", str(inp.config), "--out", str(out)
        )
        == 0
    )
    extra = write_input(
        tmp_path / "extra", [row("new-1", "img/n.jpg")], {"img/n.jpg": imagegen.jpeg((20, 20))}
    )
    assert run_main(["update", str(out), "--add", str(extra.manifest), "--runner", "local", "--quiet"]) == 0
    assert "new-1" in Output(out).by_id("train") and stats(out)["num_written"] == 9

"""``engine update``: each operation on both layouts, read back with datasets, pyarrow and polars;
the data files byte-identical to a fresh ``convert`` of the equivalent final manifest; the image
bytes untouched; bad input refused before anything is touched; SIGKILL, then completion."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import imagegen
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from conftest import REPO, SCHEMA, Output, convert, row, run_main, write_input

CONVERT_OPTS = ["--shard-rows", "4", "--row-group-rows", "2", "--max-size", "64"]


def _images() -> dict[str, bytes]:
    images = {f"img/{i}.jpg": imagegen.jpeg((48 + i, 40)) for i in range(10)}
    images["img/big.jpg"] = imagegen.noise_jpeg((200, 150), seed=1)  # re-encoded (over --max-size)
    images["img/new.png"] = imagegen.png((30, 20), mode="RGBA")
    images["img/rot.jpg"] = imagegen.oriented(6)
    return images


def _rows() -> list[dict]:
    rows = []
    for i in range(10):
        r = row(f"id{i}", f"img/{i}.jpg", output={"price": i + 0.5, "currency": "EUR"}, barcode=f"{i:013d}")
        if i % 4 == 0:
            r["split"] = "test"
        if i == 3:
            r["shelf"] = "top"  # an extra meta key only this row has
        rows.append(r)
    rows.insert(5, row("big", "img/big.jpg"))
    rows.append(row("bad", "img/nope.jpg"))  # rejected at fetch
    return rows


def _rows_with_outputs(outputs: dict[str, dict]) -> list[dict]:
    """The manifest's rows, with the outputs of the ids in ``outputs`` replaced."""
    rows = _rows()
    for r in rows:
        if r["image_id"] in outputs:
            r["output"] = outputs[r["image_id"]]
    return rows


def _data_files(out: Path) -> dict[str, str]:
    """sha256 of the files that are the dataset's data (not stats.json, the card or rejects)."""
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and (
            p.suffix in (".parquet", ".arrow")
            or p.name in ("state.json", "dataset_info.json", "dataset_dict.json", "config.json")
        ):
            found[p.relative_to(out).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def _folder(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _update(out: Path, *args: str) -> int:
    return run_main(["update", str(out), "--runner", "local", "--quiet", *args])


@pytest.fixture(params=["parquet", "arrow"])
def layout(request):
    return request.param


def _layout_opts(layout: str) -> list[str]:
    return CONVERT_OPTS + (["--layout", "arrow"] if layout == "arrow" else [])


@pytest.fixture
def made(tmp_path, layout):
    inp = write_input(tmp_path / "in", _rows(), _images())
    out = tmp_path / "ds"
    assert convert(inp, out, *_layout_opts(layout)) == 0
    return inp, out


def _fresh(
    tmp_path: Path, inp, rows: list, layout: str, name: str = "fresh", config: Path | None = None
) -> Path:
    """A fresh convert of ``rows`` (the equivalent final manifest) with the same options."""
    manifest = _jsonl(inp.root / f"{name}.jsonl", rows)
    out = tmp_path / name
    argv = [
        "convert",
        "--manifest",
        str(manifest),
        "--config",
        str(config or inp.config),
        "--out",
        str(out),
        "--runner",
        "local",
        "--quiet",
        *_layout_opts(layout),
    ]
    assert run_main(argv) == 0
    return out


def _images_by_id(out: Path, layout: str) -> dict[str, bytes]:
    """The stored image bytes of every row, by id (packed: ids from row_ids.parquet)."""
    if layout == "parquet":
        return {
            r["image_id"]: r["image"]["bytes"] for split in ("train", "test") for r in Output(out).rows(split)
        }
    ids = pq.read_table(out / "row_ids.parquet").to_pylist()
    found = {}
    k = 0
    for split in ("train", "test"):
        for shard in sorted((out / split).glob("*.arrow")):
            with pa_stream(shard) as reader:
                for batch in reader:
                    for mods in batch.column("modalities").to_pylist():
                        assert ids[k]["split"] == split
                        found[ids[k]["image_id"]] = mods[0]["value"]["bytes"]
                        k += 1
    assert k == len(ids)
    return found


def pa_stream(path: Path):
    import pyarrow as pa

    class _Ctx:
        def __enter__(self):
            self.f = pa.OSFile(str(path), "rb")
            return ipc.open_stream(self.f)

        def __exit__(self, *exc):
            self.f.close()

    return _Ctx()


def _outputs(out: Path, layout: str) -> dict[str, str]:
    if layout == "parquet":
        return {r["image_id"]: r["output"] for split in ("train", "test") for r in Output(out).rows(split)}
    import datasets

    ids = [r["image_id"] for r in pq.read_table(out / "row_ids.parquet").to_pylist()]
    dd = datasets.load_from_disk(str(out))
    texts = [conv[-1]["content"] for split in ("train", "test") for conv in dd[split]["conversations"]]
    return dict(zip(ids, texts))


# ---- --outputs --------------------------------------------------------------------------------


def test_outputs_replace_validate_and_list_unknown_ids(tmp_path, made, layout, capsys):
    inp, out = made
    before = _images_by_id(out, layout)
    updates = _jsonl(
        tmp_path / "updates.jsonl",
        [
            {"image_id": "id1", "output": {"price": 99.0}},
            {"image_id": "ghost", "output": {"price": 1.0}},
            {"image_id": "id2", "output": {"price": "free"}},  # fails the schema: not applied
            {"image_id": "id1", "output": '{"price": 7.25, "currency": "USD"}'},  # the last line wins
            {"image_id": "id4", "output": {"price": 4.0}},
        ],
    )
    assert _update(out, "--outputs", str(updates)) == 0
    outputs = _outputs(out, layout)
    assert outputs["id1"] == '{"price":7.25,"currency":"USD"}'
    assert outputs["id2"] == '{"price":2.5,"currency":"EUR"}'
    assert outputs["id4"] == '{"price":4.0}'
    assert _images_by_id(out, layout) == before  # image bytes as they were
    entry = Output(out).stats["updates"][-1]
    assert entry["counts"]["outputs_applied"] == 2
    assert entry["counts"]["outputs_repeated"] == 1
    assert entry["counts"]["outputs_unknown"] == 1 and entry["unknown_ids"]["outputs"] == ["ghost"]
    assert [(x["image_id"], x["line"]) for x in entry["invalid_outputs"]] == [("id2", 3)]
    assert "schema violation" in entry["invalid_outputs"][0]["reason"]
    assert entry["inputs"]["outputs"]["sha256"] == hashlib.sha256(updates.read_bytes()).hexdigest()
    # the same dataset a fresh convert makes of the manifest with those outputs
    rows = _rows_with_outputs({"id1": {"price": 7.25, "currency": "USD"}, "id4": {"price": 4.0}})
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, rows, layout))
    stats = Output(out).stats
    assert stats["num_input_rows"] == stats["num_written"] + stats["num_rejected"] == 12


def test_outputs_read_back_with_datasets_pyarrow_and_polars(tmp_path, made, layout):
    inp, out = made
    updates = _jsonl(tmp_path / "u.jsonl", [{"image_id": "id5", "output": {"price": 55.5}}])
    assert _update(out, "--outputs", str(updates)) == 0
    import datasets

    if layout == "parquet":
        import polars as pl

        ds = datasets.load_dataset(str(out), split="train")
        got = {r["image_id"]: r for r in ds}
        assert got["id5"]["output"] == '{"price":55.5}'
        assert got["id5"]["image"].size == (53, 40)  # decodes as an image
        assert got["id3"]["meta"]["shelf"] == "top"
        frame = pl.read_parquet(out / "data" / "train-*.parquet")
        assert frame.filter(pl.col("image_id") == "id5")["output"].to_list() == ['{"price":55.5}']
        assert pq.read_table(out / "data" / "test-00000-of-00001.parquet").num_rows == 3
    else:
        dd = datasets.load_from_disk(str(out))
        assert {k: len(v) for k, v in dd.items()} == {"train": 8, "test": 3}
        outputs = _outputs(out, layout)
        assert outputs["id5"] == '{"price":55.5}'


# ---- --delete ---------------------------------------------------------------------------------


def test_delete_rows(tmp_path, made, layout):
    inp, out = made
    before = _images_by_id(out, layout)
    ids = tmp_path / "delete.txt"
    ids.write_text('id0\n{"image_id": "id3"}\n\nnobody\n')
    assert _update(out, "--delete", str(ids)) == 0
    after = _images_by_id(out, layout)
    assert set(after) == set(before) - {"id0", "id3"}
    assert all(after[k] == before[k] for k in after)
    entry = Output(out).stats["updates"][-1]
    assert entry["counts"]["deleted"] == 2 and entry["unknown_ids"]["delete"] == ["nobody"]
    rows = [r for r in _rows() if r["image_id"] not in ("id0", "id3")]
    # id3 was the only row with meta.shelf: a fresh convert has no such column either
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, rows, layout))
    stats = Output(out).stats
    assert stats["num_written"] == 9 and stats["num_input_rows"] == 10


# ---- --add ------------------------------------------------------------------------------------


def test_add_rows_rejects_existing_ids(tmp_path, made, layout):
    inp, out = made
    added = [
        row("n1", "img/new.png", output={"price": 3.0}),
        row("id2", "img/1.jpg"),
        row("n2", "img/rot.jpg", split="test"),
        row("n3", "img/missing.jpg"),
        row("n1", "img/2.jpg"),
    ]
    manifest = _jsonl(inp.root / "add.jsonl", added)
    before = Output(out).stats["images"]
    assert before["resized_ids"] == ["big"] and before["rotated_ids"] == []
    assert _update(out, "--add", str(manifest)) == 0
    o = Output(out)
    rejects = [r for r in o.rejects if r.get("update") == 1]
    assert sorted((r["image_id"], r["stage"]) for r in rejects) == [
        ("id2", "duplicate"),
        ("n1", "duplicate"),
        ("n3", "fetch"),
    ]
    assert "already in the dataset" in next(r["reason"] for r in rejects if r["image_id"] == "id2")
    entry = o.stats["updates"][-1]
    assert entry["counts"]["added"] == 2 and entry["counts"]["add_rejected"] == 3
    # stats.json "images" stays the convert's; the added rows' images are counted in their entry
    assert o.stats["images"] == before
    assert entry["images"] == {
        "passthrough": 1,
        "resized": 0,
        "rotated": 1,
        "reencoded": 0,
        "resized_ids": [],
        "rotated_ids": ["n2"],
    }
    assert o.stats["num_input_rows"] == o.stats["num_written"] + o.stats["num_rejected"] == 17
    # a fresh convert of the old manifest followed by the new lines
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, _rows() + added, layout))


def test_add_with_replace(tmp_path, made, layout):
    inp, out = made
    added = [row("id2", "img/new.png", output={"price": 2.0}), row("n1", "img/rot.jpg")]
    manifest = _jsonl(inp.root / "add.jsonl", added)
    assert _update(out, "--add", str(manifest), "--replace") == 0
    entry = Output(out).stats["updates"][-1]
    assert entry["counts"]["replaced"] == 1 and entry["counts"]["added"] == 2
    assert _outputs(out, layout)["id2"] == '{"price":2.0}'
    rows = [r for r in _rows() if r["image_id"] != "id2"] + added
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, rows, layout))


# ---- --config ---------------------------------------------------------------------------------


def _new_config(tmp_path: Path) -> Path:
    schema = dict(SCHEMA, properties={**SCHEMA["properties"], "price": {"type": "number", "maximum": 5}})
    path = tmp_path / "new-config.json"
    path.write_text(json.dumps({"instructions": "Read the price (at most 5).", "json_schema": schema}))
    return path


def test_config_refused_when_rows_no_longer_conform(tmp_path, made, layout, capsys):
    inp, out = made
    before = _folder(out)
    assert _update(out, "--config", str(_new_config(tmp_path))) == 1
    err = capsys.readouterr().err
    assert "do not conform to the new schema" in err and "--drop-invalid" in err and "id5" in err
    assert _folder(out) == before  # nothing changed
    assert not list(tmp_path.glob(".*engine-update*"))


def test_config_with_drop_invalid(tmp_path, made, layout):
    inp, out = made
    config = _new_config(tmp_path)
    assert _update(out, "--config", str(config), "--drop-invalid") == 0
    o = Output(out)
    entry = o.stats["updates"][-1]
    dropped = sorted(x["image_id"] for x in entry["no_longer_valid"])
    assert dropped == ["id5", "id6", "id7", "id8", "id9"]
    assert entry["counts"]["dropped_invalid"] == 5
    assert sorted(r["image_id"] for r in o.rejects if r["stage"] == "validate") == dropped
    assert (out / "config.json").read_bytes() == config.read_bytes()
    assert o.stats["num_input_rows"] == o.stats["num_written"] + o.stats["num_rejected"]
    # a fresh convert with the new config rejects the same rows at validate
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, _rows(), layout, config=config))


# ---- --show-diff, history, re-runs ------------------------------------------------------------


def test_show_diff_changes_nothing(tmp_path, made, layout, capsys):
    inp, out = made
    before = _folder(out)
    updates = _jsonl(tmp_path / "u.jsonl", [{"image_id": "id1", "output": {"price": 8.0, "currency": "EUR"}}])
    ids = tmp_path / "d.txt"
    ids.write_text("id6\n")
    capsys.readouterr()
    assert _update(out, "--outputs", str(updates), "--delete", str(ids), "--show-diff") == 0
    shown = capsys.readouterr().out
    assert '-  "price": 1.5,' in shown and '+  "price": 8.0,' in shown
    assert "--- id6 (old)" in shown and "+++ id6 (deleted)" in shown
    assert _folder(out) == before


def test_history_and_a_second_run_of_the_same_update(tmp_path, made, layout, capsys):
    inp, out = made
    updates = _jsonl(tmp_path / "u.jsonl", [{"image_id": "id1", "output": {"price": 8.0}}])
    ids = _jsonl(tmp_path / "d.txt", ["id7"])
    assert _update(out, "--outputs", str(updates)) == 0
    assert _update(out, "--delete", str(ids)) == 0
    after = _folder(out)
    assert _update(out, "--delete", str(ids)) == 0  # already applied: nothing to do
    assert _folder(out) == after
    history = Output(out).stats["updates"]
    assert [list(h["inputs"]) for h in history] == [["outputs"], ["delete"]]
    assert all(h["at"].endswith("+00:00") and len(h["digest"]) == 64 for h in history)
    if layout == "parquet":
        card = (out / "README.md").read_text()
        assert "num_examples: 7" in card  # the card counts the rows left in train (8 - id7)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "not-a-dataset",
        "unfinished",
        "malformed-updates",
        "no-output",
        "invalid-schema",
        "nothing-to-do",
        "missing-file",
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, made, layout, capsys, case):
    inp, out = made
    updates = _jsonl(tmp_path / "u.jsonl", [{"image_id": "id1", "output": {"price": 8.0}}])
    args = ["--outputs", str(updates)]
    target = out
    if case == "not-a-dataset":
        target = tmp_path / "in"
    elif case == "unfinished":
        (out / ".engine").mkdir()
    elif case == "malformed-updates":
        updates.write_text('{"image_id": "id1", "output": {"price": 8.0}}\n{"image_id": \n')
    elif case == "no-output":
        updates.write_text('{"image_id": "id1"}\n')
    elif case == "invalid-schema":
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"instructions": "x", "json_schema": {"type": "nonsense"}}))
        args = ["--config", str(bad)]
    elif case == "nothing-to-do":
        args = []
    elif case == "missing-file":
        args = ["--delete", str(tmp_path / "nope.txt")]
    before = _folder(target)
    capsys.readouterr()
    assert _update(target, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("engine: error: "), err
    assert "Traceback" not in err
    assert _folder(target) == before
    assert not list(tmp_path.glob(".*engine-update*"))


# ---- crashes ----------------------------------------------------------------------------------


def _update_subprocess(out: Path, args: list[str], crash_at: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("ENGINE_CRASH_AT", None)
    if crash_at:
        env["ENGINE_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "engine", "update", str(out), "--runner", "local", "--quiet", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "point", ["update-started", "update-first-shard", "update-staged", "update-committing", "update-swapped"]
)
def test_sigkill_then_run_again(tmp_path, made, layout, point):
    inp, out = made
    old = _data_files(out)
    old_outputs = _outputs(out, layout)
    updates = _jsonl(tmp_path / "u.jsonl", [{"image_id": "id1", "output": {"price": 8.0}}])
    ids = _jsonl(tmp_path / "d.txt", ["id9"])
    args = ["--outputs", str(updates), "--delete", str(ids)]
    killed = _update_subprocess(out, args, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point == "update-swapped":  # killed after the swap: the new dataset is in place
        assert _outputs(out, layout)["id1"] == '{"price":8.0}'
    else:  # the old dataset, untouched and loadable
        assert _data_files(out) == old
        assert _outputs(out, layout) == old_outputs
    again = _update_subprocess(out, args + (["--resume"] if point == "update-first-shard" else []), None)
    assert again.returncode == 0, again.stderr
    rows = [r for r in _rows() if r["image_id"] != "id9"]
    rows[1]["output"] = {"price": 8.0}
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, rows, layout))
    assert len(Output(out).stats["updates"]) == 1
    assert not list(tmp_path.glob(".*engine-update*"))


# ---- --split, other kinds of datasets ---------------------------------------------------------


def test_split_limits_outputs_and_delete(tmp_path, made, layout):
    inp, out = made
    updates = _jsonl(
        tmp_path / "u.jsonl",
        [{"image_id": "id0", "output": {"price": 0.0}}, {"image_id": "id1", "output": {"price": 1.0}}],
    )
    ids = _jsonl(tmp_path / "d.txt", ["id4", "id5"])
    assert _update(out, "--outputs", str(updates), "--delete", str(ids), "--split", "test") == 0
    entry = Output(out).stats["updates"][-1]
    assert entry["unknown_ids"] == {
        "outputs": ["id1"],
        "delete": ["id5"],
    }  # train rows are not in --split test
    rows = [r for r in _rows() if r["image_id"] != "id4"]
    rows[0]["output"] = {"price": 0.0}
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, rows, layout))


def test_trainer_style_packed_dataset(tmp_path):
    images = {"a.jpg": imagegen.jpeg((40, 30)), "b.jpg": imagegen.jpeg((50, 30))}
    token = "<|reserved_special_token_0|>"
    rows = [
        {
            "conversations": [
                {"role": "user", "content": f"{token}\nWhat is {i}?"},
                {"role": "assistant", "content": f"It is {i}."},
            ],
            "modalities": [{"type": "image", "value": "ab"[i % 2] + ".jpg"}],
            "id": f"t{i}",
        }
        for i in range(5)
    ]
    inp = write_input(tmp_path / "in", rows, images, manifest_name="trainer.jsonl")
    out = tmp_path / "packed"
    base = ["convert", "--layout", "arrow", "--runner", "local", "--quiet", "--shard-rows", "2"]
    assert run_main(base + ["--manifest", str(inp.manifest), "--out", str(out)]) == 0
    updates = _jsonl(tmp_path / "u.jsonl", [{"image_id": "t1", "output": "x"}])
    assert _update(out, "--outputs", str(updates)) == 2  # no schema to validate against
    ids = _jsonl(tmp_path / "d.txt", ["t1", "t3"])
    assert _update(out, "--delete", str(ids)) == 0
    final = _jsonl(inp.root / "final.jsonl", [r for r in rows if r["id"] not in ("t1", "t3")])
    fresh = tmp_path / "fresh"
    assert run_main(base + ["--manifest", str(final), "--out", str(fresh)]) == 0
    assert _data_files(out) == _data_files(fresh)


# ---- fs-image datasets (--images-as-paths) ----------------------------------------------------

FS_OPTS = CONVERT_OPTS + ["--layout", "arrow", "--images-as-paths"]


def _fs_rows() -> list[dict]:
    return _rows()


def _fs_files(out: Path) -> dict[str, str]:
    """sha256 of the data files and of every image file under images/."""
    found = _data_files(out)
    found.update(
        {
            p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "images").glob("*"))
            if p.is_file()
        }
    )
    assert any(k.startswith("images/") for k in found)
    return found


def _fs_images(out: Path, base: Path | None = None) -> dict[str, list[bytes]]:
    """Every row's image files' bytes by id, through load_from_disk; each path opens as an image."""
    from PIL import Image

    ids = [r["image_id"] for r in pq.read_table(out / "row_ids.parquet").to_pylist()]
    found = {}
    mods = _fs_modalities(out)
    assert len(mods) == len(ids)
    for image_id, row_mods in zip(ids, mods):
        files = [
            Path(m["value"]) if os.path.isabs(m["value"]) else (base or out) / m["value"] for m in row_mods
        ]
        for f in files:
            with Image.open(f) as im:
                im.verify()
        found[image_id] = [f.read_bytes() for f in files]
    return found


@pytest.fixture
def fs_made(tmp_path):
    inp = write_input(tmp_path / "in", _fs_rows(), _images())
    out = tmp_path / "fs"
    assert convert(inp, out, *FS_OPTS) == 0
    return inp, out


def _fs_fresh(
    tmp_path: Path,
    inp,
    rows: list,
    config: Path | None = None,
    out: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Path:
    manifest = _jsonl(inp.root / "fresh.jsonl", rows)
    out = out or tmp_path / "fresh"
    argv = [
        "convert",
        "--manifest",
        str(manifest),
        "--config",
        str(config or inp.config),
        "--out",
        str(out),
        "--runner",
        "local",
        "--quiet",
        *FS_OPTS,
        *extra,
    ]
    assert run_main(argv) == 0
    return out


def _fs_case(tmp_path: Path, inp, case: str) -> tuple[list[str], list[dict], Path | None]:
    """(update arguments, the equivalent final manifest, the config a fresh convert uses)."""
    rows = _fs_rows()
    if case == "outputs":
        updates = _jsonl(
            tmp_path / "u.jsonl",
            [{"image_id": "id2", "output": {"price": 9.0}}, {"image_id": "ghost", "output": {"price": 1.0}}],
        )
        rows[2]["output"] = {"price": 9.0}
        return ["--outputs", str(updates)], rows, None
    if case == "delete":
        ids = _jsonl(tmp_path / "d.txt", ["id0", "id3", "id7"])
        return ["--delete", str(ids)], [r for r in rows if r["image_id"] not in ("id0", "id3", "id7")], None
    if case in ("add", "replace"):
        added = [
            row("n1", "img/new.png", output={"price": 3.0}),
            row("id2", "img/rot.jpg"),
            row("n2", "img/1.jpg", split="test"),
            row("n3", "img/missing.jpg"),
        ]
        manifest = _jsonl(inp.root / "add.jsonl", added)
        if case == "add":  # id2 is a duplicate, rejected
            return ["--add", str(manifest)], rows + added, None
        return (
            ["--add", str(manifest), "--replace"],
            [r for r in rows if r["image_id"] != "id2"] + added,
            None,
        )
    config = _new_config(tmp_path)  # config: id5..id9 no longer conform and go; they keep their lines
    return ["--config", str(config), "--drop-invalid"], rows, config


@pytest.mark.parametrize("case", ["outputs", "delete", "add", "replace", "config"])
def test_fs_image_update_matches_a_fresh_convert(tmp_path, fs_made, case):
    """Image files renamed to the lines of the equivalent final manifest, never re-encoded; the
    shards, state.json, dataset_info.json and every image file byte-identical to a fresh convert."""
    inp, out = fs_made
    before = _fs_images(out)
    args, rows, config = _fs_case(tmp_path, inp, case)
    assert _update(out, *args) == 0
    after = _fs_images(out)
    assert all(after[k] == before[k] for k in after if k in before and not (case == "replace" and k == "id2"))
    fresh = _fs_fresh(tmp_path, inp, rows, config)
    assert _fs_files(out) == _fs_files(fresh)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        p.name for p in (fresh / "images").iterdir()
    )
    stats = Output(out).stats
    assert stats["num_input_rows"] == stats["num_written"] + stats["num_rejected"] == len(rows)


def test_fs_image_two_updates_in_a_row(tmp_path, fs_made):
    """A delete, then an add: the second update counts the lines the first left."""
    inp, out = fs_made
    assert _update(out, "--delete", str(_jsonl(tmp_path / "d.txt", ["id1"]))) == 0
    added = [row("n1", "img/new.png")]
    assert _update(out, "--add", str(_jsonl(inp.root / "add.jsonl", added))) == 0
    rows = [r for r in _fs_rows() if r["image_id"] != "id1"] + added
    assert _fs_files(out) == _fs_files(_fs_fresh(tmp_path, inp, rows))


def test_fs_image_absolute_paths(tmp_path):
    """--absolute-paths point into OUT itself: byte-identical to a fresh convert into the same OUT;
    a folder moved since convert (its paths point elsewhere) is refused, untouched."""
    inp = write_input(tmp_path / "in", _fs_rows(), _images())
    out = tmp_path / "abs"
    assert convert(inp, out, *FS_OPTS, "--absolute-paths") == 0
    ids = _jsonl(tmp_path / "d.txt", ["id1"])
    assert _update(out, "--delete", str(ids)) == 0
    updated = _fs_files(out)
    assert all(b for b in _fs_images(out).values())
    import shutil

    shutil.rmtree(out)
    rows = [r for r in _fs_rows() if r["image_id"] != "id1"]
    assert _fs_files(_fs_fresh(tmp_path, inp, rows, out=out, extra=("--absolute-paths",))) == updated
    moved = tmp_path / "moved"
    out.rename(moved)
    before = _folder(moved)
    assert _update(moved, "--delete", str(_jsonl(tmp_path / "d2.txt", ["id2"]))) == 2
    assert _folder(moved) == before


def test_fs_image_paths_relative_to(tmp_path):
    inp = write_input(tmp_path / "in", _fs_rows(), _images())
    out = tmp_path / "sets" / "one"
    assert convert(inp, out, *FS_OPTS, "--paths-relative-to", str(tmp_path / "sets")) == 0
    assert _update(out, "--delete", str(_jsonl(tmp_path / "d.txt", ["id4"]))) == 0
    _fs_images(out, base=tmp_path / "sets")
    rows = [r for r in _fs_rows() if r["image_id"] != "id4"]
    fresh = _fs_fresh(
        tmp_path,
        inp,
        rows,
        out=tmp_path / "sets" / "fresh",
        extra=("--paths-relative-to", str(tmp_path / "sets")),
    )
    mine = {k: v for k, v in _fs_files(out).items() if k.startswith("images/")}
    assert mine == {k: v for k, v in _fs_files(fresh).items() if k.startswith("images/")}
    paths = [m["value"] for mods in _fs_modalities(out) for m in mods]
    assert paths == [m["value"].replace("fresh/", "one/", 1) for mods in _fs_modalities(fresh) for m in mods]


def _fs_modalities(out: Path) -> list:
    import datasets

    dd = datasets.load_from_disk(str(out))
    if isinstance(dd, datasets.Dataset):  # one split: save_to_disk's Dataset folder
        return dd["modalities"]
    return [m for split in dd for m in dd[split]["modalities"]]


def test_fs_image_sigkill_then_run_again(tmp_path, fs_made):
    inp, out = fs_made
    old = _fs_files(out)
    ids = _jsonl(tmp_path / "d.txt", ["id1"])
    killed = _update_subprocess(out, ["--delete", str(ids)], "update-first-shard")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _fs_files(out) == old  # the old dataset, untouched and loadable
    _fs_images(out)
    again = _update_subprocess(out, ["--delete", str(ids)], None)
    assert again.returncode == 0, again.stderr
    rows = [r for r in _fs_rows() if r["image_id"] != "id1"]
    assert _fs_files(out) == _fs_files(_fs_fresh(tmp_path, inp, rows))
    assert not list(tmp_path.glob(".*engine-update*"))


def test_fs_image_trainer_rows_with_two_images(tmp_path):
    """Rows with several images ({line}-{stem}-{i}.{ext}) renamed together; --delete then --add."""
    images = {"a.jpg": imagegen.jpeg((40, 30)), "b.png": imagegen.png((20, 20))}
    token = "<|reserved_special_token_0|>"

    def trainer(i: int, n: int) -> dict:
        return {
            "conversations": [
                {"role": "user", "content": f"{token}\n" * n + f"What is {i}?"},
                {"role": "assistant", "content": f"It is {i}."},
            ],
            "modalities": [{"type": "image", "value": v} for v in ["a.jpg", "b.png"][:n]],
            "id": f"t{i}",
        }

    rows = [trainer(i, 1 + i % 2) for i in range(6)]
    inp = write_input(tmp_path / "in", rows, images, manifest_name="trainer.jsonl")
    base = [
        "convert",
        "--layout",
        "arrow",
        "--images-as-paths",
        "--runner",
        "local",
        "--quiet",
        "--shard-rows",
        "2",
    ]
    out = tmp_path / "packed"
    assert run_main(base + ["--manifest", str(inp.manifest), "--out", str(out)]) == 0
    before = _fs_images(out)
    assert _update(out, "--delete", str(_jsonl(tmp_path / "d.txt", ["t0", "t3"]))) == 0
    added = [trainer(7, 2)]
    assert _update(out, "--add", str(_jsonl(inp.root / "add.jsonl", added))) == 0
    after = _fs_images(out)
    assert all(after[k] == before[k] for k in before if k not in ("t0", "t3")) and len(after["t7"]) == 2
    final = _jsonl(inp.root / "final.jsonl", [r for r in rows if r["id"] not in ("t0", "t3")] + added)
    fresh = tmp_path / "fresh"
    assert run_main(base + ["--manifest", str(final), "--out", str(fresh)]) == 0
    assert _fs_files(out) == _fs_files(fresh)


def test_fs_image_retry_rejected_is_refused(tmp_path, fs_made, capsys):
    inp, out = fs_made
    before = _folder(out)
    capsys.readouterr()
    assert _update(out, "--retry-rejected") == 2
    assert "fs-image" in capsys.readouterr().err
    assert _folder(out) == before


def test_without_an_atomic_exchange_two_renames_do(tmp_path, made, layout, monkeypatch):
    """Where the filesystem cannot exchange two folders, the update still commits."""
    from engine.update import commit

    inp, out = made
    monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
    ids = _jsonl(tmp_path / "d.txt", ["id9"])
    assert _update(out, "--delete", str(ids)) == 0
    rows = [r for r in _rows() if r["image_id"] != "id9"]
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, rows, layout))
    assert not list(tmp_path.glob(".*engine-update*"))


def test_the_exchange_is_atomic_here(tmp_path):
    from engine.update.commit import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not _exchange(str(a), str(b)):
        pytest.skip("this filesystem cannot exchange two folders")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_users_own_files_in_the_folder_are_kept(tmp_path, made, layout):
    inp, out = made
    (out / "NOTES.txt").write_text("mine")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref")
    ids = _jsonl(tmp_path / "d.txt", ["id9"])
    assert _update(out, "--delete", str(ids)) == 0
    assert (out / "NOTES.txt").read_text() == "mine" and (out / ".git" / "HEAD").read_text() == "ref"


def test_a_second_update_at_the_same_time_is_refused(tmp_path, made, layout, capsys):
    from engine.sinks.store import Store
    from engine.update.commit import Staging

    inp, out = made
    ids = _jsonl(tmp_path / "d.txt", ["id9"])
    running = Staging(Store(str(out)))
    running.lock()
    try:
        before = _folder(out)
        capsys.readouterr()
        assert _update(out, "--delete", str(ids)) == 2
        assert "another 'engine update'" in capsys.readouterr().err
        assert _folder(out) == before
    finally:
        running.unlock()
    assert _update(out, "--delete", str(ids)) == 0


def test_add_rows_of_a_new_split(tmp_path, made, layout):
    inp, out = made
    added = [row("v1", "img/new.png", split="validation"), row("v2", "img/1.jpg", split="validation")]
    assert _update(out, "--add", str(_jsonl(inp.root / "add.jsonl", added))) == 0
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, _rows() + added, layout))
    assert list(Output(out).stats["splits"]) == ["train", "validation", "test"]


def test_delete_every_row(tmp_path, made, layout):
    """Nothing left: one empty shard of the default split, as convert writes when every row is rejected."""
    inp, out = made
    ids = _jsonl(tmp_path / "d.txt", [r["image_id"] for r in _rows()])
    assert _update(out, "--delete", str(ids)) == 0
    stats = Output(out).stats
    assert stats["num_written"] == 0 and stats["num_input_rows"] == stats["num_rejected"] == 1
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, [_rows()[-1]], layout))

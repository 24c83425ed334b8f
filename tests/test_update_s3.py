"""``engine update`` on object storage (moto's S3 server on 127.0.0.1): the same data files as a
fresh local convert, read back with datasets through fsspec, and a crash in the middle of the
commit finished by running the update again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import imagegen
import pytest
from conftest import REPO, convert, moto_s3, parquet_hashes, row, run_main, write_input

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
from test_s3 import _s3_hashes  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    yield from moto_s3("bucket")


OPTS = ["--shard-rows", "3", "--row-group-rows", "2"]


@pytest.fixture
def inp(tmp_path):
    images = {f"img/{i}.jpg": imagegen.jpeg((40 + i, 30)) for i in range(8)}
    rows = [row(f"id{i}", f"img/{i}.jpg", output={"price": i + 0.5}) for i in range(8)]
    return write_input(tmp_path / "in", rows, images)


def _final_rows():
    rows = [row(f"id{i}", f"img/{i}.jpg", output={"price": i + 0.5}) for i in range(8) if i != 2]
    rows[0]["output"] = {"price": 42.0}
    return rows


def _inputs(tmp_path):
    updates = tmp_path / "u.jsonl"
    updates.write_text(json.dumps({"image_id": "id0", "output": {"price": 42.0}}) + "\n")
    ids = tmp_path / "d.txt"
    ids.write_text("id2\nghost\n")
    return ["--outputs", str(updates), "--delete", str(ids)]


def _fresh(tmp_path, inp):
    manifest = inp.root / "final.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in _final_rows()))
    out = tmp_path / "fresh"
    assert (
        run_main(
            [
                "convert",
                "--manifest",
                str(manifest),
                "--config",
                str(inp.config),
                "--out",
                str(out),
                "--runner",
                "local",
                "--quiet",
                *OPTS,
            ]
        )
        == 0
    )
    return out


def test_update_on_s3(s3, inp, tmp_path, online):
    import datasets

    out = "s3://bucket/upd"
    assert convert(inp, out, *OPTS) == 0  # type: ignore[arg-type]
    assert run_main(["update", out, "--runner", "local", "--quiet", *_inputs(tmp_path)]) == 0
    keys = {k.split("upd/", 1)[1] for k in s3.find("bucket/upd")}
    assert not [k for k in keys if k.startswith(".engine")], keys
    assert _s3_hashes(s3, "bucket/upd") == parquet_hashes(_fresh(tmp_path, inp))
    ds = datasets.load_dataset("parquet", data_files={"train": f"{out}/data/train-*.parquet"}, split="train")
    got = {r["image_id"]: r for r in ds}
    assert sorted(got) == [f"id{i}" for i in range(8) if i != 2]
    assert got["id0"]["output"] == '{"price":42.0}' and got["id1"]["image"].size == (41, 30)
    stats = json.loads(s3.cat_file("bucket/upd/stats.json"))
    assert stats["updates"][-1]["unknown_ids"]["delete"] == ["ghost"]
    assert stats["num_written"] == 7


def test_crash_during_the_s3_commit_then_run_again(s3, inp, tmp_path, online):
    out = "s3://bucket/crash"
    assert convert(inp, out, *OPTS) == 0  # type: ignore[arg-type]
    env = dict(os.environ, PYTHONPATH=str(REPO), ENGINE_CRASH_AT="update-mid-commit")
    argv = [sys.executable, "-m", "engine", "update", out, "--runner", "local", "--quiet", *_inputs(tmp_path)]
    killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not s3.exists("bucket/crash/stats.json")  # mid-commit: the folder says it is unfinished
    env.pop("ENGINE_CRASH_AT")
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert _s3_hashes(s3, "bucket/crash") == parquet_hashes(_fresh(tmp_path, inp))
    assert not [k for k in s3.find("bucket/crash") if "/.engine" in k]
    assert len(json.loads(s3.cat_file("bucket/crash/stats.json"))["updates"]) == 1


def test_packed_update_on_s3(s3, inp, tmp_path, online):
    import hashlib

    import datasets

    out = "s3://bucket/packed-upd"
    assert convert(inp, out, "--layout", "arrow", *OPTS) == 0  # type: ignore[arg-type]
    assert run_main(["update", out, "--runner", "local", "--quiet", *_inputs(tmp_path)]) == 0
    manifest = inp.root / "final.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in _final_rows()))
    fresh = tmp_path / "fresh-packed"
    assert (
        run_main(
            [
                "convert",
                "--manifest",
                str(manifest),
                "--config",
                str(inp.config),
                "--out",
                str(fresh),
                "--runner",
                "local",
                "--quiet",
                "--layout",
                "arrow",
                *OPTS,
            ]
        )
        == 0
    )
    names = ["row_ids.parquet", "state.json", "dataset_info.json"] + sorted(
        p.name for p in fresh.glob("*.arrow")
    )
    assert {n: hashlib.sha256(s3.cat_file(f"bucket/packed-upd/{n}")).hexdigest() for n in names} == {
        n: hashlib.sha256((fresh / n).read_bytes()).hexdigest() for n in names
    }
    ds = datasets.load_from_disk(out)
    assert len(ds) == 7 and ds[0]["conversations"][-1]["content"] == '{"price":42.0}'


def test_crash_before_the_s3_commit_leaves_the_old_dataset(s3, inp, tmp_path, online):
    out = "s3://bucket/staged"
    assert convert(inp, out, *OPTS) == 0  # type: ignore[arg-type]
    before = _s3_hashes(s3, "bucket/staged")
    stats = s3.cat_file("bucket/staged/stats.json")
    env = dict(os.environ, PYTHONPATH=str(REPO), ENGINE_CRASH_AT="update-staged")
    argv = [sys.executable, "-m", "engine", "update", out, "--runner", "local", "--quiet", *_inputs(tmp_path)]
    killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _s3_hashes(s3, "bucket/staged") == before and s3.cat_file("bucket/staged/stats.json") == stats
    env.pop("ENGINE_CRASH_AT")
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert _s3_hashes(s3, "bucket/staged") == parquet_hashes(_fresh(tmp_path, inp))
    assert not [k for k in s3.find("bucket/staged") if "/.engine" in k]


def test_an_outputs_update_on_s3_splices_the_shards(s3, inp, tmp_path, online):
    """The old shards' column chunks are read by range from the bucket and copied into the new ones."""
    out = "s3://bucket/splice"
    assert convert(inp, out, *OPTS) == 0  # type: ignore[arg-type]
    updates = tmp_path / "u.jsonl"
    updates.write_text(json.dumps({"image_id": "id4", "output": {"price": 4.25}}) + "\n")
    assert run_main(["update", out, "--runner", "local", "--quiet", "--outputs", str(updates)]) == 0
    counts = json.loads(s3.cat_file("bucket/splice/stats.json"))["updates"][-1]["counts"]
    assert counts["shards_spliced"] == 3 and counts["shards_rewritten"] == 0
    rows = [row(f"id{i}", f"img/{i}.jpg", output={"price": i + 0.5}) for i in range(8)]
    rows[4]["output"] = {"price": 4.25}
    manifest = inp.root / "final.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fresh = tmp_path / "fresh"
    argv = ["convert", "--manifest", str(manifest), "--config", str(inp.config), "--out", str(fresh)]
    assert run_main([*argv, "--runner", "local", "--quiet", *OPTS]) == 0
    assert _s3_hashes(s3, "bucket/splice") == parquet_hashes(fresh)

"""Object storage: a full conversion reading from and writing to a real S3 server (moto's standalone
server on 127.0.0.1), read back with ``datasets`` through fsspec."""

from __future__ import annotations

import hashlib

import imagegen
import pytest
from conftest import convert, moto_s3, parquet_hashes, row, write_input

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    yield from moto_s3("bucket")


@pytest.fixture(scope="module")
def local_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3in")
    images, rows = {}, []
    for i in range(12):
        images[f"img/{i}.jpg"] = imagegen.oriented((i % 8) + 1, "JPEG", size=(320, 240))
        rows.append(row(f"id{i}", f"img/{i}.jpg", split="test" if i % 4 == 0 else None))
    for r in rows:
        if r.get("split") is None:
            r.pop("split", None)
    rows.append(row("missing", "img/nope.jpg"))
    return write_input(root, rows, images)


def _upload(fs, inp, prefix: str) -> tuple[str, str]:
    for path in inp.root.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/{path.relative_to(inp.root).as_posix()}")
    return f"s3://{prefix}/manifest.jsonl", f"s3://{prefix}/config.json"


def _s3_hashes(fs, prefix: str) -> dict[str, str]:
    return {
        p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in fs.glob(f"{prefix}/data/*.parquet")
    }


@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])])
def test_s3_to_s3_round_trip(s3, local_input, tmp_path, runner, online):
    import datasets

    from engine.cli import main

    manifest, config = _upload(s3, local_input, f"bucket/in-{runner}")
    out = f"s3://bucket/out-{runner}"
    argv = [
        "convert",
        "--manifest",
        manifest,
        "--config",
        config,
        "--out",
        out,
        "--runner",
        runner,
        "--quiet",
        "--shard-rows",
        "4",
        "--max-size",
        "200",
    ]
    assert main(argv) == 0
    keys = {k.split(f"out-{runner}/", 1)[1] for k in s3.find(f"bucket/out-{runner}")}
    assert not [k for k in keys if k.startswith(".engine")], keys  # scratch space removed, commit done
    assert {"stats.json", "rejects.jsonl", "config.json", "README.md"} <= keys
    # byte-identical to the same conversion on local disk
    local_out = tmp_path / "local"
    assert convert(local_input, local_out, "--shard-rows", "4", "--max-size", "200") == 0
    assert _s3_hashes(s3, f"bucket/out-{runner}") == parquet_hashes(local_out)
    ds = datasets.load_dataset(
        "parquet", data_files={"train": f"{out}/data/train-*.parquet", "test": f"{out}/data/test-*.parquet"}
    )
    assert ds.num_rows == {"train": 9, "test": 3}
    assert max(ds["train"][0]["image"].size) <= 200
    stats = __import__("json").loads(s3.cat_file(f"bucket/out-{runner}/stats.json"))
    assert stats["num_input_rows"] == 13 and stats["rejected_by_reason"] == {"fetch": 1}


def test_s3_packed_arrow_loads_with_load_from_disk(s3, local_input, online):
    import datasets

    from engine.cli import main

    manifest, config = _upload(s3, local_input, "bucket/in-arrow")
    out = "s3://bucket/packed"
    assert (
        main(
            [
                "convert",
                "--manifest",
                manifest,
                "--config",
                config,
                "--out",
                out,
                "--layout",
                "arrow",
                "--runner",
                "local",
                "--quiet",
                "--max-size",
                "200",
            ]
        )
        == 0
    )
    dd = datasets.load_from_disk(out)
    assert {k: len(v) for k, v in dd.items()} == {"train": 9, "test": 3}
    assert dd["train"][0]["conversations"][-1]["role"] == "assistant"

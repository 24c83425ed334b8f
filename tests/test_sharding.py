"""Shard naming and rolling: --shard-rows caps rows per shard, --max-shard-size caps bytes."""

from __future__ import annotations

import re

import imagegen
import pyarrow.parquet as pq
import pytest
from conftest import SHARD_NAME, Output, convert, row, write_input

NUM_ROWS = 10


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    images = {f"n{i}.jpg": imagegen.noise_jpeg((64, 64), seed=100 + i) for i in range(NUM_ROWS)}
    rows = [row(f"id_{i:02d}", f"n{i}.jpg") for i in range(NUM_ROWS)]
    return write_input(root / "in", rows, images), images


def check_names(out: Output, split: str = "train") -> list[int]:
    """Names follow {split}-{i:05d}-of-{n:05d}; indices are 0..n-1; returns rows per shard."""
    files = out.shards(split)
    n = len(files)
    assert n >= 1
    for i, f in enumerate(files):
        m = re.fullmatch(SHARD_NAME, f.name)
        assert m, f.name
        assert (m["split"], int(m["index"]), int(m["count"])) == (split, i, n), f.name
    return [pq.ParquetFile(f).metadata.num_rows for f in files]


@pytest.mark.parametrize("shard_rows,expected", [(3, [3, 3, 3, 1]), (5, [5, 5]), (100, [10])])
def test_shard_rows(inp, tmp_path, shard_rows, expected):
    manifest, _ = inp
    assert convert(manifest, tmp_path / "out", "--shard-rows", str(shard_rows)) == 0
    out = Output(tmp_path / "out")
    counts = check_names(out)
    assert counts == expected
    assert [r["image_id"] for r in out.rows()] == [f"id_{i:02d}" for i in range(NUM_ROWS)]


def test_shard_rows_with_rejects_still_names_consistently(tmp_path):
    rows = [row(f"id_{i}", "a.jpg" if i % 3 else "nope.jpg") for i in range(9)]
    inp = write_input(tmp_path / "in", rows, {"a.jpg": imagegen.jpeg()})
    assert convert(inp, tmp_path / "out", "--shard-rows", "2") == 0
    out = Output(tmp_path / "out")
    counts = check_names(out)
    assert sum(counts) == 6 and max(counts) <= 2 and min(counts) >= 1, counts
    assert out.stats["num_rejected"] == 3


def test_max_shard_size(inp, tmp_path):
    manifest, images = inp
    limit_kib = 20
    largest = max(len(b) for b in images.values())
    assert largest < limit_kib * 1000  # each image fits alone
    assert convert(manifest, tmp_path / "out", "--max-shard-size", f"{limit_kib}KB") == 0
    out = Output(tmp_path / "out")
    counts = check_names(out)
    assert len(counts) >= 3, (
        f"{sum(len(b) for b in images.values())} bytes of images over {limit_kib}KB shards: {counts}"
    )
    assert sum(counts) == NUM_ROWS
    for f in out.shard_files:
        sizes = [
            len(b)
            for b in pq.read_table(f, columns=["image"])
            .column("image")
            .combine_chunks()
            .field("bytes")
            .to_pylist()
        ]
        # rolls over once the limit is reached: all but the last image fit under it
        assert sum(sizes[:-1]) < limit_kib * 1024, (f.name, sizes)
    assert [r["image_id"] for r in out.rows()] == [f"id_{i:02d}" for i in range(NUM_ROWS)]


def test_overwrite_leaves_no_stale_shards(inp, tmp_path):
    """A second run with fewer shards must not leave the first run's shards behind, or
    load_dataset(OUT) would read both."""
    manifest, _ = inp
    out = tmp_path / "out"
    assert convert(manifest, out, "--shard-rows", "3") == 0
    assert len(Output(out).shard_files) == 4
    assert convert(manifest, out, "--overwrite") == 0
    assert [p.name for p in Output(out).shard_files] == ["train-00000-of-00001.parquet"]
    assert len(Output(out).rows()) == NUM_ROWS

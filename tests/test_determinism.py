"""Identical input and options give byte-identical Parquet files, whatever the runner and the
worker count. Uses one Ray instance (2 CPUs) for the whole module."""

from __future__ import annotations

import hashlib

import imagegen
import pytest
from conftest import Output, convert, row, write_input

NUM_ROWS = 14
SHARD_ROWS = 4


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    images = {
        "rot6.jpg": imagegen.oriented(6),
        "rot7.png": imagegen.oriented(7, "PNG"),
        "plain.jpg": imagegen.jpeg(),
        "cmyk.jpg": imagegen.cmyk_jpeg(),
        "palette.png": imagegen.palette_png_with_transparency(),
        "noise.jpg": imagegen.noise_jpeg((96, 64), seed=3),
        "big.jpg": imagegen.jpeg((1500, 1000)),
    }
    names = sorted(images)
    rows = [
        row(f"id_{i:02d}", names[i % len(names)], barcode=str(1000 + i), note=f"n{i}")
        for i in range(NUM_ROWS)
    ]
    rows.insert(5, row("missing", "nope.jpg"))  # a reject in the middle shifts nothing
    return write_input(root / "in", rows, images)


def shard_hashes(out: Output) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.shard_files}


def run_any(inp, out, *extra, runner: str) -> Output:
    assert convert(inp, out, *extra, runner=runner) == 0
    return Output(out)


def run(inp, out, *extra, runner: str = "local") -> Output:
    code = convert(inp, out, "--shard-rows", str(SHARD_ROWS), *extra, runner=runner)
    assert code == 0
    o = Output(out)
    assert o.stats["num_written"] == NUM_ROWS
    return o


def test_local_runner_repeatable(inp, tmp_path):
    a = run(inp, tmp_path / "a", "--workers", "1")
    b = run(inp, tmp_path / "b", "--workers", "2")
    ha, hb = shard_hashes(a), shard_hashes(b)
    assert len(ha) >= 3, f"expected several shards with --shard-rows {SHARD_ROWS}: {sorted(ha)}"
    assert ha == hb
    assert (tmp_path / "a" / "rejects.jsonl").read_bytes() == (tmp_path / "b" / "rejects.jsonl").read_bytes()


@pytest.mark.ray
def test_ray_workers_and_local_give_identical_shards(inp, tmp_path, ray_instance):
    local = run(inp, tmp_path / "local")
    ray1 = run(inp, tmp_path / "ray1", "--workers", "1", runner="ray")
    ray2 = run(inp, tmp_path / "ray2", "--workers", "2", runner="ray")
    h_local, h1, h2 = shard_hashes(local), shard_hashes(ray1), shard_hashes(ray2)
    assert len(h1) >= 3, sorted(h1)
    assert h1 == h2, "shard bytes differ between --workers 1 and --workers 2"
    assert h1 == h_local, "shard bytes differ between the Ray and the local runner"
    rej = [(tmp_path / d / "rejects.jsonl").read_bytes() for d in ("local", "ray1", "ray2")]
    assert rej[0] == rej[1] == rej[2]
    assert [r["image_id"] for r in ray2.rows()] == [r["image_id"] for r in local.rows()]


@pytest.mark.ray
def test_embedded_ray_from_the_command_line(inp, tmp_path):
    """`python -m engine convert` with the default runner starts Ray itself (no --runner)."""
    import subprocess
    import sys

    from conftest import REPO

    local = run(inp, tmp_path / "local")
    out = tmp_path / "embedded"
    argv = [
        sys.executable,
        "-m",
        "engine",
        "convert",
        "--manifest",
        str(inp.manifest),
        "--config",
        str(inp.config),
    ]
    argv += ["--out", str(out), "--shard-rows", str(SHARD_ROWS), "--workers", "2", "--quiet"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert shard_hashes(Output(out)) == shard_hashes(local)


@pytest.mark.ray
def test_ray_duplicates_across_work_units(tmp_path, ray_instance):
    """With Ray and 2 workers, a duplicate far from its first occurrence (another work unit)
    is still rejected, and the first one is kept, exactly as with the local runner."""
    rows = [row(f"id_{i:03d}", "a.jpg", note=f"n{i}") for i in range(150)]
    rows.append(row("id_000", "a.jpg", note="late"))
    rows.insert(100, row("id_099", "a.jpg", note="early-dup"))
    inp = write_input(tmp_path / "in", rows, {"a.jpg": imagegen.jpeg((8, 8))})
    ray2 = run_any(inp, tmp_path / "ray2", "--workers", "2", "--shard-rows", "40", runner="ray")
    local = run_any(inp, tmp_path / "local", "--shard-rows", "40", runner="local")
    for out in (ray2, local):
        assert len(out.rows()) == 150
        assert out.by_id()["id_000"]["meta"]["note"] == "n0"
        assert out.by_id()["id_099"]["meta"]["note"] == "n99"
        assert [(r["line"], r["image_id"], r["stage"]) for r in out.rejects] == [
            (101, "id_099", "duplicate"),
            (152, "id_000", "duplicate"),
        ]
    assert shard_hashes(ray2) == shard_hashes(local)


@pytest.fixture(scope="module")
def big_rows(tmp_path_factory):
    """Noise JPEGs of about 570 KB: two of them fill a 1 MB page, so page cuts could
    follow the chunks of a row group's columns."""
    images = {f"n{i}.jpg": imagegen.noise_jpeg((900, 700), seed=i) for i in range(5)}
    rows = [row(f"id_{i:02d}", f"n{i % 5}.jpg") for i in range(NUM_ROWS)]
    return write_input(tmp_path_factory.mktemp("big") / "in", rows, images)


@pytest.mark.parametrize("layout", ["parquet", "arrow"])
def test_unit_size_does_not_change_the_bytes(big_rows, tmp_path, monkeypatch, layout):
    """Units of 3 and of 16 rows cut the part files' record batches differently, so each row
    group is assembled from differently chunked columns; the written files must not change.
    Arrow record batches are capped small here, so groups are cut into several of them too."""
    import engine.layouts.packed

    monkeypatch.setattr(
        engine.layouts.packed, "BATCH_BYTES", 2 * len(big_rows.root.joinpath("n0.jpg").read_bytes())
    )
    extra = ("--layout", layout, "--image-format", "keep", "--row-group-rows", "5", "--shard-rows", "8")
    a = run_any(big_rows, tmp_path / "u3", *extra, "--unit-rows", "3", runner="local")
    b = run_any(big_rows, tmp_path / "u16", *extra, "--unit-rows", "16", runner="local")
    files = {"parquet": lambda o: o.shard_files, "arrow": lambda o: sorted(o.root.glob("*.arrow"))}[layout]
    ha, hb = ({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files(o)} for o in (a, b))
    assert len(ha) == 2, sorted(ha)  # 14 rows, 8 per shard
    assert ha == hb
    if layout == "parquet":
        import pyarrow.parquet as pq

        groups = [pq.ParquetFile(p).metadata.num_row_groups for p in a.shard_files]
        assert groups == [2, 2], groups  # 8 rows -> 5 + 3, 6 rows -> 5 + 1
    else:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        for path in sorted(a.root.glob("*.arrow")):
            with pa.OSFile(str(path), "rb") as f:
                batches = [b.num_rows for b in ipc.open_stream(f)]
            assert len(batches) > 2 and max(batches) <= 2, batches  # groups of 5 in batches of 1-2 rows

"""Disk full, failing units, and hostile images that must end in rejects, never a crash."""

from __future__ import annotations

import os
import subprocess

import imagegen
import pytest
from conftest import Output, convert, parquet_hashes, row, write_input


def _images(n: int, size=(480, 360)) -> tuple[list, dict]:
    rows, images = [], {}
    for i in range(n):
        images[f"img/{i}.jpg"] = imagegen.noise_jpeg(size, seed=i)
        rows.append(row(f"id{i}", f"img/{i}.jpg"))
    return rows, images


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MB tmpfs (needs root, as CI has); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (not root?); the ENOSPC injection test covers the code path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_gives_one_line_then_resume_completes(small_fs, tmp_path, capsys):
    rows, images = _images(40)  # about 5 MB of output: more than the 2 MB filesystem
    inp = write_input(tmp_path / "in", rows, images)
    out = small_fs / "out"
    capsys.readouterr()
    code = convert(inp, out, "--max-size", "0", "--no-passthrough", "--unit-rows", "4")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0], err
    assert "Traceback" not in "\n".join(err)
    assert not (out / "stats.json").exists()
    # nothing half-written under a final name: every data file there is a complete Parquet file
    import pyarrow.parquet as pq

    for f in (out / "data").glob("*.parquet") if (out / "data").exists() else []:
        pq.read_metadata(f)
    # make room, then finish the run
    subprocess.run(["mount", "-o", "remount,size=64M", str(small_fs)], check=True)
    assert convert(inp, out, "--max-size", "0", "--no-passthrough", "--unit-rows", "4", "--resume") == 0
    clean = tmp_path / "clean"
    assert convert(inp, clean, "--max-size", "0", "--no-passthrough", "--unit-rows", "4") == 0
    assert parquet_hashes(out) == parquet_hashes(clean) and parquet_hashes(out)
    assert Output(out).stats["num_written"] == 40


def test_enospc_in_a_unit_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import errno

    from engine.sinks import parts

    rows, images = _images(6, size=(64, 48))
    inp = write_input(tmp_path / "in", rows, images)

    def full(self, sample):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/fake/part")

    monkeypatch.setattr(parts.PartWriter, "write", full)
    capsys.readouterr()
    assert convert(inp, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("engine: error: unit 0: No space left on device")


def test_hostile_images_end_in_rejects(tmp_path):
    hostile = {
        "zero.jpg": b"",
        "text.jpg": b"hello, I am not an image\n" * 10,
        "truncated.jpg": imagegen.truncated_jpeg(),
        "corrupt.jpg": imagegen.corrupt_jpeg(),
        "bomb.png": imagegen.bomb_png(),
    }
    rows = [row(name.split(".")[0], name) for name in hostile] + [row("good", "good.jpg")]
    inp = write_input(tmp_path / "in", rows, {**hostile, "good.jpg": imagegen.jpeg()})
    out = tmp_path / "out"
    assert convert(inp, out, "--max-pixels", "50000000") == 0
    o = Output(out)
    rejects = o.rejects_by_id()
    assert set(rejects) == {n.split(".")[0] for n in hostile}
    assert all(r["stage"] == "decode" for r in rejects.values()), rejects
    assert "pixel limit" in rejects["bomb"]["reason"]
    assert list(o.by_id()) == ["good"]
    assert o.stats["num_input_rows"] == len(hostile) + 1


def test_image_time_bound(tmp_path):
    rows, images = _images(2, size=(2000, 1500))
    inp = write_input(tmp_path / "in", rows, images)
    out = tmp_path / "out"
    assert convert(inp, out, "--image-timeout", "0.000001", "--no-passthrough") == 0
    rejects = Output(out).rejects
    assert [r["stage"] for r in rejects] == ["decode", "decode"]
    assert all("took longer than" in r["reason"] for r in rejects)


def test_a_shard_that_cannot_be_finished_is_one_clear_error(tmp_path, capsys, monkeypatch):
    """Shards written by the driver are fsynced and renamed in a background thread; a failure
    there must still stop the run with one line naming the shard, leave nothing under a final
    name and no temporary file behind, and a resumed run must finish the job."""
    import errno

    from engine.sinks import store

    rows, images = _images(12, size=(64, 48))
    inp = write_input(tmp_path / "in", rows, images)
    fsync = os.fsync
    failed: list[int] = []

    def failing_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".tmp") and "train-00001" in path:
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return fsync(fd)

    monkeypatch.setattr(store.os, "fsync", failing_fsync)
    out = tmp_path / "out"
    capsys.readouterr()
    assert convert(inp, out, "--shard-rows", "4", "--workers", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert failed
    assert len(err) == 1 and err[0].startswith(
        "engine: error: data/train-00001-of-00003.parquet: Input/output error"
    ), err
    assert "--resume" in err[0]
    assert not (out / "data" / "train-00001-of-00003.parquet").exists()
    assert not (out / "stats.json").exists()
    assert list((out / ".engine" / "tmp").glob("*train-00001*")) == []
    assert (
        list((out / ".engine" / "tmp").glob("*.parquet*")) == []
    )  # the other shards were finished, none dropped
    monkeypatch.setattr(store.os, "fsync", fsync)
    assert convert(inp, out, "--shard-rows", "4", "--workers", "1", "--resume") == 0
    assert Output(out).stats["num_written"] == 12
    assert len(list((out / "data").glob("*.parquet"))) == 3


def test_a_failing_row_group_write_stops_the_reader_and_is_one_line(tmp_path, capsys, monkeypatch):
    """The next row group is read in its own thread while one is written; when writing fails,
    that thread must stop (no hang), and the run ends with one line naming the shard."""
    import errno
    import threading

    import pyarrow.parquet as pq

    rows, images = _images(40, size=(64, 48))
    inp = write_input(tmp_path / "in", rows, images)
    write_table = pq.ParquetWriter.write_table
    calls: list[int] = []

    def failing(self, table, *args, **kwargs):
        calls.append(table.num_rows)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_table(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    out = tmp_path / "out"
    capsys.readouterr()
    assert convert(inp, out, "--row-group-rows", "5", "--workers", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 2
    assert len(err) == 1 and err[0].startswith(
        "engine: error: data/train-00000-of-00001.parquet: No space left"
    ), err
    assert not (out / "data" / "train-00000-of-00001.parquet").exists()
    assert list((out / ".engine" / "tmp").glob("*.parquet*")) == []
    assert not [t for t in threading.enumerate() if t.name == "engine-row-groups"]

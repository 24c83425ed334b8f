"""Crash and resume: SIGKILL the driver at seeded points, resume, and compare with a clean run;
kill a Ray worker mid-task and check nothing is lost or duplicated."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import imagegen
import pytest
from conftest import Output, row, run_main, write_input

NUM_IMAGES = 36
UNIT_ROWS = 2  # many small units, so kills land between and inside units


def _input(root: Path):
    images, rows = {}, []
    for i in range(NUM_IMAGES):
        # big enough to take real decode/encode time, rotated so every image is re-encoded
        images[f"img/{i}.jpg"] = imagegen.encode(
            imagegen.stored_for_orientation(imagegen.quadrant_image((900, 600)), 6), "JPEG", orientation=6
        )
        rows.append(row(f"id{i}", f"img/{i}.jpg", split="test" if i % 7 == 0 else None))
    rows.insert(5, "not json")
    rows.insert(11, row("id3", "img/3.jpg"))  # duplicate
    rows.insert(20, row("missing", "img/nope.jpg"))
    rows.insert(27, row("badout", "img/1.jpg", output={"price": "free"}))
    for r in rows:
        if isinstance(r, dict) and r.get("split") is None:
            r.pop("split", None)
    return write_input(root, rows, images)


def _args(inp, out: Path, layout: str, *extra: str) -> list[str]:
    return [
        "convert",
        "--manifest",
        str(inp.manifest),
        "--config",
        str(inp.config),
        "--out",
        str(out),
        "--layout",
        layout,
        "--runner",
        "local",
        "--unit-rows",
        str(UNIT_ROWS),
        "--quiet",
        "--max-size",
        "400",
        *extra,
    ]


def _data_hashes(out: Path) -> dict[str, str]:
    skip = {"stats.json", "README.md"}
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in skip and ".engine" not in p.parts
    }


def _engine(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "engine", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )


def _kill_after_units(argv: list[str], out: Path, units_done: int) -> bool:
    """Start the engine, SIGKILL it once `units_done` unit checkpoints exist. False if it finished first."""
    proc = _engine(argv)
    parts = out / ".engine" / "parts"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if parts.is_dir() and len(list(parts.glob("unit-*.json"))) >= units_done:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


@pytest.fixture(scope="module")
def crash_input(tmp_path_factory):
    return _input(tmp_path_factory.mktemp("crash-in"))


@pytest.fixture(scope="module")
def reference(crash_input, tmp_path_factory):
    refs = {}
    for layout in ("parquet", "arrow"):
        out = tmp_path_factory.mktemp(f"ref-{layout}") / "out"
        assert run_main(_args(crash_input, out, layout)) == 0
        refs[layout] = out
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parquet", "arrow"])
def test_sigkill_then_resume_matches_clean_run(crash_input, reference, tmp_path, layout):
    num_units = -(-(NUM_IMAGES + 4) // UNIT_ROWS)
    points = sorted(random.Random(f"seed-{layout}").sample(range(1, num_units), 3)) + [num_units]
    ref = reference[layout]
    for i, point in enumerate(points):
        out = tmp_path / f"out{i}"
        killed = _kill_after_units(_args(crash_input, out, layout), out, point)
        if killed and point < num_units:
            # nothing half-written under a final name: only complete shards, no temp files beside them
            assert not (out / "stats.json").exists()
            assert not [p for p in out.rglob("*.tmp") if ".engine" not in p.parts]
        proc = _engine(_args(crash_input, out, layout, "--resume"))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert _data_hashes(out) == _data_hashes(ref), f"kill after {point} units"
        stats, ref_stats = Output(out).stats, Output(ref).stats
        assert stats["num_input_rows"] == ref_stats["num_input_rows"] == NUM_IMAGES + 4
        assert stats["num_written"] == ref_stats["num_written"]
        assert stats["rejected_by_reason"] == ref_stats["rejected_by_reason"]
        assert not (out / ".engine").exists()


def test_resume_redoes_units_whose_files_came_back_short(crash_input, reference, tmp_path):
    """Part files and unit checkpoints are not fsynced, so after a power loss they may come back
    empty or short. Simulate that on a crashed run: a resumed run must redo those units, and the
    output must still equal a clean run's."""
    out = tmp_path / "out"
    assert _kill_after_units(_args(crash_input, out, "parquet"), out, 8)
    parts = out / ".engine" / "parts"
    checkpoints = sorted(parts.glob("unit-*.json"))
    assert len(checkpoints) >= 6
    short_part = checkpoints[1].with_suffix(".arrow")
    short_part.write_bytes(short_part.read_bytes()[: short_part.stat().st_size // 2])
    checkpoints[3].write_bytes(b"")  # a torn checkpoint
    rejects = sorted(parts.glob("unit-*.rejects.jsonl"))
    assert rejects, "the crash input has rejected rows in the first units"
    rejects[0].write_bytes(rejects[0].read_bytes()[:-5])
    proc = _engine(_args(crash_input, out, "parquet", "--resume"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert _data_hashes(out) == _data_hashes(reference["parquet"])
    ref_stats = Output(reference["parquet"]).stats
    assert Output(out).stats["rejected_by_reason"] == ref_stats["rejected_by_reason"]
    assert Output(out).rejects == Output(reference["parquet"]).rejects


def test_resume_with_other_options_is_refused(crash_input, tmp_path, capsys):
    out = tmp_path / "out"
    assert _kill_after_units(_args(crash_input, out, "parquet"), out, 2)
    capsys.readouterr()
    assert run_main(_args(crash_input, out, "parquet", "--resume", "--quality", "50")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image.quality" in err[0] and "cannot resume" in err[0]
    # the interrupted run's work is still there and can be finished with the original options
    assert run_main(_args(crash_input, out, "parquet", "--resume")) == 0
    assert Output(out).stats["num_input_rows"] == NUM_IMAGES + 4


def test_resume_of_a_changed_manifest_is_refused(crash_input, tmp_path, capsys):
    out = tmp_path / "out"
    assert _kill_after_units(_args(crash_input, out, "parquet"), out, 2)
    changed = write_input(tmp_path / "in2", [row("x", str(crash_input.root / "img/0.jpg"))])
    capsys.readouterr()
    argv = _args(changed, out, "parquet", "--resume")
    argv[argv.index("--config") + 1] = str(crash_input.config)
    assert run_main(argv) == 2
    assert "manifest_sha256" in capsys.readouterr().err


def test_resume_of_a_finished_output_does_nothing(crash_input, reference, tmp_path, capsys):
    out = reference["parquet"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    argv = [a for a in _args(crash_input, out, "parquet", "--resume") if a != "--quiet"]
    assert run_main(argv) == 0
    assert "nothing to resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_resume_of_a_finished_output_with_other_options_is_refused(crash_input, reference, tmp_path, capsys):
    """The old dataset must never pass for the one asked for: differences are named, exit 2."""
    out = reference["parquet"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert (
        run_main(_args(crash_input, out, "parquet", "--resume", "--quality", "50", "--max-size", "300")) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0], err
    assert "image.quality" in err[0] and "image.max_size" in err[0], err
    other = write_input(
        tmp_path / "in2",
        [row("x", str(crash_input.root / "img/0.jpg"))],
        config={"instructions": "Something else", "json_schema": {"type": "object"}},
    )
    argv = _args(crash_input, out, "parquet", "--resume")
    argv[argv.index("--config") + 1] = str(other.config)
    assert run_main(argv) == 2
    assert "config_sha256" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # what only changes how the run goes (workers, timeouts) is no difference
    assert (
        run_main(_args(crash_input, out, "parquet", "--resume", "--workers", "1", "--http-timeout", "5")) == 0
    )


def test_resume_of_a_finished_output_from_an_older_engine(crash_input, reference, tmp_path, capsys):
    """stats.json without a fingerprint: its resolved options are compared, and an option the
    older engine did not have counts as a difference."""
    out = tmp_path / "old"
    shutil.copytree(reference["parquet"], out)
    stats = json.loads((out / "stats.json").read_text())
    del stats["fingerprint"]
    (out / "stats.json").write_text(json.dumps(stats))
    assert run_main(_args(crash_input, out, "parquet", "--resume")) == 0
    assert run_main(_args(crash_input, out, "parquet", "--resume", "--quality", "50")) == 2
    assert "image.quality" in capsys.readouterr().err
    del stats["options"]["attachment_position"]
    (out / "stats.json").write_text(json.dumps(stats))
    assert run_main(_args(crash_input, out, "parquet", "--resume")) == 2
    assert "options.attachment_position" in capsys.readouterr().err


def test_resume_of_a_foreign_folder_is_refused(crash_input, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert run_main(_args(crash_input, out, "parquet", "--resume")) == 2
    assert (out / "precious.txt").read_text() == "keep me"
    assert run_main(_args(crash_input, out, "parquet", "--resume", "--overwrite")) == 2


def _ray_worker_pids() -> set[int]:
    pids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::_call"):  # a Ray worker while it runs one of the engine's tasks
                pids.add(int(pid))
    return pids


@pytest.mark.ray
@pytest.mark.slow
def test_worker_killed_mid_task_is_retried(ray_instance, crash_input, reference, tmp_path):
    out = tmp_path / "out"
    argv = _args(crash_input, out, "parquet")
    argv[argv.index("--runner") + 1] = "ray"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", run_main(argv)))
    thread.start()
    killed = []
    deadline = time.monotonic() + 120
    while thread.is_alive() and not killed and time.monotonic() < deadline:
        for pid in _ray_worker_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            break
        time.sleep(0.005)
    thread.join(timeout=300)
    assert killed, "no Ray worker was seen running an engine task"
    assert result.get("code") == 0
    assert _data_hashes(out) == _data_hashes(reference["parquet"])
    assert Output(out).stats["num_input_rows"] == NUM_IMAGES + 4

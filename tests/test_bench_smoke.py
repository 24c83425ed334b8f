"""The benchmark harness at a tiny N, as a smoke test: it runs the engine and the limit probes,
checks their outputs, and writes the JSON results and RESULTS.md. No time is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import REPO

from bench.corpora import build_corpus
from bench.tools import SCENARIOS, tool_command
from bench.verify import check_output


def test_bench_run_smoke(tmp_path):
    results = tmp_path / "results"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--n",
        "6",
        "--rows",
        "9",
        "--repeats",
        "1",
        "--scenarios",
        "small-passthrough",
        "--peers",
        "limit-write",
        "--workdir",
        str(tmp_path / "work"),
        "--results",
        str(results),
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in results.glob("*.json"))
    assert len(files) == 1 and files[0].endswith("-small-passthrough-rows9.json"), files
    doc = json.loads((results / files[0]).read_text())
    assert doc["rows"] == 9 and doc["cycled"] is True and doc["n"] == 6
    for tool in ("engine", "limit", "limit-write"):
        summary = doc["tools"][tool]
        assert summary["status"] == "ok", summary
        run = summary["runs"][0]
        assert run["valid"] and run["check"]["num_rows"] == 9, run
    assert doc["tools"]["engine"]["runs"][0]["engine_stats"]["num_written"] == 9
    assert {"engine/limit", "engine/limit-write"} <= set(doc["ratios"])
    assert {"cores", "cpu_model", "pillow_simd"} <= set(doc["machine"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "Longer jobs" in md and "small-passthrough | 9 |" in md


def test_limit_write_counts_only_when_its_bytes_are_on_disk(tmp_path):
    corpus = build_corpus("small", 3, tmp_path / "work")
    out = tmp_path / "out"
    command = tool_command("limit-write", SCENARIOS["small-passthrough"], corpus, out, workers=2)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted((out / "written").iterdir())
    on_disk = b"".join(p.read_bytes() for p in written)
    assert len(on_disk) == corpus.input_bytes, written
    check = check_output(out, corpus)
    assert check.valid and check.num_rows == 3, check
    with open(written[0], "r+b") as f:  # a probe that skipped part of its writes
        f.truncate(written[0].stat().st_size - 1)
    check = check_output(out, corpus)
    assert not check.valid and "written/" in check.problems[0], check
    shutil.rmtree(out / "written")
    assert not check_output(out, corpus).valid


def test_engine_packed_output_is_checked_for_upright_images(tmp_path):
    """The packed raw-image rows carry no file name: the check finds their ids by line order."""
    corpus = build_corpus("small", 6, tmp_path / "work")
    out = tmp_path / "out"
    command = tool_command("engine", SCENARIOS["small-passthrough"], corpus, out, workers=1)
    command[command.index("--layout") + 1] = "arrow"
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = check_output(out, corpus)
    assert check.valid and check.num_rows == corpus.num_valid, check
    assert check.num_upright_known == check.num_sampled > 0, check
    assert check.num_upright == check.num_upright_known, check


def test_bench_update_smoke(tmp_path):
    results = tmp_path / "results"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "update",
        "--sizes",
        "12",
        "--base-images",
        "4",
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--results",
        str(results),
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = results.glob("*-update.json")
    point = json.loads(path.read_text())["points"][0]
    assert point["status"] == "ok" and point["num_rows"] == 12, point
    assert {"speed_vs_cp", "speed_vs_rewrite", "max_peak_rss_mb"} <= set(point)
    # every new output was applied (the outputs pass the corpus's schema), and the shards spliced
    assert [u["counts"]["outputs_applied"] for u in point["update"]] == [2]
    assert point["shards_spliced"] >= 1 and point["shards_rewritten"] == 0
    assert "load average" in point["uptime_before"]
    assert "## Update: an outputs-only" in (tmp_path / "RESULTS.md").read_text()

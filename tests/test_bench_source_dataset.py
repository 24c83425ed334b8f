"""``python -m bench dataset`` at a tiny N, as a smoke test: every case converts, the JSON result
and its RESULTS.md section are written. No time is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_bench_dataset_smoke(tmp_path):
    results = tmp_path / "results"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "dataset",
        "--n",
        "6",
        "--repeats",
        "1",
        "--memory-factor",
        "2",
        "--base-images",
        "4",
        "--workers",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--results",
        str(results),
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = results.glob("*-source-dataset.json")
    doc = json.loads(path.read_text())
    assert doc["kind"] == "source" and doc["source"] == "dataset"
    for case in ("jsonl", "dataset", "imagefolder"):
        [run] = doc["runs"][case]
        assert run["returncode"] == 0 and run["num_written"] == 6, run
    assert [m["num_rows"] for m in doc["memory"]] == [6, 12] and all(
        m["returncode"] == 0 for m in doc["memory"]
    )
    from bench.report import write_results_md

    md = write_results_md(results).read_text()
    assert "Sources: existing datasets and image folders" in md and "| dataset |" in md

"""The benchmark harness at a tiny N, as a smoke test: it runs the engine and the limit probe,
checks their outputs, and writes the JSON results and RESULTS.md. No time is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_bench_run_smoke(tmp_path):
    results = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "run", "--n", "6", "--rows", "9", "--repeats", "1",
            "--scenarios", "small-passthrough", "--peers", "none",
            "--workdir", str(tmp_path / "work"), "--results", str(results)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in results.glob("*.json"))
    assert len(files) == 1 and files[0].endswith("-small-passthrough-rows9.json"), files
    doc = json.loads((results / files[0]).read_text())
    assert doc["rows"] == 9 and doc["cycled"] is True and doc["n"] == 6
    for tool in ("engine", "limit"):
        summary = doc["tools"][tool]
        assert summary["status"] == "ok", summary
        run = summary["runs"][0]
        assert run["valid"] and run["check"]["num_rows"] == 9, run
    assert doc["tools"]["engine"]["runs"][0]["engine_stats"]["num_written"] == 9
    assert "engine/limit" in doc["ratios"]
    assert {"cores", "cpu_model", "pillow_simd"} <= set(doc["machine"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "Longer jobs" in md and "small-passthrough | 9 |" in md

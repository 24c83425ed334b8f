"""``python -m bench inspect`` at a tiny size, as a smoke test: it builds the pass-through
datasets, runs every mode, and writes the JSON result and RESULTS.md's section. No time is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_bench_inspect_smoke(tmp_path):
    results = tmp_path / "results"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "inspect",
        "--sizes",
        "6,12",
        "--decode-rows",
        "6",
        "--base-images",
        "3",
        "--repeats",
        "1",
        "--distinct",
        "5",
        "--workdir",
        str(tmp_path / "work"),
        "--results",
        str(results),
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = results.glob("*-inspect.json")
    doc = json.loads(path.read_text())
    small, large, distinct = doc["points"]
    assert list(small["modes"]) == ["pyarrow-read", "inspect-no-decode", "inspect-no-phash", "inspect-full"]
    assert list(large["modes"]) == ["pyarrow-read", "inspect-no-decode"]
    assert (distinct["corpus"], distinct["num_rows"]) == ("distinct", 5)
    # 3 base images cycled: each distinct content decoded once; 5 distinct pictures: all 5
    assert small["modes"]["inspect-full"]["decoded"] == small["modes"]["inspect-full"]["distinct"] == 3
    assert set(small["ms_per_image"]) == {"header", "decode-pixel-hash", "phash"}
    assert distinct["modes"]["inspect-no-phash"]["decoded"] == 5
    for point, rows in ((small, 6), (large, 12), (distinct, 5)):
        for mode in point["modes"].values():
            assert mode["status"] == "ok" and mode["rows"] == rows and mode["peak_rss_bytes"] > 0, mode
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Inspect: `engine inspect` against reading the Parquet files with pyarrow" in md
    assert "| 12 |" in md and "inspect-full" in md

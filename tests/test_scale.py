"""Driver memory does not grow with the manifest: planning (byte ranges, duplicate ids via polars)
of a 1M-row manifest against a 100k-row one, peak RSS measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, resource, sys
from engine.sources.manifest import plan_manifest
plan = plan_manifest(sys.argv[1], 16).coalesce(256)
print(json.dumps({"rows": plan.num_rows, "units": len(plan.units), "dups": plan.num_duplicates,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _manifest(path: Path, rows: int) -> Path:
    line = (
        '{{"image_id": "{i:013d}_1", "image_path": "img/{m}.jpg", '
        '"output": {{"price": 1.5}}, "barcode": "{i:013d}"}}\n'
    )
    with open(path, "w") as f:
        for start in range(0, rows, 100_000):
            f.write(
                "".join(
                    line.format(i=i % (rows - 10), m=i % 500)
                    for i in range(start, min(rows, start + 100_000))
                )
            )
    return path


def _plan(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout)


@pytest.mark.slow
def test_planning_a_million_rows_keeps_memory_flat(tmp_path):
    small = _plan(_manifest(tmp_path / "100k.jsonl", 100_000))
    big = _plan(_manifest(tmp_path / "1m.jsonl", 1_000_000))
    assert small["rows"] == 100_000 and big["rows"] == 1_000_000
    assert small["dups"] == 10 and big["dups"] == 10  # the last 10 ids repeat the first 10
    grains = (
        1_000_000 // 16
    )  # planned in 16-row grains; the first unit stays one grain, the rest 16 grains each
    assert big["units"] == 1 + -(-(grains - 1) // 16)
    growth_mb = (big["peak_kb"] - small["peak_kb"]) / 1024
    # 900k more rows (about 90 MB more manifest) may cost tens of MB (ids in polars, one small
    # descriptor per 16 rows), never a Python object per row (that would be several hundred MB)
    assert growth_mb < 120, (small, big)

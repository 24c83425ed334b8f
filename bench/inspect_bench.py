"""``python -m bench inspect``: ``engine inspect`` against reading the same Parquet files with
pyarrow, on the pass-through dataset of the ``small`` corpus (1024 px JPEGs, cycled to N rows),
and on one of the ``distinct`` corpus (every image a different picture, so every one is decoded).

Each mode runs in its own process (peak RSS of that process tree, from ``bench.measure``); the
seconds compared are the scan itself, timed inside the process, so interpreter start-up and
imports are reported apart (``wall_seconds``)."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

from bench import report
from bench.corpora import build_corpus, repeated_manifest, warm_page_cache
from bench.measure import run_measured
from bench.tools import PYTHON, engine_command

log = logging.getLogger(__name__)

# what each mode runs in its child process; prints {"seconds": scan time}
PYARROW_READ = """
import json, sys, time, glob, pyarrow.parquet as pq
t = time.perf_counter()
rows = 0
for path in sorted(glob.glob(sys.argv[1] + "/data/*.parquet")):
    f = pq.ParquetFile(path)
    for i in range(f.num_row_groups):
        rows += f.read_row_group(i).num_rows
print(json.dumps({"seconds": time.perf_counter() - t, "rows": rows}))
"""
INSPECT = """
import json, sys, time
from engine.inspect.report import inspect_dataset
import engine.validate, imagehash, jsonschema, fsspec  # imports are start-up, not scan
decode, phash = sys.argv[2] != "no-decode", sys.argv[2] == "full"
t = time.perf_counter()
insp = inspect_dataset(sys.argv[1], decode=decode, phash=phash, samples=12)
print(json.dumps({"seconds": time.perf_counter() - t, "rows": insp.summary.num_rows,
                  "distinct": insp.result.num_distinct, "decoded": insp.result.num_decoded}))
"""
# per-image costs, interleaved in one process (min of 7 passes over the same images), so that the
# perceptual hash's share does not drown in the noise of whole runs on a shared machine
COSTS = """
import glob, io, json, sys, time
import pyarrow.parquet as pq
from PIL import Image
from engine.inspect.scan import analyse_image, perceptual_hash
path = sorted(glob.glob(sys.argv[1] + "/data/*.parquet"))[0]
blobs = pq.ParquetFile(path).read_row_group(0, columns=["image"])\
.column("image").combine_chunks().field("bytes")
blobs = [b.as_py() for b in blobs][:40]
decoded = [Image.open(io.BytesIO(b)) for b in blobs]
for im in decoded:
    im.load()
steps = {"header": lambda i: analyse_image(blobs[i], decode=False, phash=False),
         "decode-pixel-hash": lambda i: analyse_image(blobs[i], decode=True, phash=False),
         "phash": lambda i: perceptual_hash(decoded[i])}
best = dict.fromkeys(steps, 1e9)
for _ in range(7):
    for label, step in steps.items():
        t = time.perf_counter()
        for i in range(len(blobs)):
            step(i)
        best[label] = min(best[label], (time.perf_counter() - t) / len(blobs) * 1e3)
print(json.dumps({"seconds": 0, "rows": len(blobs), "ms_per_image": best}))
"""
MODES = {
    "pyarrow-read": (PYARROW_READ, None),
    "inspect-no-decode": (INSPECT, "no-decode"),
    "inspect-no-phash": (INSPECT, "no-phash"),
    "inspect-full": (INSPECT, "full"),
}


def _dataset(workdir: Path, base_images: int, rows: int, workers: int, corpus_name: str = "small") -> Path:
    corpus = build_corpus(corpus_name, base_images, workdir)
    folder = workdir / "inspect" / f"{corpus_name}-{base_images}-rows{rows}"
    out = folder / "out"
    if (out / "stats.json").exists():
        return out
    manifest = repeated_manifest(corpus, rows, folder)
    warm_page_cache(corpus)
    cmd = engine_command(
        manifest=manifest,
        config=folder / "config.json",
        out=out,
        layout="parquet",
        mode="passthrough",
        workers=workers,
    )
    subprocess.run(cmd, check=True)
    return out


def _warm(out: Path) -> None:
    for path in sorted((out / "data").glob("*.parquet")):
        path.read_bytes()


def _run_once(mode: str, out: Path, log_path: Path, timeout: float) -> dict:
    script, arg = MODES[mode]
    _warm(out)
    m = run_measured(
        [PYTHON, "-c", script, str(out)] + ([arg] if arg else []), log_path=log_path, timeout=timeout
    )
    if m.returncode != 0:
        return {"status": f"failed: {m.stderr_tail[-300:]}"}
    inner = json.loads(log_path.read_text().strip().splitlines()[-1])
    return {
        "status": "ok",
        "seconds": inner["seconds"],
        "rows": inner["rows"],
        "distinct": inner.get("distinct"),
        "decoded": inner.get("decoded"),
        "wall_seconds": m.wall_seconds,
        "peak_rss_bytes": m.peak_rss_bytes,
        "cpu_seconds": m.cpu_seconds,
    }


def _summary(runs: list[dict]) -> dict:
    failed = next((r for r in runs if r["status"] != "ok"), None)
    if failed:
        return failed
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {
        "status": "ok",
        "runs": runs,
        "seconds": med("seconds"),
        "wall_seconds": med("wall_seconds"),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "rows": runs[0]["rows"],
        "distinct": runs[0].get("distinct"),
        "decoded": runs[0].get("decoded"),
        "rows_per_second": runs[0]["rows"] / med("seconds"),
    }


def run_inspect(
    *,
    sizes: list[int],
    decode_rows: int,
    base_images: int,
    workdir: Path,
    results_dir: Path,
    repeats: int,
    workers: int,
    command: str,
    timeout: float = 3600,
    distinct: int = 0,
) -> Path:
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    points = []
    datasets = [("small", base_images, size) for size in sizes]
    if distinct:
        datasets.append(("distinct", distinct, distinct))
    costs_done = False
    for corpus_name, images, size in datasets:
        out = _dataset(workdir, images, size, workers, corpus_name)
        run_dir = workdir / "runs" / "inspect" / f"{corpus_name}-{images}-rows{size}"
        point = {
            "corpus": corpus_name,
            "base_images": images,
            "num_rows": size,
            "dataset_bytes": sum(p.stat().st_size for p in (out / "data").glob("*.parquet")),
            "modes": {},
        }
        # the modes alternate, run after run, so all see the same load; each ratio is taken
        # within one round, and the median round's ratio is reported
        modes = list(MODES) if size <= decode_rows else ["pyarrow-read", "inspect-no-decode"]
        rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
        for i in range(repeats):
            for mode, runs in rounds.items():
                log.info("inspect bench: %s on %s (%d/%d)", mode, run_dir.name, i + 1, repeats)
                runs.append(_run_once(mode, out, run_dir / f"{mode}-{i}.log", timeout))
        point["modes"] = {mode: _summary(runs) for mode, runs in rounds.items()}
        for mode, runs in rounds.items():
            if all(r["status"] == "ok" for r in runs + rounds["pyarrow-read"]):
                point["modes"][mode]["speed_vs_pyarrow_read"] = statistics.median(
                    a["seconds"] / b["seconds"] for a, b in zip(rounds["pyarrow-read"], runs)
                )
        if size <= decode_rows and not costs_done:
            m = run_measured([PYTHON, "-c", COSTS, str(out)], log_path=run_dir / "costs.log", timeout=timeout)
            if m.returncode == 0:
                costs_done = True
                point["ms_per_image"] = json.loads(
                    (run_dir / "costs.log").read_text().strip().splitlines()[-1]
                )["ms_per_image"]
        points.append(point)
    result = {
        "kind": "inspect",
        "date": report.today(),
        "command": command,
        "base_images": base_images,
        "machine": report.machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "points": points,
    }
    path = report.write_json(results_dir, f"{report.today()}-inspect", result)
    report.write_results_md(results_dir)
    return path


def inspect_section(result: dict) -> list[str]:
    """RESULTS.md's section for the newest ``inspect`` result."""
    lines = [
        f"## Inspect: `engine inspect` against reading the Parquet files with pyarrow ({result['_file']})",
        "",
        f"Command: `{result['command']}`. Pass-through Parquet of the `small` corpus "
        f"({result['base_images']} 1024 px JPEGs cycled to N rows: {result['base_images']} distinct stored "
        "images, each decoded once however many rows repeat it), and of the `distinct` corpus where "
        "given (every row a different 1024x768 picture: the decode-bound case). Seconds are the scan "
        "inside the process (median of the repeats), start-up excluded; wall includes the interpreter "
        "and imports. The modes alternate run after run, and each ratio is the median of the rounds' "
        "ratios. Load average before/after: "
        f"{' '.join(result['loadavg_before'])} / {' '.join(result['loadavg_after'])} (a shared machine).",
        "",
        "| corpus | rows | dataset | mode | decoded | scan s | rows/s | speed vs pyarrow read | wall s "
        "| peak RSS |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        corpus = f"{p.get('corpus', 'small')}-{p.get('base_images', result['base_images'])}"
        for mode, m in p["modes"].items():
            if m.get("status") != "ok":
                lines.append(f"| {corpus} | {p['num_rows']:,} | | {mode} | | {m.get('status')} | | | | |")
                continue
            ratio = m.get("speed_vs_pyarrow_read")
            decoded = (
                f"{m['decoded']:,} of {m['distinct']:,}"
                if m.get("distinct") is not None and mode != "inspect-no-decode"
                else ""
            )
            lines.append(
                f"| {corpus} | {p['num_rows']:,} | {p['dataset_bytes'] / 1e6:,.0f} MB | {mode} | {decoded} | "
                f"{m['seconds']:.2f} | {m['rows_per_second']:,.0f} | "
                f"{'' if ratio is None else f'{ratio:.2f}×'} | "
                f"{m['wall_seconds']:.2f} | {m['peak_rss_bytes'] / 1e6:,.0f} MB |"
            )
    costs = next((p["ms_per_image"] for p in reversed(result["points"]) if p.get("ms_per_image")), None)
    if costs:
        lines += [
            "",
            "Per image, one thread, best of 7 interleaved passes over 40 images: header and byte hash "
            f"{costs['header']:.3f} ms; decode and pixel hash {costs['decode-pixel-hash']:.2f} ms; "
            f"**the perceptual hash {costs['phash']:.2f} ms** on the decoded image it shares with the pixel "
            "hash.",
        ]
    lines += [
        "",
        "`inspect-no-decode` reads sizes from the image headers and hashes the stored bytes. "
        "`inspect-no-phash` hashes the stored bytes and headers in a first pass, then decodes only the "
        "distinct images whose size another distinct image shares and merges byte groups whose pixels "
        "agree; `inspect-full` (the default) decodes every distinct image once for the perceptual hash. "
        "*decoded* is distinct images decoded of distinct images stored. The `small` corpus has 300 "
        "distinct stored images in two sizes, so both decoding modes decode all 300 there, once each.",
        "",
    ]
    return lines


if __name__ == "__main__":
    sys.exit("run it as: python -m bench inspect")

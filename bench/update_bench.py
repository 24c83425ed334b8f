"""``python -m bench update``: an outputs-only ``engine update`` of a pass-through Parquet dataset
against ``cp -r`` of the same dataset on the same disk, and the update's peak RSS, at a few sizes.

For each size: convert a pass-through dataset (repeated ``small`` images, not measured), then,
``--repeats`` times, alternately ``cp -r`` it to a scratch folder and update it in place with a
new outputs file (every 10th row; a different file each time, so no run is a no-op). Both read
the same files from the page cache; the update also writes and fsyncs the new shards. A third
command, ``rewrite``, is the floor of any update that rewrites the shards: pyarrow reading every
shard and writing it again with the engine's Parquet settings (content-defined chunking, page
index, zstd), fsynced, with no planning, validation or commit."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from bench import report
from bench.corpora import build_corpus, repeated_manifest
from bench.measure import run_measured
from bench.tools import PYTHON, REPO_ROOT, engine_command

log = logging.getLogger(__name__)
MB = 2**20


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _outputs_file(manifest: Path, path: Path, repeat: int) -> Path:
    """New outputs for every 10th row, valid under the corpus's schema (a new price)."""
    with open(manifest) as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            if i % 10 == 0:
                doc = json.loads(line)
                output = dict(doc["output"], price=round(repeat + i / 100, 2))
                dst.write(json.dumps({"image_id": doc["image_id"], "output": output}) + "\n")
    return path


def rewrite(src: Path, dst: Path) -> None:
    """Read each shard of ``src`` and write it to ``dst`` with the engine's Parquet settings."""
    for shard in sorted((src / "data").glob("*.parquet")):
        f = pq.ParquetFile(shard)
        names = [c.path for c in f.schema]
        compression = {c: "zstd" for c in names}
        compression["image.bytes"] = "none"
        meta = [c for c in names if c.startswith("meta.")]
        target = dst / "data" / shard.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(
            target,
            f.schema_arrow,
            compression=compression,
            use_dictionary=meta,
            write_statistics=[c for c in names if c not in ("image.bytes", "image.path")],
            write_page_index=True,
            use_content_defined_chunking=True,
        ) as writer:
            for g in range(f.num_row_groups):
                writer.write_table(f.read_row_group(g))
        with open(target, "rb") as done:
            os.fsync(done.fileno())


def run_update_bench(
    *,
    sizes: list[int],
    workdir: Path,
    results_dir: Path,
    workers: int,
    command: str,
    base_images: int = 300,
    repeats: int = 2,
    timeout: float = 3600,
) -> Path:
    corpus = build_corpus("small", base_images, workdir)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    points = []
    for size in sizes:
        manifest_dir = workdir / "update" / f"manifest-{size}"
        manifest = repeated_manifest(corpus, size, manifest_dir)
        run_dir = workdir / "runs" / "update" / str(size)
        dataset, copy = run_dir / "dataset", run_dir / "copy"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        made = subprocess.run(
            engine_command(
                manifest=manifest,
                config=manifest_dir / "config.json",
                out=dataset,
                layout="parquet",
                mode="passthrough",
                workers=workers,
            ),
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if made.returncode != 0:
            points.append({"num_rows": size, "status": f"convert failed: {made.stderr[-500:]}"})
            continue
        point: dict = {
            "num_rows": size,
            "dataset_bytes": _folder_bytes(dataset),
            "cp": [],
            "update": [],
            "uptime_before": _uptime(),
        }
        for repeat in range(repeats):
            shutil.rmtree(copy, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            cp = run_measured(
                ["cp", "-r", str(dataset), str(copy)], timeout=timeout, log_path=run_dir / "cp.log"
            )
            point["cp"].append(
                {
                    "seconds": cp.wall_seconds,
                    "peak_rss_mb": cp.peak_rss_bytes / MB,
                    "returncode": cp.returncode,
                }
            )
            shutil.rmtree(copy, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            # the copy on disk, as the update leaves its files (fsynced)
            cps = run_measured(
                ["sh", "-c", f"cp -r '{dataset}' '{copy}' && sync"],
                timeout=timeout,
                log_path=run_dir / "cp-sync.log",
            )
            point.setdefault("cp_sync", []).append(
                {"seconds": cps.wall_seconds, "returncode": cps.returncode}
            )
            shutil.rmtree(copy, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            rw = run_measured(
                [PYTHON, "-m", "bench.update_bench", "rewrite", str(dataset), str(copy)],
                cwd=REPO_ROOT,
                env=env,
                timeout=timeout,
                log_path=run_dir / "rewrite.log",
            )
            point.setdefault("rewrite", []).append(
                {
                    "seconds": rw.wall_seconds,
                    "peak_rss_mb": rw.peak_rss_bytes / MB,
                    "returncode": rw.returncode,
                }
            )
            shutil.rmtree(copy, ignore_errors=True)
            updates = _outputs_file(manifest, run_dir / f"outputs-{repeat}.jsonl", repeat)
            subprocess.run(["sync"], check=False)
            m = run_measured(
                [PYTHON, "-m", "engine", "update", str(dataset), "--outputs", str(updates), "--quiet"],
                cwd=REPO_ROOT,
                env=env,
                timeout=timeout,
                log_path=run_dir / f"update-{repeat}.log",
            )
            counts = (
                json.loads((dataset / "stats.json").read_text())["updates"][-1]["counts"]
                if m.returncode == 0
                else {}
            )
            point["update"].append(
                {
                    "seconds": m.wall_seconds,
                    "peak_rss_mb": m.peak_rss_bytes / MB,
                    "cpu_util": m.cpu_util,
                    "returncode": m.returncode,
                    "stderr_tail": m.stderr_tail[-500:] if m.returncode else "",
                    # what the update did: outputs applied, shards spliced or rewritten
                    "counts": {
                        k: counts.get(k, 0) for k in ("outputs_applied", "shards_spliced", "shards_rewritten")
                    },
                }
            )
            log.info(
                "%d rows: cp -r %.2f s, rewrite %.2f s, update %.2f s (rss %.0f MB)",
                size,
                cp.wall_seconds,
                rw.wall_seconds,
                m.wall_seconds,
                m.peak_rss_bytes / MB,
            )
        applied = (size + 9) // 10  # every 10th row gets a new output
        ok = [
            u for u in point["update"] if u["returncode"] == 0 and u["counts"]["outputs_applied"] == applied
        ]
        point["status"] = "ok" if len(ok) == repeats else "failed"
        if ok:
            cp_s = statistics.median(c["seconds"] for c in point["cp"])
            up_s = statistics.median(u["seconds"] for u in ok)
            rw_s = statistics.median(r["seconds"] for r in point["rewrite"])
            point["median_cp_sync_seconds"] = statistics.median(r["seconds"] for r in point["cp_sync"])
            point["speed_vs_cp_sync"] = point["median_cp_sync_seconds"] / up_s
            point.update(
                {
                    "median_cp_seconds": cp_s,
                    "median_update_seconds": up_s,
                    "median_rewrite_seconds": rw_s,
                    "speed_vs_cp": cp_s / up_s,
                    "speed_vs_rewrite": rw_s / up_s,
                    "max_peak_rss_mb": max(u["peak_rss_mb"] for u in ok),
                    "shards_spliced": ok[-1]["counts"]["shards_spliced"],
                    "shards_rewritten": ok[-1]["counts"]["shards_rewritten"],
                }
            )
        point["uptime_after"] = _uptime()
        points.append(point)
        shutil.rmtree(run_dir, ignore_errors=True)  # the next size needs the disk
    result = {
        "kind": "update",
        "date": report.today(),
        "command": command,
        "workers": workers,
        "base_images": base_images,
        "repeats": repeats,
        "machine": report.machine_info(),
        "corpus": corpus.summary(),
        "points": points,
    }
    path = report.write_json(results_dir, f"{report.today()}-update", result)
    report.write_results_md(results_dir)
    return path


def _spliced(point: dict) -> str:
    if "shards_spliced" not in point:
        return ""
    return f"{point['shards_spliced']}/{point['shards_spliced'] + point['shards_rewritten']}"


def update_section(result: dict) -> list[str]:
    """The RESULTS.md section of the newest ``update`` result."""
    lines = [
        f"## Update: an outputs-only `engine update` against `cp -r` of the dataset ({result['_file']})",
        "",
        f"Command: `{result['command']}`. A pass-through Parquet dataset of repeated `small` images "
        f"(1024 px JPEGs, bytes kept); every 10th row gets a new output; median of {result['repeats']} "
        "runs, alternating with `cp -r` of the same folder on the same disk, and with `rewrite`: "
        "pyarrow reading every shard and writing it again with the engine's Parquet settings "
        "(content-defined chunking, page index), fsynced, the floor of any update that rewrites the "
        "shards. `cp -r; sync` is the copy on disk, as the update leaves its files. `vs X` is X's time "
        "over the update's (1.0: as fast as X).",
        "",
        "What the update does: it reads the rows' byte sizes (the image sizes from their length "
        "prefixes, not their bytes), cuts the shards exactly as `convert` would, and splices every "
        "shard whose row groups are whole old row groups: the old column chunks copied as they are "
        "(`copy_file_range`), the `output` chunks from a small file of that column alone, the page "
        "index and footer recomputed (`spliced` counts those shards; the others are rewritten through "
        "the Parquet writer, as `rewrite` does). It fsyncs what it writes, as `cp -r; sync` does, and "
        "removes the old dataset once the new one is swapped in. On 2 shared cores other jobs' I/O "
        "and load move every column.",
        "",
        "| rows | dataset | cp -r (s) | cp -r; sync (s) | rewrite (s) | update (s) | vs cp -r "
        "| vs cp -r; sync | vs rewrite | spliced | update peak RSS | load (uptime) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in result["points"]:
        if p.get("status") != "ok":
            lines.append(f"| {p['num_rows']:,} | | | | | | {p.get('status')} | | | | | |")
            continue
        load = p.get("uptime_before", "").split("load average:")[-1].strip()
        lines.append(
            f"| {p['num_rows']:,} | {p['dataset_bytes'] / 1e9:.2f} GB | {p['median_cp_seconds']:.2f} | "
            f"{p['median_cp_sync_seconds']:.2f} | {p['median_rewrite_seconds']:.2f} | "
            f"{p['median_update_seconds']:.2f} | {p['speed_vs_cp']:.2f}x | {p['speed_vs_cp_sync']:.2f}x | "
            f"{p['speed_vs_rewrite']:.2f}x | {_spliced(p)} | {p['max_peak_rss_mb']:.0f} MB | {load} |"
        )
    return lines + [""]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "rewrite":
        rewrite(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit("usage: python -m bench.update_bench rewrite SRC DST")

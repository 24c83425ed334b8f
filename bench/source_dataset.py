"""``python -m bench dataset``: pass-through from an existing dataset (the engine's own Parquet
output) and from an image folder (metadata.jsonl naming the same files) against the engine's
pass-through from JSONL + files, on the same images, in the same batch (the three commands
interleaved per repeat), and the peak RSS of the dataset input at N and 10 N rows.

The inputs are made once, unmeasured: the JSONL manifest cycles over the ``small`` corpus (1024 px
JPEGs, which pass through), the dataset is ``engine convert`` of it, and the image folder holds
hard links to the corpus's files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.corpora import build_corpus, repeated_manifest
from bench.measure import run_measured
from bench.report import machine_info
from bench.tools import PYTHON, REPO_ROOT

log = logging.getLogger(__name__)
MB = 2**20
CASES = ("jsonl", "dataset", "imagefolder")


def _convert(input_path: Path, out: Path, workers: int, config: Path) -> list[str]:
    return [
        PYTHON,
        "-m",
        "engine",
        "convert",
        "--input",
        str(input_path),
        "--config",
        str(config),
        "--out",
        str(out),
        "--image-format",
        "keep",
        "--max-size",
        "1024",
        "--workers",
        str(workers),
        "--overwrite",
        "--quiet",
    ]


def _image_folder(manifest: Path, folder: Path) -> Path:
    """A folder with hard links to the manifest's images and a metadata.jsonl naming them."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    with open(manifest) as src, open(folder / "metadata.jsonl", "w") as dst:
        for line in src:
            row = json.loads(line)
            source = Path(row["image_path"])
            target = folder / "images" / source.name
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
            dst.write(
                json.dumps(
                    {
                        "file_name": f"images/{source.name}",
                        "image_id": row["image_id"],
                        "output": row["output"],
                    }
                )
                + "\n"
            )
    return folder


def _warm(path: Path) -> None:
    for p in [path] if path.is_file() else path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def _dataset(manifest: Path, config: Path, out: Path, workers: int, env: dict, timeout: float) -> Path:
    made = subprocess.run(
        _convert(manifest, out, workers, config),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if made.returncode != 0:
        raise RuntimeError(f"making the input dataset failed: {made.stderr[-500:]}")
    return out


def _measure(
    case: str,
    inp: Path,
    out: Path,
    config: Path,
    workers: int,
    env: dict,
    timeout: float,
    log_path: Path,
    warm: list[Path],
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    for p in warm:
        _warm(p)
    m = run_measured(
        _convert(inp, out, workers, config), cwd=REPO_ROOT, env=env, timeout=timeout, log_path=log_path
    )
    point = {
        "case": case,
        "seconds": m.wall_seconds,
        "peak_rss_mb": m.peak_rss_bytes / MB,
        "cpu_util": m.cpu_util,
        "returncode": m.returncode,
    }
    if m.returncode:
        point["stderr_tail"] = m.stderr_tail[-500:]
    else:
        stats = json.loads((out / "stats.json").read_text())
        point["num_written"] = stats["num_written"]
        point["own_images_per_second"] = stats.get("images_per_second")
    return point


def run_source_dataset(
    *,
    n: int,
    repeats: int,
    base_images: int,
    workdir: Path,
    results_dir: Path,
    workers: int,
    command: str,
    timeout: float = 3600,
    memory_factor: int = 10,
) -> Path:
    corpus = build_corpus("small", base_images, workdir)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    run_dir = workdir / "runs" / "source-dataset"
    shutil.rmtree(run_dir, ignore_errors=True)
    inputs: dict[int, dict[str, Path]] = {}
    for size in sorted({n, n * memory_factor}):
        manifest = repeated_manifest(corpus, size, run_dir / f"input-{size}")
        config = run_dir / f"input-{size}" / "config.json"
        inputs[size] = {
            "jsonl": manifest,
            "config": config,
            "dataset": _dataset(
                manifest, config, run_dir / f"input-{size}" / "dataset", workers, env, timeout
            ),
            "imagefolder": _image_folder(manifest, run_dir / f"input-{size}" / "folder"),
        }
    warm = {"jsonl": [corpus.root / "images"], "dataset": [], "imagefolder": [corpus.root / "images"]}
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    small = inputs[n]
    for repeat in range(repeats):
        for case in CASES:
            point = _measure(
                case,
                small[case],
                run_dir / "out" / case,
                small["config"],
                workers,
                env,
                timeout,
                run_dir / f"{case}-{repeat}.log",
                warm[case] + [small[case]],
            )
            point["images_per_second"] = n / point["seconds"] if not point["returncode"] else None
            runs[case].append(point)
            log.info("%s repeat %d: %.2f s", case, repeat, point["seconds"])
    memory = []
    for size, paths in inputs.items():
        point = _measure(
            "dataset",
            paths["dataset"],
            run_dir / "out" / f"memory-{size}",
            paths["config"],
            workers,
            env,
            timeout,
            run_dir / f"memory-{size}.log",
            [paths["dataset"]],
        )
        memory.append({"num_rows": size, **point})
    medians = {
        c: statistics.median(p["seconds"] for p in runs[c])
        for c in CASES
        if all(not p["returncode"] for p in runs[c])
    }
    doc = {
        "kind": "source",
        "source": "dataset",
        "command": command,
        "num_rows": n,
        "repeats": repeats,
        "workers": workers,
        "base_images": base_images,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(),
        "runs": runs,
        "median_seconds": medians,
        "ratios": {
            c: medians["jsonl"] / medians[c]
            for c in ("dataset", "imagefolder")
            if c in medians and "jsonl" in medians
        },
        "memory": memory,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{time.strftime('%Y-%m-%d')}-source-dataset.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log.info("wrote %s", path)
    return path


def source_section(doc: dict) -> list[str]:
    """RESULTS.md's section for the newest ``python -m bench dataset`` result."""
    jsonl = doc["median_seconds"].get("jsonl")
    lines = [
        f"## Sources: existing datasets and image folders against JSONL + files (n={doc['num_rows']}, "
        f"pass-through, median of {doc['repeats']}, `{doc['command']}`)",
        "",
        "| input | seconds | images/s | vs JSONL + files |",
        "|---|---:|---:|---:|",
    ]
    for case, seconds in doc["median_seconds"].items():
        ratio = f"{jsonl / seconds:.2f}×" if jsonl else "–"
        lines.append(f"| {case} | {seconds:.2f} | {doc['num_rows'] / seconds:.0f} | {ratio} |")
    lines += [
        "",
        "Peak RSS of the "
        + doc["source"]
        + " input (whole process tree): "
        + ", ".join(f"{m['num_rows']} rows {m['peak_rss_mb']:.0f} MB" for m in doc.get("memory", [])),
        "",
    ]
    return lines

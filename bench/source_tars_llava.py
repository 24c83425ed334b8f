"""``python -m bench webdataset`` and ``python -m bench llava``: pass-through from a source
against the engine's pass-through from JSONL + image files, on the same images, in one batch.

- ``webdataset``: the ``small`` corpus's rows (upright 1024 px JPEGs, kept as they are) packed
  into WebDataset tars (``key.jpg`` + ``key.json`` with the output), -> Parquet; the baseline is
  the same rows as a labelr manifest of files -> Parquet.
- ``llava``: the same images named by a LLaVA JSON array (``<image>`` + an answer), -> packed
  Arrow; the baseline is the same rows as trainer-style JSONL -> packed Arrow.

The two commands alternate ``--repeats`` times (medians); ``speed`` is the baseline's time over
the source's (1.0: as fast). Peak RSS is the whole process tree's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
from pathlib import Path

from bench import report
from bench.corpora import PLACEHOLDER, build_corpus, repeated_manifest, warm_page_cache
from bench.measure import run_measured
from bench.tools import PYTHON, REPO_ROOT

log = logging.getLogger(__name__)
MB = 2**20


def _engine(input_path: Path, out: Path, *, layout: str, config: Path | None, workers: int) -> list[str]:
    cmd = [
        PYTHON,
        "-m",
        "engine",
        "convert",
        "--manifest",
        str(input_path),
        "--out",
        str(out),
        "--layout",
        layout,
        "--max-size",
        "1024",
        "--image-format",
        "keep",
        "--workers",
        str(workers),
        "--overwrite",
        "--quiet",
    ]
    return cmd + (["--config", str(config)] if config else [])


def write_tars(manifest: Path, folder: Path, rows_per_tar: int) -> Path:
    """The manifest's rows as tars written with webdataset's TarWriter: key.jpg + key.json."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line]
    for start in range(0, len(rows), rows_per_tar):
        with wds.TarWriter(str(folder / f"{start // rows_per_tar:05d}.tar")) as w:
            for i, row in enumerate(rows[start : start + rows_per_tar], start):
                meta = {k: v for k, v in row.items() if k not in ("image_path",)}
                w.write({"__key__": f"{i:09d}", "jpg": Path(row["image_path"]).read_bytes(), "json": meta})
    return folder


def write_llava(manifest: Path, path: Path) -> tuple[Path, Path]:
    """The manifest's rows as a LLaVA JSON array and as trainer-style JSONL (the baseline)."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line]
    trainer = path.with_name("trainer.jsonl")
    with open(path, "w") as arr, open(trainer, "w") as jl:
        arr.write("[")
        for i, row in enumerate(rows):
            answer = json.dumps(row["output"], separators=(",", ":"))
            arr.write(
                ("," if i else "")
                + json.dumps(
                    {
                        "id": row["image_id"],
                        "image": row["image_path"],
                        "conversations": [
                            {"from": "human", "value": "<image>\nRead the price tag."},
                            {"from": "gpt", "value": answer},
                        ],
                    }
                )
            )
            jl.write(
                json.dumps(
                    {
                        "id": row["image_id"],
                        "conversations": [
                            {"role": "user", "content": PLACEHOLDER + "\nRead the price tag."},
                            {"role": "assistant", "content": answer},
                        ],
                        "modalities": [{"type": "image", "value": row["image_path"]}],
                    }
                )
                + "\n"
            )
        arr.write("]")
    return path, trainer


def run_source_bench(
    source: str,
    *,
    n: int,
    workdir: Path,
    results_dir: Path,
    workers: int,
    command: str,
    repeats: int = 3,
    base_images: int = 300,
    rows_per_tar: int = 250,
    timeout: float = 3600,
) -> Path:
    corpus = build_corpus("small", base_images, workdir)
    root = workdir / f"source-{source}" / str(n)
    shutil.rmtree(root, ignore_errors=True)
    manifest = repeated_manifest(corpus, n, root)
    config = root / "config.json"
    if source == "webdataset":
        candidate = write_tars(manifest, root / "tars", rows_per_tar)
        commands = {
            "jsonl+files": (manifest, "parquet", config),
            "webdataset": (candidate, "parquet", config),
        }
    else:
        array, trainer = write_llava(manifest, root / "llava.json")
        commands = {"jsonl+files": (trainer, "arrow", None), "llava": (array, "arrow", None)}
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for repeat in range(repeats):
        for name, (inp, layout, cfg) in commands.items():
            out = root / f"out-{name}"
            warm_page_cache(corpus)
            m = run_measured(
                _engine(inp, out, layout=layout, config=cfg, workers=workers),
                cwd=REPO_ROOT,
                env=env,
                timeout=timeout,
                log_path=root / f"{name}-{repeat}.log",
            )
            stats = json.loads((out / "stats.json").read_text()) if m.returncode == 0 else {}
            runs[name].append(
                {
                    "seconds": m.wall_seconds,
                    "peak_rss_mb": m.peak_rss_bytes / MB,
                    "returncode": m.returncode,
                    "num_written": stats.get("num_written"),
                    "stderr_tail": m.stderr_tail[-500:] if m.returncode else "",
                }
            )
            log.info(
                "%s %s: %.2f s, %d written, rss %.0f MB",
                source,
                name,
                m.wall_seconds,
                stats.get("num_written", -1),
                m.peak_rss_bytes / MB,
            )
    medians = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    result = {
        "kind": "source",
        "source": source,
        "date": report.today(),
        "command": command,
        "n": n,
        "workers": workers,
        "repeats": repeats,
        "machine": report.machine_info(),
        "runs": runs,
        "median_seconds": medians,
        "speed_vs_jsonl": medians["jsonl+files"] / medians[source],
        "max_peak_rss_mb": {name: max(r["peak_rss_mb"] for r in rs) for name, rs in runs.items()},
    }
    path = report.write_json(results_dir, f"{report.today()}-source-{source}-{n}", result)
    report.write_results_md(results_dir)
    shutil.rmtree(root, ignore_errors=True)
    return path


def source_section(results: list[dict]) -> list[str]:
    """The RESULTS.md section: the newest result of each source and size."""
    newest = {(r["source"], r["n"]): r for r in results}
    lines = [
        "## Sources: pass-through from a source against JSONL + files, same images, same batch",
        "",
        "| source | rows | source (s) | JSONL + files (s) | speed vs JSONL | peak RSS source / JSONL "
        "| file |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for (name, _), r in sorted(newest.items()):
        rss = r["max_peak_rss_mb"]
        lines.append(
            f"| {name} | {r['n']:,} | {r['median_seconds'][name]:.2f} | "
            f"{r['median_seconds']['jsonl+files']:.2f} | {r['speed_vs_jsonl']:.2f}x | "
            f"{rss[name]:.0f} / {rss['jsonl+files']:.0f} MB | {r['_file']} |"
        )
    return lines + [""]

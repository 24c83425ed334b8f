"""The three benchmark procedures: ``run`` (tools × scenarios), ``memory`` and ``scaling``.

Tools run one at a time, interleaved per repeat (engine, limit, peer1, …, then again), so
that machine noise spreads over every tool alike. Inputs are read once beforehand so that
every tool sees a warm page cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.corpora import Corpus, build_corpus, cycled, repeated_manifest, warm_page_cache
from bench.measure import run_measured
from bench.tools import (
    REF_TOOL,
    REPO_ROOT,
    SCENARIOS,
    NotApplicable,
    engine_available,
    engine_command,
    ensure_img2dataset,
    failure_reason,
    ref_checkout,
    tool_command,
)
from bench.verify import check_output

log = logging.getLogger(__name__)

MB = 1e6


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    n: int
    scenarios: list[str]
    tools: list[str]
    repeats: int
    workdir: Path
    results_dir: Path
    workers: int
    command: str
    timeout: float = 3600
    rows: int | None = None  # rows per run when more than n: cycle over the corpus
    ref: str | None = None  # a git revision run as "engine-ref", interleaved with "engine"


def _env(workdir: Path, run_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["BENCH_IMG2DATASET_VENV"] = str(workdir / "img2dataset-venv")
    # Fresh caches per run: no tool may reuse a previous run's work.
    env["HF_DATASETS_CACHE"] = str(run_dir / "hf-cache")
    env["HF_HUB_OFFLINE"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def measure_tool(
    tool: str,
    command: list[str],
    corpus: Corpus,
    run_dir: Path,
    *,
    workdir: Path,
    workers: int,
    timeout: float,
    expected_rows: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """Run one tool once, check its output, and return the run record."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    # Write back what earlier tools left dirty, so that its writeback does not land on this one
    # (the engine fsyncs its shards; the limit writes nothing).
    os.sync()
    warm_page_cache(corpus)
    out = run_dir / "out"
    m = run_measured(
        command,
        cwd=REPO_ROOT,
        env={**_env(workdir, run_dir), **(extra_env or {})},
        timeout=timeout,
        log_path=run_dir / "log.txt",
        cores=os.cpu_count(),
    )
    num_rows = corpus.num_rows if expected_rows is None else expected_rows
    record = {
        "tool": tool,
        "returncode": m.returncode,
        "timed_out": m.timed_out,
        "wall_seconds": round(m.wall_seconds, 3),
        "images_per_second": num_rows / m.wall_seconds,
        "mb_per_second": corpus.input_bytes / MB / m.wall_seconds * (num_rows / corpus.num_rows),
        "peak_rss_mb": m.peak_rss_bytes / MB,
        "cpu_util": m.cpu_util,
        "driver_peak_rss_mb": m.peak_rss_driver_bytes / MB,
        "raylet_peak_rss_mb": m.peak_rss_raylet_bytes / MB,
        "cpu_seconds": m.cpu_seconds,
        "max_processes": m.max_processes,
        "workers": workers,
    }
    if m.returncode != 0:
        record["error"] = failure_reason(m.stderr_tail, m.returncode)
        record["valid"] = False
        log.warning("%s failed: %s", tool, record["error"])
    else:
        check = check_output(out, corpus, expected_rows=expected_rows)
        record["valid"] = check.valid
        record["check"] = check.to_dict()
        stats = out / "stats.json"
        if stats.exists():
            record["engine_stats"] = json.loads(stats.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info(
        "%-14s %7.2f img/s  %6.2fs  rss %6.0f MB  cpu %3.0f%%  %s",
        tool,
        record["images_per_second"],
        m.wall_seconds,
        record["peak_rss_mb"],
        100 * m.cpu_util,
        "valid" if record["valid"] else ("FAILED" if m.returncode else "INVALID"),
    )
    return record


def summarise(runs: list[dict], unavailable: str | None) -> dict:
    """Medians over the valid runs; a tool is only counted when all its runs are valid."""
    if unavailable and not any(r["returncode"] == 0 for r in runs):
        return {"status": unavailable, "runs": runs}
    if not runs:
        return {"status": "not run", "runs": runs}
    failed = [r for r in runs if r["returncode"] != 0]
    if failed:
        return {"status": f"failed: {failed[0]['error']}", "runs": runs}
    valid = [r for r in runs if r["valid"]]
    if len(valid) != len(runs):
        return {"status": "invalid", "valid": False, "runs": runs}

    def med(key: str) -> float:
        return statistics.median(r[key] for r in valid)

    summary = {
        "status": "ok",
        "valid": True,
        "runs": runs,
        "median_images_per_second": med("images_per_second"),
        "median_mb_per_second": med("mb_per_second"),
        "median_peak_rss_mb": med("peak_rss_mb"),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in valid),
        "median_cpu_util": med("cpu_util"),
    }
    own = [r["engine_stats"].get("images_per_second") for r in valid if "engine_stats" in r]
    own = [v for v in own if v is not None]
    if own:
        summary["median_own_images_per_second"] = statistics.median(own)
    return summary


def ratios(tools: dict[str, dict]) -> dict[str, float]:
    engine = tools.get("engine", {}).get("median_images_per_second")
    if not engine:
        return {}
    return {
        f"engine/{name}": engine / t["median_images_per_second"]
        for name, t in tools.items()
        if name != "engine" and t.get("median_images_per_second")
    }


def pair_ratios(runs: dict[str, list[dict]]) -> dict[str, list[float]]:
    """engine/X of each repeat: the runs of one repeat follow each other, so they share the
    machine's state more than medians over the whole batch do."""
    by_repeat = {
        tool: {r["repeat"]: r for r in rs if r.get("valid", True) and r["returncode"] == 0}
        for tool, rs in runs.items()
    }
    engine = by_repeat.get("engine", {})
    return {
        f"engine/{tool}": [
            round(engine[i]["images_per_second"] / r["images_per_second"], 3)
            for i, r in sorted(rs.items())
            if i in engine
        ]
        for tool, rs in by_repeat.items()
        if tool != "engine" and rs
    }


def run_benchmark(opts: RunOptions) -> list[Path]:
    unavailable: dict[str, str] = {}
    ref_dir = ref_checkout(opts.ref, opts.workdir) if opts.ref else None
    if "engine" in opts.tools:
        reason = engine_available()
        if reason:
            unavailable["engine"] = f"not available: {reason}"
    if "img2dataset" in opts.tools:
        reason = ensure_img2dataset(opts.workdir / "img2dataset-venv")
        if reason:
            unavailable["img2dataset"] = f"not available: {reason}"
    machine = report.machine_info()
    written = []
    for name in opts.scenarios:
        scenario = SCENARIOS[name]
        corpus = build_corpus(scenario.corpus, opts.n, opts.workdir)
        if opts.rows and opts.rows != corpus.num_rows:
            corpus = cycled(
                corpus, opts.rows, opts.workdir / "cycled" / f"{corpus.name}-{opts.n}x{opts.rows}"
            )
        log.info(
            "scenario %s: %s (%d rows, %.0f MB)",
            name,
            scenario.description,
            corpus.num_rows,
            corpus.input_bytes / MB,
        )
        runs: dict[str, list[dict]] = {tool: [] for tool in opts.tools}
        skipped = dict(unavailable)
        for repeat in range(opts.repeats):
            for tool in opts.tools:
                if tool in skipped:
                    continue
                run_dir = opts.workdir / "runs" / name / f"{tool}-{repeat}"
                try:
                    command = tool_command(
                        tool, scenario, corpus, run_dir / "out", workers=opts.workers, ref_dir=ref_dir
                    )
                except NotApplicable as err:
                    skipped[tool] = f"not applicable: {err}"
                    continue
                env = {"PYTHONPATH": str(ref_dir)} if tool == REF_TOOL else None
                record = measure_tool(
                    tool,
                    command,
                    corpus,
                    run_dir,
                    workdir=opts.workdir,
                    workers=opts.workers,
                    timeout=opts.timeout,
                    extra_env=env,
                )
                record["repeat"] = repeat
                runs[tool].append(record)
                if tool == "engine" and record["returncode"] != 0:
                    skipped[tool] = f"not available: {record['error']}"
        tools = {tool: summarise(runs[tool], skipped.get(tool)) for tool in opts.tools}
        result = {
            "kind": "run",
            "scenario": name,
            "description": scenario.description,
            "date": report.today(),
            "command": opts.command,
            "n": opts.n,
            "rows": corpus.num_rows,
            "cycled": corpus.num_rows != opts.n,
            "repeats": opts.repeats,
            "workers": opts.workers,
            "corpus": corpus.summary(),
            "machine": machine,
            "tools": tools,
            "ratios": ratios(tools),
            "pair_ratios": pair_ratios(runs),
            "ref": opts.ref,
        }
        stem = f"{report.today()}-{name}" + (f"-rows{corpus.num_rows}" if result["cycled"] else "")
        written.append(report.write_json(opts.results_dir, stem, result))
    report.plot_throughput(opts.results_dir)
    report.write_results_md(opts.results_dir)
    return written


def run_memory(
    *,
    sizes: list[int],
    workdir: Path,
    results_dir: Path,
    workers: int,
    command: str,
    base_images: int = 300,
    timeout: float = 3600,
    corpus_name: str = "small",
    ray_start: str = "lazy",
    layout: str = "parquet",
) -> Path:
    """Engine pass-through at growing row counts over the same few hundred images."""
    reason = engine_available()
    corpus = build_corpus(corpus_name, base_images, workdir)
    points = []
    for size in sizes:
        if reason:
            points.append({"num_rows": size, "status": f"not available: {reason}"})
            continue
        manifest_dir = workdir / "memory" / f"{corpus_name}-manifest-{size}"
        manifest = repeated_manifest(corpus, size, manifest_dir)
        run_dir = workdir / "runs" / "memory" / f"{corpus_name}-{layout}-{size}"
        cmd = engine_command(
            manifest=manifest,
            config=manifest_dir / "config.json",
            out=run_dir / "out",
            layout=layout,
            mode="passthrough",
            workers=workers,
        )
        record = measure_tool(
            "engine",
            cmd,
            corpus,
            run_dir,
            workdir=workdir,
            workers=workers,
            timeout=timeout,
            expected_rows=size,
            extra_env={"ENGINE_RAY_START": ray_start},
        )
        record["num_rows"] = size
        record["status"] = (
            "ok" if record["valid"] else (f"failed: {record['error']}" if "error" in record else "invalid")
        )
        points.append(record)
    result = {
        "kind": "memory",
        "date": report.today(),
        "command": command,
        "corpus_name": corpus_name,
        "base_images": base_images,
        "workers": workers,
        "ray_start": ray_start,
        "layout": layout,
        "machine": report.machine_info(),
        "corpus": corpus.summary(),
        "points": points,
    }
    stem = (
        f"{report.today()}-memory"
        + ("" if corpus_name == "small" else f"-{corpus_name}")
        + ("" if ray_start == "lazy" else f"-{ray_start}")
        + ("" if layout == "parquet" else f"-{layout}")
    )
    path = report.write_json(results_dir, stem, result)
    report.write_results_md(results_dir)
    return path


def run_scaling(
    *, n: int, workdir: Path, results_dir: Path, max_workers: int, command: str, timeout: float = 3600
) -> Path:
    """Engine throughput on photos → Parquet at workers = 1 … cores."""
    reason = engine_available()
    scenario = SCENARIOS["photos-parquet"]
    corpus = build_corpus(scenario.corpus, n, workdir)
    points = []
    for workers in range(1, max_workers + 1):
        if reason:
            points.append({"workers": workers, "status": f"not available: {reason}"})
            continue
        run_dir = workdir / "runs" / "scaling" / str(workers)
        cmd = tool_command("engine", scenario, corpus, run_dir / "out", workers=workers)
        record = measure_tool(
            "engine", cmd, corpus, run_dir, workdir=workdir, workers=workers, timeout=timeout
        )
        record["status"] = (
            "ok" if record["valid"] else (f"failed: {record['error']}" if "error" in record else "invalid")
        )
        points.append(record)
    result = {
        "kind": "scaling",
        "date": report.today(),
        "command": command,
        "n": n,
        "machine": report.machine_info(),
        "corpus": corpus.summary(),
        "points": points,
    }
    path = report.write_json(results_dir, f"{report.today()}-scaling", result)
    report.plot_scaling(results_dir, result)
    report.write_results_md(results_dir)
    return path

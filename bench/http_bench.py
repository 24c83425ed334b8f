"""Images over HTTP: ``python -m bench http``.

The corpus is served by :mod:`bench.http_server` (its own process, answering each request after
the chosen latency). In one batch, interleaved per repeat, it runs: the engine on the local
files (``engine-local``), the engine on the same images as URLs (``engine-http``), the engine
filling a fresh download cache (``engine-cache-fill``), the engine again on that cache
(``engine-cached``: the server must see no request), and img2dataset on the same URLs at its
defaults (256 threads per process). The server reports the requests each run made and the most
it had in flight. ``--memory-sizes`` adds the engine's peak memory over URLs of tiny images at
the last latency, at growing row counts (distinct URLs, so nothing is fetched twice).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
from pathlib import Path

from bench import report
from bench.corpora import Corpus, build_corpus
from bench.harness import MB, measure_tool
from bench.http_server import server_stats, serving
from bench.tools import PYTHON, engine_available, engine_command, ensure_img2dataset

log = logging.getLogger(__name__)

# corpus -> (mode, description)
HTTP_SCENARIOS = {
    "small": ("passthrough", "upright 1024 px JPEGs (~140 KB) → Parquet, bytes kept"),
    "photos": ("resize", "12 MP phone photos → Parquet, longest side 1024, JPEG q90"),
}
TOOLS = ("engine-local", "engine-http", "engine-cache-fill", "engine-cached", "img2dataset-http")


def url_manifest(corpus: Corpus, base_url: str, out_dir: Path, *, num_rows: int | None = None) -> Path:
    """The corpus manifest with each ``image_path`` replaced by its URL on the server; with
    ``num_rows``, that many rows cycling over the images, each with its own id and URL."""
    rows = [json.loads(line) for line in corpus.manifest.read_text().splitlines() if line]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "manifest-urls.jsonl"
    with open(path, "w") as f:
        for i in range(num_rows or len(rows)):
            r = dict(rows[i % len(rows)])
            rel = r.pop("image_path")
            if num_rows:
                r["image_id"] = f"{r['image_id']}-r{i}"
            r["image_url"] = f"{base_url}/{rel}" + (f"?r={i}" if num_rows else "")
            f.write(json.dumps(r) + "\n")
    shutil.copy(corpus.config, out_dir / "config.json")
    return path


def _command(
    tool: str, corpus: Corpus, manifest: Path, out: Path, mode: str, workers: int, cache: Path, base_url: str
) -> list[str]:
    if tool == "img2dataset-http":
        return [
            PYTHON,
            "-m",
            "bench.peers.img2dataset",
            "--manifest",
            str(corpus.manifest),
            "--config",
            str(corpus.config),
            "--out",
            str(out),
            "--layout",
            "parquet",
            "--mode",
            mode,
            "--max-size",
            "1024",
            "--quality",
            "90",
            "--workers",
            str(workers),
            "--url-base",
            base_url,
        ]
    local = tool == "engine-local"
    command = engine_command(
        manifest=corpus.manifest if local else manifest,
        config=corpus.config,
        out=out,
        layout="parquet",
        mode=mode,
        workers=workers,
    )
    if tool in ("engine-cache-fill", "engine-cached"):
        command += ["--download-cache", str(cache)]
    return command


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("returncode") == 0 and r.get("valid")]
    if not runs:
        return {"status": "not run", "runs": runs}
    if len(ok) != len(runs):
        bad = next(r for r in runs if r not in ok)
        return {"status": f"failed: {bad.get('error', 'invalid output')}", "runs": runs}
    return {
        "status": "ok",
        "runs": runs,
        "median_images_per_second": statistics.median(r["images_per_second"] for r in ok),
        "median_wall_seconds": statistics.median(r["wall_seconds"] for r in ok),
        "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "median_cpu_util": statistics.median(r["cpu_util"] for r in ok),
        "max_in_flight": max(r.get("server_max_in_flight", 0) for r in ok),
        "server_requests": [r.get("server_requests") for r in ok],
    }


def _ratios(tools: dict[str, dict]) -> dict[str, float]:
    def speed(name: str) -> float | None:
        return tools.get(name, {}).get("median_images_per_second")

    pairs = {
        "engine-http/engine-local": ("engine-http", "engine-local"),
        "engine-http/img2dataset-http": ("engine-http", "img2dataset-http"),
        "engine-cached/engine-local": ("engine-cached", "engine-local"),
        "engine-cache-fill/engine-http": ("engine-cache-fill", "engine-http"),
    }
    return {k: speed(a) / speed(b) for k, (a, b) in pairs.items() if speed(a) and speed(b)}


def run_http(
    *,
    corpora: dict[str, int],
    latencies: list[float],
    repeats: int,
    workdir: Path,
    results_dir: Path,
    workers: int,
    command: str,
    memory_sizes: list[int],
    timeout: float = 1800,
    tools: tuple[str, ...] = TOOLS,
) -> Path:
    load_before = os.getloadavg()
    reason = engine_available()
    if reason:
        raise SystemExit(f"engine not available: {reason}")
    skipped: dict[str, str] = {}
    if "img2dataset-http" in tools:
        problem = ensure_img2dataset(workdir / "img2dataset-venv")
        if problem:
            skipped["img2dataset-http"] = f"not available: {problem}"
    scenarios = []
    for name, n in corpora.items():
        mode, description = HTTP_SCENARIOS[name]
        corpus = build_corpus(name, n, workdir)
        for latency in latencies:
            label = f"{name}-{n}-{int(latency * 1000)}ms"
            log.info(
                "HTTP scenario %s: %s, %d rows, %.0f MB, %g s latency",
                label,
                description,
                corpus.num_rows,
                corpus.input_bytes / MB,
                latency,
            )
            runs: dict[str, list[dict]] = {t: [] for t in tools}
            scratch = workdir / "http" / label
            with serving(corpus.root, latency, scratch) as base:
                manifest = url_manifest(corpus, base, scratch)
                for repeat in range(repeats):
                    cache = scratch / f"cache-{repeat}"
                    shutil.rmtree(cache, ignore_errors=True)
                    for tool in tools:
                        if tool in skipped:
                            continue
                        run_dir = workdir / "runs" / "http" / label / f"{tool}-{repeat}"
                        cmd = _command(tool, corpus, manifest, run_dir / "out", mode, workers, cache, base)
                        server_stats(base, reset=True)
                        record = measure_tool(
                            tool, cmd, corpus, run_dir, workdir=workdir, workers=workers, timeout=timeout
                        )
                        served = server_stats(base)
                        record.update(
                            repeat=repeat,
                            server_requests=served["requests"],
                            server_max_in_flight=served["max_in_flight"],
                        )
                        if tool == "engine-cached" and served["requests"]:
                            record["valid"] = False
                            record["error"] = (
                                f"{served['requests']} request(s) reached the server from the cache run"
                            )
                        record.pop("engine_stats", None) if tool == "img2dataset-http" else None
                        runs[tool].append(record)
                    shutil.rmtree(cache, ignore_errors=True)
            summaries = {
                t: ({"status": skipped[t], "runs": []} if t in skipped else _summary(runs[t])) for t in tools
            }
            scenarios.append(
                {
                    "scenario": label,
                    "corpus_name": name,
                    "mode": mode,
                    "description": description,
                    "latency_seconds": latency,
                    "rows": corpus.num_rows,
                    "input_mb": corpus.input_bytes / MB,
                    "tools": summaries,
                    "ratios": _ratios(summaries),
                }
            )
    memory = (
        _memory(sizes=memory_sizes, latency=latencies[-1], workdir=workdir, workers=workers, timeout=timeout)
        if memory_sizes
        else None
    )
    result = {
        "kind": "http",
        "date": report.today(),
        "command": command,
        "repeats": repeats,
        "workers": workers,
        "machine": report.machine_info(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "scenarios": scenarios,
        "memory": memory,
    }
    path = report.write_json(results_dir, f"{report.today()}-http", result)
    report.write_results_md(results_dir)
    return path


def _memory(*, sizes: list[int], latency: float, workdir: Path, workers: int, timeout: float) -> dict:
    corpus = build_corpus("tiny", 300, workdir)
    points = []
    scratch = workdir / "http" / f"memory-{int(latency * 1000)}ms"
    with serving(corpus.root, latency, scratch) as base:
        for size in sizes:
            manifest = url_manifest(corpus, base, scratch / str(size), num_rows=size)
            run_dir = workdir / "runs" / "http" / "memory" / str(size)
            cmd = engine_command(
                manifest=manifest,
                config=corpus.config,
                out=run_dir / "out",
                layout="parquet",
                mode="passthrough",
                workers=workers,
            )
            server_stats(base, reset=True)
            # Ray from the start at every size, so every point has the same processes (lazily, Ray
            # starts only for the longer jobs, and its own processes would be most of the difference)
            record = measure_tool(
                "engine-http",
                cmd,
                corpus,
                run_dir,
                workdir=workdir,
                workers=workers,
                timeout=timeout,
                expected_rows=size,
                extra_env={"ENGINE_RAY_START": "eager"},
            )
            served = server_stats(base)
            record.update(
                num_rows=size,
                server_requests=served["requests"],
                server_max_in_flight=served["max_in_flight"],
            )
            record.pop("engine_stats", None)
            points.append(record)
    peaks = [p["peak_rss_mb"] for p in points if p.get("valid")]
    return {
        "corpus": corpus.summary(),
        "latency_seconds": latency,
        "ray_start": "eager",
        "points": points,
        "peak_ratio_last_to_first": peaks[-1] / peaks[0] if len(peaks) == len(points) and peaks else None,
    }

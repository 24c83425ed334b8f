"""Result files: per-scenario JSON, throughput/scaling plots and ``bench/RESULTS.md``."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import itertools
import json
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)

TOOL_ORDER = (
    "engine",
    "engine-ref",
    "limit",
    "limit-write",
    "hf-datasets",
    "serial-pillow",
    "ray-data",
    "img2dataset",
)
SCENARIO_ORDER = ("photos-parquet", "small-passthrough", "photos-arrow", "mixed-parquet")


def today() -> str:
    return dt.date.today().isoformat()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import PIL

    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pillow": PIL.__version__,
        "pillow_simd": _version("pillow-simd") is not None,
        "ray": _version("ray"),
        "datasets": _version("datasets"),
        "pyarrow": _version("pyarrow"),
        "numpy": _version("numpy"),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def write_json(results_dir: Path, stem: str, payload: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log.info("wrote %s", path)
    return path


def load_results(results_dir: Path) -> list[dict]:
    results = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("skipping unreadable %s", path)
            continue
        payload["_file"] = path.name
        results.append(payload)
    return results


def latest_runs(results: list[dict], cycled: bool = False) -> dict:
    """The newest ``run`` result per scenario (files are date-prefixed, so sorted order); with
    ``cycled``, the newest ``run --rows`` result per (scenario, rows) instead."""
    latest: dict = {}
    for result in results:
        if result.get("kind") == "run" and bool(result.get("cycled")) == cycled:
            latest[(result["scenario"], result["rows"]) if cycled else result["scenario"]] = result
    return latest


def _ordered(names, order) -> list[str]:
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


# --------------------------------------------------------------------------- plots


def plot_throughput(results_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = latest_runs(load_results(results_dir))
    if not runs:
        return None
    scenarios = _ordered(runs, SCENARIO_ORDER)
    tools = _ordered({t for r in runs.values() for t in r["tools"]}, TOOL_ORDER)
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(tools))
    for i, tool in enumerate(tools):
        values = [runs[s]["tools"].get(tool, {}).get("median_images_per_second") or 0 for s in scenarios]
        bars = ax.bar([x + i * width for x in range(len(scenarios))], values, width, label=tool)
        for bar, value in zip(bars, values):
            if value:
                ax.annotate(
                    f"{value:.1f}",
                    (bar.get_x() + bar.get_width() / 2, value),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks([x + width * (len(tools) - 1) / 2 for x in range(len(scenarios))])
    ax.set_xticklabels([f"{s}\n(n={runs[s]['n']})" for s in scenarios])
    ax.set_ylabel("images / s (median, whole command)")
    ax.set_title("Throughput per tool (missing bar: not available, not applicable or invalid)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = results_dir / f"{today()}-throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(results_dir: Path, result: dict) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in result["points"] if p.get("status") == "ok"]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["workers"] for p in points], [p["images_per_second"] for p in points], "o-")
    ax.set_xlabel("--workers")
    ax.set_ylabel("images / s (whole command)")
    ax.set_title(f"engine scaling, photos → Parquet, n={result['n']}")
    fig.tight_layout()
    path = results_dir / f"{result['date']}-scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- RESULTS.md


def _cell(tool: dict | None) -> str:
    if not tool:
        return "–"
    if tool.get("median_images_per_second"):
        return f"{tool['median_images_per_second']:.2f}"
    status = tool.get("status", "")
    return status.split(":", 1)[0]


def _run_section(runs: dict[str, dict]) -> list[str]:
    scenarios = _ordered(runs, SCENARIO_ORDER)
    tools = _ordered({t for r in runs.values() for t in r["tools"]}, TOOL_ORDER)
    lines = [
        "## Throughput (images/s, median of repeats, whole command incl. start-up)",
        "",
        "| tool | " + " | ".join(f"{s} (n={runs[s]['n']})" for s in scenarios) + " |",
        "|---|" + "---:|" * len(scenarios),
    ]
    for tool in tools:
        lines.append(f"| {tool} | " + " | ".join(_cell(runs[s]["tools"].get(tool)) for s in scenarios) + " |")
    ratio_names = _ordered(
        {k for r in runs.values() for k in r.get("ratios", {})}, tuple(f"engine/{t}" for t in TOOL_ORDER)
    )
    if ratio_names:
        lines += [
            "",
            "Ratios (from medians of the same run):",
            "",
            "| ratio | " + " | ".join(scenarios) + " |",
            "|---|" + "---:|" * len(scenarios),
        ]
        for name in ratio_names:
            cells = [runs[s].get("ratios", {}).get(name) for s in scenarios]
            lines.append(f"| {name} | " + " | ".join(f"{c:.2f}×" if c else "–" for c in cells) + " |")
    lines += ["", "## Details per scenario", ""]
    for s in scenarios:
        r = runs[s]
        corpus = r["corpus"]
        lines += [
            f"### {s}: {r['description']}",
            "",
            f"Corpus `{corpus['name']}`: {corpus['num_rows']} rows, {corpus['num_valid']} "
            f"valid images, {corpus['input_bytes'] / 1e6:.0f} MB; {r['repeats']} repeats, "
            f"workers={r['workers']}, file `results/{r['_file']}`.",
            "",
            "| tool | status | images/s | MB/s | peak RSS MB | CPU util | upright samples |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for tool in _ordered(r["tools"], TOOL_ORDER):
            t = r["tools"][tool]
            lines.append(_detail_row(tool, t))
        lines.append("")
    return lines


def _detail_row(tool: str, t: dict) -> str:
    if not t.get("median_images_per_second"):
        return f"| {tool} | {t.get('status', '').replace('|', '/')[:200]} | | | | | |"
    checks = [r["check"] for r in t["runs"] if "check" in r]
    upright = ""
    if checks and checks[-1]["num_upright_known"]:
        upright = f"{checks[-1]['num_upright']}/{checks[-1]['num_upright_known']}"
    own = t.get("median_own_images_per_second")
    ips = f"{t['median_images_per_second']:.2f}" + (f" (own {own:.1f})" if own else "")
    return (
        f"| {tool} | {t['status']} | {ips} | {t['median_mb_per_second']:.1f} | "
        f"{t['median_peak_rss_mb']:.0f} | {100 * t['median_cpu_util']:.0f}% | {upright} |"
    )


def _memory_section(result: dict) -> list[str]:
    ray_start = result.get("ray_start", "lazy")
    layout = {"parquet": "Parquet", "arrow": "packed Arrow (raw-image)"}[result.get("layout", "parquet")]
    lines = [
        f"## Memory: engine pass-through to {layout} on repeated `{result.get('corpus_name', 'small')}` "
        f"images, Ray start {ray_start} ({result['_file']})",
        "",
        f"Command: `{result['command']}`; {result['base_images']} distinct images "
        "repeated under distinct image_ids.",
        "",
        "| rows | status | processes | peak RSS MB (process tree) | driver peak RSS MB "
        "| raylet (object store) peak RSS MB | images/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    ok = [p for p in result["points"] if p.get("status") == "ok"]
    for p in result["points"]:
        if p.get("status") == "ok":
            lines.append(
                f"| {p['num_rows']:,} | ok | {p.get('max_processes', '')} | {p['peak_rss_mb']:.0f} | "
                f"{p.get('driver_peak_rss_mb', 0):.0f} | {p.get('raylet_peak_rss_mb', 0):.0f} | "
                f"{p['images_per_second']:.1f} |"
            )
        else:
            lines.append(f"| {p['num_rows']:,} | {p.get('status', '')[:200]} | | | | | |")
    if len(ok) > 1:
        tree = [p["peak_rss_mb"] for p in ok]
        driver = [p.get("driver_peak_rss_mb", 0) for p in ok]
        lines += [
            "",
            f"Largest over smallest peak: process tree {max(tree) / min(tree):.2f}×, "
            f"driver {max(driver) / max(min(driver), 1):.2f}×.",
        ]
    return lines + [""]


def _scaling_section(result: dict) -> list[str]:
    lines = [
        f"## Scaling: engine on photos → Parquet ({result['_file']})",
        "",
        f"Command: `{result['command']}`",
        "",
        "| workers | status | images/s | CPU util | peak RSS MB |",
        "|---:|---|---:|---:|---:|",
    ]
    for p in result["points"]:
        if p.get("status") == "ok":
            lines.append(
                f"| {p['workers']} | ok | {p['images_per_second']:.2f} | "
                f"{100 * p['cpu_util']:.0f}% | {p['peak_rss_mb']:.0f} |"
            )
        else:
            lines.append(f"| {p['workers']} | {p.get('status', '')[:200]} | | | |")
    return lines + [""]


NOTES = """## Notes

- images/s = input rows / wall time of the whole command (interpreter, Ray or
  `datasets` start-up, writing and closing included). The engine's own figure from its
  `stats.json` is shown as "own". MB/s = input bytes / wall time.
- A column with a small n (a smoke test such as `--n 8`) measures start-up (Ray about
  10–15 s here), not throughput; compare tools only at n ≥ 200.
- Tools run one after another, interleaved per repeat, never concurrently. Right before each
  tool runs, the harness runs `sync` (so no tool pays for the writeback of what an earlier one
  wrote) and reads every input file (so each starts with a warm page cache: this machine
  pages out memory not touched for about 30 s, so a warm-up per batch did not last).
- Peak RSS sums RSS over the whole process tree, sampled every 50 ms; memory shared between
  processes (Ray's object store, forked workers' copy-on-write pages) counts once per process,
  so it over-states Ray and `multiprocessing` tools. CPU util = CPU seconds of the tree /
  wall / cores.
- Validity: row count = the corpus's decodable images, and ~20 sampled images decode with
  longest side ≤ 1024. "upright samples" counts sampled rows whose aspect matches the
  EXIF-corrected size (only orientations 5–8 change the aspect); it is information, not part
  of validity. img2dataset decodes with OpenCV and ignores EXIF orientation.
- `limit` is the imaging floor: one process per core, `draft` → `thumbnail` → transpose →
  JPEG q90 into memory, nothing written but ~20 samples. Pass-through: read + header parse.
- `limit-write` (pass-through only) is the same loop writing what it read: each process
  appends its images to one file and fsyncs it after every chunk (1/8 of its share). It is the
  floor of any converter that writes its output durably; the engine fsyncs every shard.
- `hf-datasets` and `serial-pillow` store the PIL image through the `datasets` `Image`
  feature, which encodes it as PNG (the image lost its format in `exif_transpose`). That is
  what today's scripts do, and the main reason they are slow and their output large.
  `serial-pillow` does this even in the pass-through scenario.
- `ray-data` decodes fully (no `draft`) like a user's script, and encodes JPEG q90.
- Ray Data and img2dataset have no `save_to_disk` writer, so they do not apply to
  `photos-arrow`. img2dataset uses `resize_mode=keep_ratio_largest` (its `keep_ratio` bounds
  the shortest side).
"""


def _cycled_section(runs: dict[tuple[str, int], dict]) -> list[str]:
    """Longer jobs over the same corpus (``run --rows``): how the fixed cost per command spreads."""
    lines = [
        "## Longer jobs: the fixed start-up cost spread over more rows",
        "",
        "`run --rows R` cycles over the corpus's images with distinct ids, so a job of R rows reads "
        "the same files (warm page cache). Medians of the repeats, tools interleaved.",
        "",
        "| scenario | rows | engine (img/s) | limit (img/s) | engine/limit | engine/limit-write | command |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for (scenario, rows), r in sorted(
        runs.items(), key=lambda kv: (_ordered([kv[0][0]], SCENARIO_ORDER), kv[0][1])
    ):
        tools = r["tools"]
        engine = tools.get("engine", {}).get("median_images_per_second")
        limit = tools.get("limit", {}).get("median_images_per_second")
        ratio, written = (r.get("ratios", {}).get(f"engine/{name}") for name in ("limit", "limit-write"))
        lines.append(
            f"| {scenario} | {rows:,} | {engine or 0:.2f} | {limit or 0:.2f} | "
            f"{f'{ratio:.2f}×' if ratio else '–'} | {f'{written:.2f}×' if written else '–'} | "
            f"`{r['command']}` |"
        )
    return lines + [""]


HTTP_TOOLS = ("engine-local", "engine-http", "engine-cache-fill", "engine-cached", "img2dataset-http")


def _http_section(result: dict, memory_result: dict | None = None) -> list[str]:
    """``memory_result``: the batch whose memory points to show when ``result`` ran none."""
    before, after = (" / ".join(f"{x:.2f}" for x in result[k]) for k in ("load_before", "load_after"))
    lines = [
        f"## Images over HTTP ({result['_file']})",
        "",
        f"Command: `{result['command']}`. A loopback server in its own process (bench/http_server.py) "
        f"answers each request after the given latency; {result['workers']} workers; median of "
        f"{result['repeats']} interleaved repeats; whole command incl. start-up. Load average (1/5/15 min) "
        f"{before} before and {after} after: the machine was shared, so the numbers are noisy.",
        "",
        "| scenario | " + " | ".join(HTTP_TOOLS) + " | http / local | http / img2dataset | cached / local |",
        "|---|" + "---:|" * (len(HTTP_TOOLS) + 3),
    ]
    for sc in result["scenarios"]:
        cells = [_cell(sc["tools"].get(t)) for t in HTTP_TOOLS]
        r = sc["ratios"]
        ratios = [
            r.get(k)
            for k in (
                "engine-http/engine-local",
                "engine-http/img2dataset-http",
                "engine-cached/engine-local",
            )
        ]
        lines.append(
            f"| {sc['scenario']} ({sc['rows']} rows) | "
            + " | ".join(cells)
            + " | "
            + " | ".join(f"{x:.2f}×" if x else "–" for x in ratios)
            + " |"
        )
    lines += [
        "",
        "Images/s above; below, the most requests the server had in flight at once, and peak memory "
        "(MB, the whole process tree, median).",
        "",
        "| scenario | " + " | ".join(HTTP_TOOLS) + " |",
        "|---|" + "---:|" * len(HTTP_TOOLS),
    ]
    for sc in result["scenarios"]:
        cells = []
        for t in HTTP_TOOLS:
            tool = sc["tools"].get(t) or {}
            cells.append(
                f"{tool['max_in_flight']} / {tool['median_peak_rss_mb']:.0f}"
                if tool.get("status") == "ok"
                else "–"
            )
        lines.append(f"| {sc['scenario']} | " + " | ".join(cells) + " |")
    memory = result.get("memory")
    source = ""
    if not memory and memory_result is not None:
        memory, source = memory_result.get("memory"), f", from {memory_result['_file']}"
    if memory:
        lines += [
            "",
            f"Memory over URLs of tiny images at {memory['latency_seconds']:g} s latency "
            f"(engine pass-through, distinct URLs, Ray started {memory.get('ray_start', 'lazily')}ly "
            f"at every size{source}):",
            "",
            "| rows | images/s | peak RSS (MB) | in flight at the server |",
            "|---:|---:|---:|---:|",
        ]
        for p in memory["points"]:
            if not p.get("valid"):
                lines.append(f"| {p['num_rows']} | failed: {p.get('error', 'invalid output')} | – | – |")
                continue
            lines.append(
                f"| {p['num_rows']} | {p['images_per_second']:.1f} | {p['peak_rss_mb']:.0f} | "
                f"{p.get('server_max_in_flight', '–')} |"
            )
        if memory.get("peak_ratio_last_to_first"):
            lines += ["", f"Peak memory, largest over smallest: {memory['peak_ratio_last_to_first']:.2f}×."]
    return lines + [""]


def write_results_md(results_dir: Path) -> Path:
    """Regenerate ``RESULTS.md`` beside ``results_dir`` (``bench/RESULTS.md`` by default)."""
    path = results_dir.parent / "RESULTS.md"
    results = load_results(results_dir)
    runs = latest_runs(results)
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m bench` from the JSON files in `bench/results/` "
        "(the newest file per scenario). Do not edit by hand.",
        "",
    ]
    machine = next((r["machine"] for r in reversed(results) if "machine" in r), None)
    if machine:
        lines += [
            "## Machine",
            "",
            f"{machine['cores']} cores ({machine['cpu_model']}), "
            f"{machine.get('memory_gb', '?')} GB RAM, Python {machine['python']}, "
            f"Pillow {machine['pillow']} "
            f"({'Pillow-SIMD' if machine['pillow_simd'] else 'stock Pillow'}), "
            f"ray {machine['ray']}, datasets {machine['datasets']}, "
            f"pyarrow {machine['pyarrow']}. Shared, noisy machine.",
            "",
        ]
    commands = sorted({r["command"] for r in runs.values()})
    if commands:
        lines += ["## Command", ""] + [f"    {c}" for c in commands] + [""]
        lines += _run_section(runs)
        pngs = sorted(results_dir.glob("*-throughput.png"))
        if pngs:
            lines += [f"![throughput](results/{pngs[-1].name})", ""]
    cycled_runs = latest_runs(results, cycled=True)
    if cycled_runs:
        lines += _cycled_section(cycled_runs)
    for corpus_name, ray_start, layout in itertools.product(
        ("small", "tiny"), ("lazy", "eager"), ("parquet", "arrow")
    ):
        memory = [
            r
            for r in results
            if r.get("kind") == "memory"
            and r.get("corpus_name", "small") == corpus_name
            and r.get("ray_start", "lazy") == ray_start
            and r.get("layout", "parquet") == layout
        ]
        if memory:
            lines += _memory_section(memory[-1])
    updates = [r for r in results if r.get("kind") == "update"]
    if updates:
        from bench.update_bench import update_section

        lines += update_section(updates[-1])
    if any(r.get("kind") == "scaling" for r in results):
        lines += _scaling_section([r for r in results if r.get("kind") == "scaling"][-1])
    steady = [r for r in results if r.get("kind") == "steady-state"]
    if steady:
        s = steady[-1]
        lines += [
            "## Steady state: the engine with Ray already running",
            "",
            f"Command: `{s['command']}` ({s['_file']}). Median of {s['repeats']} runs, {s['n']} photos.",
            "",
            "| engine, Ray warm (img/s) | limit (img/s) | ratio |",
            "|---:|---:|---:|",
            f"| {s['engine_warm_images_per_second']:.1f} | {s['limit_images_per_second']:.1f} | "
            f"{s['ratio_engine_warm_vs_limit']:.2f} |",
            "",
        ]
    inspect_runs = [r for r in results if r.get("kind") == "inspect"]
    if inspect_runs:
        from bench.inspect_bench import inspect_section

        lines += inspect_section(inspect_runs[-1])
    http = [r for r in results if r.get("kind") == "http"]
    if http:
        lines += _http_section(http[-1], next((r for r in reversed(http) if r.get("memory")), None))
    sources = [r for r in results if r.get("kind") == "source" and r.get("source") in ("webdataset", "llava")]
    if sources:
        from bench.source_tars_llava import source_section

        lines += source_section(sources)
    dataset_sources = [r for r in results if r.get("kind") == "source" and r.get("source") == "dataset"]
    if dataset_sources:
        from bench.source_dataset import source_section

        lines += source_section(dataset_sources[-1])
    gap = Path(__file__).with_name("GAP.md")
    if gap.exists():
        lines += [gap.read_text().strip(), ""]
    lines += [NOTES]
    path.write_text("\n".join(lines))
    log.info("wrote %s", path)
    return path

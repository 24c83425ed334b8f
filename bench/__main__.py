"""``python -m bench run | memory | scaling | inspect | dataset | report``."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from bench import harness, report
from bench.tools import SCENARIOS, TOOLS

BENCH_DIR = Path(__file__).resolve().parent


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _choices(values: list[str], allowed, what: str) -> list[str]:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--workdir",
            type=Path,
            default=BENCH_DIR / ".cache",
            help="corpora, venvs and scratch outputs (default bench/.cache)",
        )
        p.add_argument(
            "--results",
            type=Path,
            default=BENCH_DIR / "results",
            help="where JSON/PNG results go; RESULTS.md is written beside it",
        )
        p.add_argument("--timeout", type=float, default=3600, help="seconds per tool run")

    run = sub.add_parser("run", help="tools × scenarios throughput benchmark")
    run.add_argument("--n", type=int, default=1000, help="rows per corpus")
    run.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {','.join(SCENARIOS)}"
    )
    run.add_argument(
        "--peers",
        default=",".join(TOOLS[2:]),
        help=f"comma-separated tools besides engine and limit, from "
        f"{','.join(TOOLS[2:])}; 'none' for no peers",
    )
    run.add_argument("--no-engine", action="store_true", help="leave the engine out")
    run.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows per run (default: --n); more than --n cycles over the corpus's images "
        "with distinct ids, to show how the fixed start-up cost spreads over a longer job",
    )
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument(
        "--ref",
        default=None,
        metavar="REV",
        help="also run the engine at git revision REV (tool engine-ref), interleaved: a before/after batch",
    )
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    common(run)

    memory = sub.add_parser("memory", help="engine peak RSS against row count (pass-through)")
    memory.add_argument("--sizes", default="1000,10000,50000")
    memory.add_argument("--base-images", type=int, default=300)
    memory.add_argument(
        "--corpus",
        default="small",
        choices=["small", "tiny"],
        help="small: 1024 px JPEGs; tiny: 32x24 JPEGs, for driver memory at a million rows",
    )
    memory.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    memory.add_argument(
        "--ray-start",
        choices=["lazy", "eager"],
        default="lazy",
        help="lazy (default): the engine decides whether Ray pays, so small jobs run "
        "without it; eager: Ray at every size, the same processes at every N",
    )
    memory.add_argument(
        "--layout",
        choices=["parquet", "arrow"],
        default="parquet",
        help="output layout: Hugging Face Parquet, or packed Arrow with embedded images",
    )
    common(memory)

    scaling = sub.add_parser("scaling", help="engine throughput at workers = 1 … cores")
    scaling.add_argument("--n", type=int, default=200)
    scaling.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    common(scaling)

    upd = sub.add_parser("update", help="an outputs-only engine update against cp -r, and its peak RSS")
    upd.add_argument("--sizes", default="1000,10000")
    upd.add_argument("--base-images", type=int, default=300)
    upd.add_argument("--repeats", type=int, default=2)
    upd.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    common(upd)
    insp = sub.add_parser("inspect", help="engine inspect against reading the Parquet files with pyarrow")
    insp.add_argument(
        "--sizes", default="500,2000,8000", help="rows of the pass-through datasets (peak RSS at each)"
    )
    insp.add_argument(
        "--decode-rows",
        type=int,
        default=1_000_000,
        help="also time the decoding modes (pixel hash, perceptual hash) at sizes up to this",
    )
    insp.add_argument("--base-images", type=int, default=300)
    insp.add_argument(
        "--distinct",
        type=int,
        default=2000,
        help="rows of the all-distinct dataset (every image decoded; 0: none)",
    )
    insp.add_argument("--repeats", type=int, default=3)
    insp.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    common(insp)
    http = sub.add_parser(
        "http",
        help="images over HTTP from a loopback server with latency: engine on URLs, "
        "on the same files, from its download cache, and img2dataset on the URLs",
    )
    http.add_argument("--n-small", type=int, default=1000, help="rows of small JPEGs (pass-through); 0: none")
    http.add_argument("--n-photos", type=int, default=100, help="rows of 12 MP photos (resized); 0: none")
    http.add_argument("--latencies", default="0.05,0.2", help="seconds before each answer, comma-separated")
    http.add_argument("--repeats", type=int, default=3)
    http.add_argument(
        "--memory-sizes",
        default="1000,20000",
        help="row counts of tiny-image URLs for the memory check at the last latency ('' for none)",
    )
    http.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    common(http)

    for name in ("webdataset", "llava"):
        src = sub.add_parser(
            name, help=f"pass-through from {name} input against JSONL + files, same images, same batch"
        )
        src.add_argument("--n", type=int, default=1000, help="rows")
        src.add_argument("--repeats", type=int, default=3)
        src.add_argument("--base-images", type=int, default=300)
        src.add_argument("--workers", type=int, default=os.cpu_count() or 1)
        common(src)
    dsrc = sub.add_parser(
        "dataset",
        help="pass-through from an existing dataset and from an image folder against "
        "JSONL + files (same images, same batch), and the dataset input's peak RSS at N and 10 N",
    )
    dsrc.add_argument("--n", type=int, default=1000, help="rows of the measured inputs")
    dsrc.add_argument("--repeats", type=int, default=3)
    dsrc.add_argument("--base-images", type=int, default=300)
    dsrc.add_argument(
        "--memory-factor",
        type=int,
        default=10,
        help="the larger input for peak RSS has this many times --n rows",
    )
    dsrc.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    common(dsrc)

    rep = sub.add_parser("report", help="regenerate the plot and RESULTS.md from the JSON files")
    common(rep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    workdir = args.workdir.resolve()
    if args.command == "run":
        peers = [] if args.peers == "none" else _choices(_csv(args.peers), TOOLS[2:], "peer")
        tools = (
            ([] if args.no_engine else ["engine"]) + (["engine-ref"] if args.ref else []) + ["limit"] + peers
        )
        opts = harness.RunOptions(
            n=args.n,
            scenarios=_choices(_csv(args.scenarios), SCENARIOS, "scenario"),
            tools=tools,
            repeats=args.repeats,
            workdir=workdir,
            results_dir=args.results,
            workers=args.workers,
            command=command,
            timeout=args.timeout,
            rows=args.rows,
            ref=args.ref,
        )
        harness.run_benchmark(opts)
    elif args.command == "memory":
        harness.run_memory(
            sizes=[int(s) for s in _csv(args.sizes)],
            workdir=workdir,
            results_dir=args.results,
            workers=args.workers,
            command=command,
            base_images=args.base_images,
            timeout=args.timeout,
            corpus_name=args.corpus,
            ray_start=args.ray_start,
            layout=args.layout,
        )
    elif args.command == "scaling":
        harness.run_scaling(
            n=args.n,
            workdir=workdir,
            results_dir=args.results,
            max_workers=args.max_workers,
            command=command,
            timeout=args.timeout,
        )
    elif args.command == "update":
        from bench.update_bench import run_update_bench

        run_update_bench(
            sizes=[int(s) for s in _csv(args.sizes)],
            workdir=workdir,
            results_dir=args.results,
            workers=args.workers,
            command=command,
            base_images=args.base_images,
            repeats=args.repeats,
            timeout=args.timeout,
        )
    elif args.command == "inspect":
        from bench.inspect_bench import run_inspect

        run_inspect(
            sizes=[int(s) for s in _csv(args.sizes)],
            decode_rows=args.decode_rows,
            base_images=args.base_images,
            workdir=workdir,
            results_dir=args.results,
            repeats=args.repeats,
            workers=args.workers,
            command=command,
            timeout=args.timeout,
            distinct=args.distinct,
        )
    elif args.command == "http":
        from bench import http_bench

        corpora = {name: n for name, n in (("small", args.n_small), ("photos", args.n_photos)) if n}
        http_bench.run_http(
            corpora=corpora,
            latencies=[float(x) for x in _csv(args.latencies)],
            repeats=args.repeats,
            workdir=workdir,
            results_dir=args.results,
            workers=args.workers,
            command=command,
            memory_sizes=[int(s) for s in _csv(args.memory_sizes)],
            timeout=args.timeout,
        )
    elif args.command in ("webdataset", "llava"):
        from bench.source_tars_llava import run_source_bench

        run_source_bench(
            args.command,
            n=args.n,
            workdir=workdir,
            results_dir=args.results,
            workers=args.workers,
            command=command,
            repeats=args.repeats,
            base_images=args.base_images,
            timeout=args.timeout,
        )
    elif args.command == "dataset":
        from bench.source_dataset import run_source_dataset

        run_source_dataset(
            n=args.n,
            repeats=args.repeats,
            base_images=args.base_images,
            workdir=workdir,
            results_dir=args.results,
            workers=args.workers,
            command=command,
            timeout=args.timeout,
            memory_factor=args.memory_factor,
        )
    else:
        report.plot_throughput(args.results)
        report.write_results_md(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

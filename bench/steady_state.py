"""Steady state: the engine with Ray already running, against `limit`, in the same batch.

`python -m bench run` times whole commands, so each engine figure there includes a one-off cost
of a few seconds (Ray start-up, worker start-up, `datasets` import, shutdown). This separates
that fixed cost from throughput: Ray is started once in this process, one small conversion
warms the workers, then full conversions (in-process, through the CLI's own `convert`)
alternate with the `limit` command.

    python -m bench.steady_state [--n 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.corpora import build_corpus
from bench.measure import run_measured
from bench.report import machine_info, today, write_json
from bench.tools import REPO_ROOT, SCENARIOS, tool_command

log = logging.getLogger("bench.steady_state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "bench" / ".cache")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from engine.config import ConvertOptions
    from engine.driver import convert

    cores = os.cpu_count() or 1
    corpus = build_corpus("photos", args.n, args.workdir)
    scenario = SCENARIOS["photos-parquet"]
    scratch = Path(tempfile.mkdtemp(prefix="steady-", dir=args.workdir))
    warm_manifest = scratch / "warm.jsonl"
    warm_manifest.write_text("".join(corpus.manifest.read_text().splitlines(keepends=True)[: 4 * cores]))
    ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.ERROR)

    def engine_run(manifest: Path) -> float:
        started = time.perf_counter()
        convert(
            ConvertOptions(
                manifest=str(manifest),
                config=str(corpus.config),
                out=str(scratch / "out"),
                overwrite=True,
                quiet=True,
            )
        )
        return time.perf_counter() - started

    engine_run(warm_manifest)  # starts and warms the workers
    engine_s, limit_s = [], []
    for repeat in range(args.repeats):
        engine_s.append(engine_run(corpus.manifest))
        m = run_measured(
            tool_command("limit", scenario, corpus, scratch / "limit", workers=cores), cwd=REPO_ROOT
        )
        limit_s.append(m.wall_seconds)
        log.info("repeat %d: engine (Ray warm) %.2f s, limit %.2f s", repeat + 1, engine_s[-1], limit_s[-1])
    ray.shutdown()
    engine_ips, limit_ips = args.n / statistics.median(engine_s), args.n / statistics.median(limit_s)
    payload = {
        "kind": "steady-state",
        "n": args.n,
        "repeats": args.repeats,
        "machine": machine_info(),
        "command": f"python -m bench.steady_state --n {args.n} --repeats {args.repeats}",
        "engine_warm_seconds": engine_s,
        "limit_seconds": limit_s,
        "engine_warm_images_per_second": engine_ips,
        "limit_images_per_second": limit_ips,
        "ratio_engine_warm_vs_limit": engine_ips / limit_ips,
    }
    write_json(args.results, f"{today()}-steady-state", payload)
    log.info(
        "engine with Ray warm: %.1f img/s, limit %.1f img/s, ratio %.2f",
        engine_ips,
        limit_ips,
        engine_ips / limit_ips,
    )


if __name__ == "__main__":
    main()

"""The driver: plan the manifest, run the units, cut and write the final shards, then write the
accounting (rejects.jsonl, stats.json) and the layout's metadata. Knows no Ray and no CLI."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from engine import workdir
from engine.config import ConvertOptions, TaskConfig, parse_task_config
from engine.errors import ConfigError, RejectRatioExceeded, UsageError
from engine.imaging import configure_pillow
from engine.layouts import layout_for, write_shard
from engine.layouts.base import SeenColumns
from engine.layouts.plan import cut_shards
from engine.pipeline import UnitContext, process_unit, start_fetching
from engine.progress import NullProgress, Progress
from engine.runners import make_runner
from engine.runners.base import Runner, run_item
from engine.sinks.shards import ShardResult, ShardSpec
from engine.sinks.store import Finisher, Store
from engine.sources import Source, location, source_for
from engine.stats import RunStats, merge_image_changes
from engine.update.ids import row_ids_from_parts, write_row_ids
from engine.versions import versions
from engine.workdir import (
    UnitResult,
    check_finished_matches,
    check_out,
    clear_out,
    is_finished,
    load_unit_result,
    run_fingerprint,
    run_state,
)

log = logging.getLogger(__name__)
SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}
UNIT_GRAIN = 16  # the manifest is planned in units of this many rows, then coalesced


def unit_rows_for(num_rows: int, workers: int) -> int:
    """About 16 units per worker, so the last units leave little idle time, between 16 and 256 rows."""
    return max(UNIT_GRAIN, min(256, -(-num_rows // (max(workers, 1) * 16))))


@dataclass(frozen=True)
class ConvertResult:
    out: str
    stats: dict[str, Any]


def load_task_config(path: str) -> TaskConfig:
    try:
        with location.open_binary(path) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    return parse_task_config(raw, os.path.basename(path) or path)


EXTRAS = {"s3": "s3", "s3a": "s3"}  # protocol -> the engine's pip extra that installs its filesystem


def check_filesystems(opts: ConvertOptions) -> None:
    """Every fsspec URL among the options has its filesystem package installed: else one line
    naming the package and how to install it, before anything is read or written."""
    from fsspec.registry import get_filesystem_class, known_implementations

    for option, where in (
        ("--manifest", opts.manifest),
        ("--config", opts.config),
        ("--out", opts.out),
        ("--base-path", opts.base_path),
    ):
        if not where or not location.is_url(where) or where.startswith("file://"):
            continue
        protocol = where.split("://", 1)[0].lower()
        try:
            get_filesystem_class(protocol)
        except ValueError:
            raise UsageError(f"{option} {where}: unknown protocol {protocol!r}") from None
        except ImportError as exc:
            package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
            if package == "fsspec":  # built into fsspec (http, ...): its own message names what it lacks
                raise UsageError(f"{option} {where}: {exc}") from None
            extra = EXTRAS.get(protocol)
            how = (
                f"pip install 'engine[{extra}]' (or pip install {package})"
                if extra
                else f"pip install {package}"
            )
            raise UsageError(
                f"{option} {where} needs the {package} package, which is not installed: {how}"
            ) from None


def unit_context(
    opts: ConvertOptions, task: TaskConfig | None, store: Store, embedded: bool, source: Source | None = None
) -> UnitContext:
    source = source or source_for(opts)
    layout = layout_for(opts)
    base = opts.base_path or source.default_base()
    return UnitContext(
        source=source,
        layout=layout,
        schema_json=task.schema_json if task else None,
        image=opts.image,
        fetch=opts.fetch,
        default_split=opts.split,
        base=base,
        store=store,
        user_content=layout.user_content(task),
        system_prompt=opts.system_prompt,
        # on a cluster, another node writes the shard and may not see the same files
        reference_sources=embedded,
    )


def convert(opts: ConvertOptions, progress: Progress | None = None, command: str = "") -> ConvertResult:
    started = time.perf_counter()
    configure_pillow(opts.image.max_pixels)  # the driver's threads transform images too
    progress = progress or NullProgress()
    check_filesystems(opts)
    task = load_task_config(opts.config) if opts.config else None
    source = source_for(opts)
    source.check()  # also "manifest not found"
    store = Store(opts.out)
    if opts.resume and is_finished(store):
        stats_doc = check_finished_matches(store, opts, task, source.sha256())
        progress.message(f"engine: {opts.out} is already complete; nothing to resume")
        return ConvertResult(out=opts.out, stats=stats_doc)
    replaced = check_out(store, opts.overwrite, opts.resume)
    stats = RunStats()
    results: list[UnitResult] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.closing(source))  # its per-process look-ahead state goes with the run
        runner = make_runner(opts)
        ctx = unit_context(opts, task, store, runner.embedded, source)
        # only when the driver's threads take the first units (not on a cluster, nor with Ray
        # started at once), and a resumed run's first rows are usually done already; the first
        # requests go out before the old output is removed (--overwrite), which leaves the GIL
        if runner.driver_takes_first_units and not opts.resume:
            start_fetching(ctx)
        clear_out(store, replaced)
        stack.enter_context(runner)  # an embedded Ray starts only when the work is worth it
        grain = min(UNIT_GRAIN, opts.unit_rows or UNIT_GRAIN)
        plan = source.plan(grain)
        unit_rows = run_state(
            store, opts, task, plan.sha256, opts.unit_rows or unit_rows_for(plan.num_rows, runner.num_workers)
        )
        plan = plan.coalesce(unit_rows)
        log.debug(
            "planned %d rows into %d units (%d duplicates) at %.2f s",
            plan.num_rows,
            len(plan.units),
            plan.num_duplicates,
            time.perf_counter() - started,
        )
        progress.start(plan.num_rows, "converting")
        todo = []
        for unit in plan.units:
            done = load_unit_result(store, unit.index) if opts.resume else None
            if done is None:
                todo.append(unit)
                continue
            results.append(done)
            stats.add_unit(done)
            progress.advance(done.num_rows, sum(done.rejected.values()))
        if opts.resume:
            log.info(
                "resuming: %d of %d units already complete", len(plan.units) - len(todo), len(plan.units)
            )
        prewarm = True
        for result in runner.map_unordered(process_unit, [(unit, ctx) for unit in todo]):
            results.append(result)
            if prewarm and result.num_written:
                # decoding threads leave the GIL to a background import; pass-through ones hold
                # it, and there the import costs them more than it saves at the end (bench/GAP.md)
                if result.num_passthrough * 2 < result.num_written:
                    _prewarm_datasets()
                prewarm = False
            stats.add_unit(result)
            progress.advance(result.num_rows, sum(result.rejected.values()))
        progress.close()
        results.sort(key=lambda r: r.index)
        log.debug("units done at %.2f s", time.perf_counter() - started)
        specs, features = plan_shards(results, opts, store)
        log.debug("shards planned at %.2f s; writing %d", time.perf_counter() - started, len(specs))
        ctx.layout.on_write_start(store)
        progress.start(len(specs), "writing shards", unit="shard")
        shards: list[ShardResult] = []
        for shard in _write_shards(runner, specs):
            shards.append(shard)
            stats.add_shard(shard)
            progress.advance(1, 0)
        progress.close()
    log.debug("shards done at %.2f s", time.perf_counter() - started)
    stats.check()
    stats.seconds = time.perf_counter() - started
    summary = finish(
        store,
        opts,
        task,
        results,
        shards,
        features,
        stats,
        command,
        workers=runner.num_workers,
        fingerprint=run_fingerprint(opts, task, plan.sha256),
    )
    log.debug("finished at %.2f s", time.perf_counter() - started)
    workdir.remove(store)
    progress.message(f"engine: {stats.summary()} -> {opts.out}")
    if stats.reject_ratio > opts.max_reject_ratio:
        raise RejectRatioExceeded(
            f"{stats.num_rejected:,} of {stats.num_input_rows:,} rows rejected ({stats.reject_ratio:.1%}), "
            f"over --max-reject-ratio {opts.max_reject_ratio:g}; "
            f"see {os.path.join(opts.out, 'rejects.jsonl')}"
        )
    return ConvertResult(out=opts.out, stats=summary)


def _write_shards(runner: Runner, specs: list[ShardSpec]) -> Iterator[ShardResult]:
    """Write the final shards: on Ray's workers once Ray runs, else here, one shard at a time.

    Here, one writer keeps two cores busy (it reads the next row group while it writes one,
    see ``write_row_groups``), and each shard is fsynced and renamed in a background thread
    while the next one is written, so memory does not depend on how many shards a job has
    (bench/GAP.md). On Ray, shards are written where Ray places them, in parallel."""
    if not runner.in_process:
        yield from runner.map_unordered(write_shard, [(s,) for s in specs], local_first=True)
        return
    with Finisher() as finisher:
        for spec in specs:
            yield run_item(write_shard, (spec, finisher))


def _prewarm_datasets() -> None:
    """``datasets`` (needed only for the schema and metadata at the end) takes about a second to
    import: do it in the background while the images are processed."""
    import sys
    import threading

    if "datasets" not in sys.modules:

        def load() -> None:
            t = time.perf_counter()
            __import__("datasets")
            log.debug("datasets imported in the background in %.2f s", time.perf_counter() - t)

        threading.Thread(target=load, name="import-datasets", daemon=True).start()


def ordered_splits(names: Sequence[str]) -> list[str]:
    return sorted(set(names), key=lambda n: (SPLIT_ORDER.get(n, 99), n))


def plan_shards(results: list[UnitResult], opts: ConvertOptions, store: Store) -> tuple[list[ShardSpec], Any]:
    """Cut every split's rows (in line order) into shards by size and row cap.

    Uses only per-row byte sizes, so the cut is the same whatever the number of units or workers.
    """
    layout = layout_for(opts)
    features = layout.features(SeenColumns.of(results))
    splits = ordered_splits([s for r in results for s in r.sizes]) or [opts.split]
    segments = {split: [(r.part, r.sizes[split]) for r in results if split in r.sizes] for split in splits}
    return cut_shards(
        segments, opts, store, layout, features, path_prefix=layout.path_prefix(store)
    ), features


def finish(
    store: Store,
    opts: ConvertOptions,
    task: TaskConfig | None,
    results: list[UnitResult],
    shards: list[ShardResult],
    features,
    stats: RunStats,
    command: str,
    workers: int,
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write what sits beside the data: config.json, rejects.jsonl, the layout's metadata, and
    last stats.json, so a folder with stats.json is a finished dataset."""
    if task is not None:
        store.write_bytes("config.json", task.raw)
    with store.writing("rejects.jsonl") as path, open(path, "wb") as dst:
        for r in results:  # unit order is line order
            if r.rejects:
                dst.write(store.read_bytes(r.rejects))

    num_bytes: dict[str, int] = {}
    for r in results:
        for split, sizes in r.sizes.items():
            num_bytes[split] = num_bytes.get(split, 0) + int(sizes.sum())
    splits = split_summary(shards, num_bytes)
    doc = stats.to_dict()
    doc["images"] = merge_image_changes(r.images for r in results)  # results in line order: ids too
    layout = layout_for(opts)
    layout.on_write_complete(
        store, splits, shards, features, doc, command, task.instructions if task else None
    )
    if layout.keeps_row_ids:  # how `engine update` finds a row of a layout without an id column
        write_row_ids(store, row_ids_from_parts(store, results, list(splits)))
    doc.update(
        {
            "splits": splits,
            "num_units": len(results),
            "workers": workers,
            "options": opts.to_dict(),
            "command": command,
            "versions": versions(),
            "fingerprint": fingerprint,
        }
    )
    store.write_bytes("stats.json", orjson.dumps(doc, option=orjson.OPT_INDENT_2))  # last: the commit marker
    return doc


def split_summary(shards: list[ShardResult], num_bytes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Rows, shards, data and file bytes, and files of each split (in split order)."""
    splits: dict[str, dict[str, Any]] = {}
    for shard in sorted(shards, key=lambda s: s.path):
        s = splits.setdefault(
            shard.split, {"num_rows": 0, "num_shards": 0, "num_bytes": 0, "file_bytes": 0, "files": []}
        )
        s["num_rows"] += shard.num_rows
        s["num_shards"] += 1
        s["file_bytes"] += shard.num_bytes
        s["files"].append(shard.path)
    for split, n in num_bytes.items():
        splits[split]["num_bytes"] += n
    return {name: splits[name] for name in ordered_splits(list(splits))}

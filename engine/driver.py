"""The driver: plan the manifest, run the units, cut and write the final shards, then write the
accounting (rejects.jsonl, stats.json) and the layout's metadata. Knows no Ray and no CLI."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from engine.config import ConvertOptions, FetchOptions, ImageOptions, TaskConfig, parse_task_config
from engine.conversation import render_prompt, user_content
from engine.errors import ConfigError, RejectRatioExceeded, UsageError
from engine.pipeline import UnitContext, UnitResult, load_unit_result, process_unit
from engine.progress import NullProgress, Progress
from engine.records import extraction_features, order_meta_keys, packed_features
from engine.runners import make_runner
from engine.runners.base import Runner, run_item
from engine.sinks.arrow import arrow_shard_path, write_dataset_dict, write_save_to_disk_metadata
from engine.sinks.card import dataset_card
from engine.sinks.chunking import plan_chunks
from engine.sinks.store import WORK_DIR, Finisher, Store
from engine.sinks.parquet import parquet_shard_path
from engine.sinks.shards import Piece, ShardResult, ShardSpec, write_shard
from engine.sources import Source, location, source_for
from engine.stats import RunStats, merge_image_changes
from engine.update.ids import row_ids_from_parts, write_row_ids
from engine.versions import versions

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

    for option, where in (("--manifest", opts.manifest), ("--config", opts.config), ("--out", opts.out),
                          ("--base-path", opts.base_path)):
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
            how = f"pip install 'engine[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
            raise UsageError(f"{option} {where} needs the {package} package, which is not installed: {how}") from None


def prepare_out(store: Store, overwrite: bool, resume: bool) -> None:
    """Check the output folder is free (or may be replaced, or resumed)."""
    if not store.remote and os.path.exists(store.root) and not os.path.isdir(store.root):
        raise UsageError(f"--out {store.root} exists and is not a folder")
    entries = store.entries()
    if entries:
        if resume:
            if WORK_DIR not in entries:
                raise UsageError(f"cannot resume: {store.root} holds no interrupted run (no {WORK_DIR}/ folder)")
        elif not overwrite:
            raise UsageError(f"output folder {store.root} is not empty; pass --overwrite to replace its contents, "
                             "or --resume to finish an interrupted run")
        else:
            for entry in entries:
                store.remove(entry)
    store.make_dirs(f"{WORK_DIR}/parts")


def is_finished(store: Store) -> bool:
    """stats.json is written last and the work folder removed after it: both say 'done'."""
    return store.is_file("stats.json") and not store.exists(WORK_DIR)


def run_state(store: Store, opts: ConvertOptions, task: TaskConfig | None, manifest_sha256: str,
              unit_rows: int) -> int:
    """Record (or, when resuming, check) what this run produces; returns the unit size to use.

    A resumed run must produce the same dataset: same output-defining options, same manifest
    and config bytes. The unit size is kept, so completed units line up with the plan.
    """
    rel = f"{WORK_DIR}/run.json"
    fingerprint = run_fingerprint(opts, task, manifest_sha256)
    if store.exists(rel):
        previous = orjson.loads(store.read_bytes(rel))
        if previous["fingerprint"] != fingerprint:
            changed = sorted(_differences(previous["fingerprint"], fingerprint))
            raise UsageError(f"cannot resume: this run differs from the interrupted one in {', '.join(changed)}; "
                             "resuming would mix two datasets (use --overwrite to start again)")
        return int(previous["unit_rows"])
    store.write_bytes(rel, orjson.dumps({"fingerprint": fingerprint, "unit_rows": unit_rows}, option=orjson.OPT_INDENT_2))
    return unit_rows


def run_fingerprint(opts: ConvertOptions, task: TaskConfig | None, manifest_sha256: str) -> dict[str, Any]:
    """What decides the dataset's content: the output-defining options and the inputs' bytes."""
    fingerprint = {"options": opts.output_defining(), "manifest_sha256": manifest_sha256,
                   "config_sha256": hashlib.sha256(task.raw).hexdigest() if task else None}
    return orjson.loads(orjson.dumps(fingerprint))


def check_finished_matches(store: Store, opts: ConvertOptions, task: TaskConfig | None,
                           source: Source | None = None) -> dict[str, Any]:
    """``--resume`` on a finished output: its stats, if it is the dataset this run would make;
    otherwise a usage error naming what differs, so the user never takes the old dataset for
    the one they asked for."""
    stats = orjson.loads(store.read_bytes("stats.json"))
    fingerprint = run_fingerprint(opts, task, (source or source_for(opts)).sha256())
    # an output from before fingerprints were kept in stats.json: compare its resolved options
    previous = stats.get("fingerprint") or {**fingerprint, "options": _output_defining(stats.get("options", {}))}
    for doc in (previous, fingerprint):  # a finished dataset may have been moved: still the same one
        doc["options"].pop("out", None)
    changed = sorted(_differences(previous, fingerprint))
    if changed:
        raise UsageError(f"cannot resume: {opts.out} is a finished dataset made with a different {', '.join(changed)}; "
                         "use --overwrite to replace it")
    return stats


def _output_defining(options: dict[str, Any]) -> dict[str, Any]:
    """The output-defining part of a stats.json's resolved options. An option the older engine
    did not have is None, so it shows as a difference: that engine wrote without it."""
    try:
        doc = ConvertOptions(**{**options, "image": ImageOptions(**options["image"]),
                                "fetch": FetchOptions(**options["fetch"])}).output_defining()
    except (TypeError, KeyError, UsageError):  # options this engine cannot read
        return options
    for key, value in doc.items():
        if key not in options:
            doc[key] = None
        elif isinstance(value, dict):
            doc[key] = {k: v if k in options[key] else None for k, v in value.items()}
    return doc


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(root)"]


def unit_context(opts: ConvertOptions, task: TaskConfig | None, store: Store, embedded: bool,
                 source: Source | None = None) -> UnitContext:
    source = source or source_for(opts)
    user = None
    if task is not None and opts.layout == "arrow":
        user = user_content(render_prompt(opts.prompt_template, task.instructions, task.json_schema),
                            opts.attachment_token, position=opts.attachment_position)
    base = opts.base_path or source.default_base()
    return UnitContext(source=source, layout=opts.layout, schema_json=task.schema_json if task else None, image=opts.image,
                       fetch=opts.fetch, default_split=opts.split, base=base, store=store,
                       user_content=user, system_prompt=opts.system_prompt, attachment_token=opts.attachment_token,
                       images_as_paths=opts.images_as_paths,
                       # on a cluster, another node writes the shard and may not see the same files
                       reference_sources=embedded)


def convert(opts: ConvertOptions, progress: Progress | None = None, command: str = "") -> ConvertResult:
    started = time.perf_counter()
    progress = progress or NullProgress()
    check_filesystems(opts)
    task = load_task_config(opts.config) if opts.config else None
    source = source_for(opts)
    source.check()  # also "manifest not found"
    store = Store(opts.out)
    if opts.resume and is_finished(store):
        stats_doc = check_finished_matches(store, opts, task, source)
        progress.message(f"engine: {opts.out} is already complete; nothing to resume")
        return ConvertResult(out=opts.out, stats=stats_doc)
    prepare_out(store, opts.overwrite, opts.resume)
    stats = RunStats()
    results: list[UnitResult] = []
    with make_runner(opts) as runner, _closing(source):  # an embedded Ray starts only when the work is worth it
        ctx = unit_context(opts, task, store, runner.embedded, source)
        grain = min(UNIT_GRAIN, opts.unit_rows or UNIT_GRAIN)
        plan = source.plan(grain)
        unit_rows = run_state(store, opts, task, plan.sha256,
                              opts.unit_rows or unit_rows_for(plan.num_rows, runner.num_workers))
        plan = plan.coalesce(unit_rows)
        log.debug("planned %d rows into %d units (%d duplicates) at %.2f s", plan.num_rows, len(plan.units),
                  plan.num_duplicates, time.perf_counter() - started)
        _prewarm_datasets()  # after planning, which it would slow down
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
            log.info("resuming: %d of %d units already complete", len(plan.units) - len(todo), len(plan.units))
        for result in runner.map_unordered(process_unit, [(unit, ctx) for unit in todo]):
            results.append(result)
            stats.add_unit(result)
            progress.advance(result.num_rows, sum(result.rejected.values()))
        progress.close()
        results.sort(key=lambda r: r.index)
        log.debug("units done at %.2f s", time.perf_counter() - started)
        specs, features = plan_shards(results, opts, store)
        log.debug("shards planned at %.2f s; writing %d", time.perf_counter() - started, len(specs))
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
    summary = finish(store, opts, task, results, shards, features, stats, command, workers=runner.num_workers,
                     fingerprint=run_fingerprint(opts, task, plan.sha256))
    log.debug("finished at %.2f s", time.perf_counter() - started)
    store.remove(WORK_DIR)
    progress.message(f"engine: {stats.summary()} -> {opts.out}")
    if stats.reject_ratio > opts.max_reject_ratio:
        raise RejectRatioExceeded(
            f"{stats.num_rejected:,} of {stats.num_input_rows:,} rows rejected ({stats.reject_ratio:.1%}), "
            f"over --max-reject-ratio {opts.max_reject_ratio:g}; see {os.path.join(opts.out, 'rejects.jsonl')}")
    return ConvertResult(out=opts.out, stats=summary)


@contextlib.contextmanager
def _closing(source: Source) -> Iterator[Source]:
    """The source's per-process state (look-ahead) goes when the run ends, however it ends."""
    try:
        yield source
    finally:
        source.close()


def _write_shards(runner: Runner, specs: list[ShardSpec]) -> Iterator[ShardResult]:
    """Write the final shards: on Ray's workers once Ray runs, else here, one shard at a time.

    Here, one writer keeps two cores busy (it reads the next row group while it writes one,
    see ``write_row_groups``), and each shard is fsynced and renamed in a background thread
    while the next one is written. Memory then does not depend on how many shards a job has:
    two writers that fsynced themselves held four row groups at a 50k-row pass-through job
    and one at a 1k-row job (one shard). A/B on 50k rows of 150 KB: 19.5-23.0 s against
    18.6-23.8 s, peak 249-257 MB against 269-272 MB; at 1k 227-240 MB against 233-237 MB. On
    Ray, shards are written where Ray places them, in parallel."""
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


def layout_features(results: list[UnitResult], opts: ConvertOptions):
    """The output ``datasets.Features``, known once every unit has reported what it saw."""
    if opts.layout == "parquet":
        meta_keys = tuple(order_meta_keys({k for r in results for k in r.meta_keys}))
        return features_for(opts, meta_keys, ""), meta_keys, ""
    columns = {c for r in results for c in r.text_columns}
    if len(columns) > 1:
        raise UsageError("the manifest mixes 'text' (pretraining) and 'conversations' rows; "
                         "convert them into separate datasets (then run again with --overwrite)")
    text_column = columns.pop() if columns else "conversations"
    return features_for(opts, (), text_column), (), text_column


def features_for(opts: ConvertOptions, meta_keys: tuple[str, ...], text_column: str):
    """The layout's ``datasets.Features`` for these options (``engine update`` builds them too)."""
    if opts.layout == "parquet":
        return extraction_features(list(meta_keys))
    return packed_features(text_column=text_column, images_as_paths=opts.images_as_paths,
                           modality_feature=opts.modality_feature)


def fs_image_prefix(opts: ConvertOptions, store: Store) -> str:
    """What goes before the stored ``images/...`` paths: nothing (relative to OUT), OUT itself
    (--absolute-paths), or OUT's path from --paths-relative-to, so datasets in several folders
    share one trainer base_path."""
    if opts.absolute_paths:
        return store.root + os.sep
    if opts.paths_relative_to:
        rel = os.path.relpath(store.root, os.path.abspath(opts.paths_relative_to))
        return "" if rel == os.curdir else rel + os.sep
    return ""


def plan_shards(results: list[UnitResult], opts: ConvertOptions, store: Store) -> tuple[list[ShardSpec], Any]:
    """Cut every split's rows (in line order) into shards by size and row cap.

    Uses only per-row byte sizes, so the cut is the same whatever the number of units or workers.
    """
    features, meta_keys, text_column = layout_features(results, opts)
    prefix = fs_image_prefix(opts, store) if opts.images_as_paths else ""
    splits = ordered_splits([s for r in results for s in r.sizes]) or [opts.split]
    segments = {split: [(r.part, r.sizes[split]) for r in results if split in r.sizes] for split in splits}
    return cut_shards(segments, opts, store, features, meta_keys, text_column, path_prefix=prefix), features


def cut_shards(segments: dict[str, list[tuple[str, np.ndarray]]], opts: ConvertOptions, store: Store, features,
               meta_keys: tuple[str, ...], text_column: str, reader=None, path_prefix: str = "") -> list[ShardSpec]:
    """The shards of each split (in the given order) from its segments: (part file, the byte size
    of each of its rows in this split). ``reader`` reads a piece when it is not a part file
    (``engine update`` reads the rows of a finished dataset)."""
    schema = features.arrow_schema
    specs: list[ShardSpec] = []
    for split, split_segments in segments.items():
        sizes = np.concatenate([s for _, s in split_segments] or [np.zeros(0, np.int64)]).astype(np.int64)
        chunks = plan_chunks(sizes.tolist(), opts.max_shard_bytes, opts.shard_rows) or [(0, 0)]
        counts = [(part, len(s)) for part, s in split_segments]
        for index, (start, stop) in enumerate(chunks):
            if opts.layout == "parquet":
                relpath = parquet_shard_path(split, index, len(chunks))
            else:
                relpath = arrow_shard_path(split, index, len(chunks), nested=len(segments) > 1)
            specs.append(ShardSpec(layout=opts.layout, split=split, relpath=relpath,
                                   pieces=pieces_for(counts, start, stop), schema=schema, meta_keys=meta_keys,
                                   text_column=text_column, images_as_paths=opts.images_as_paths,
                                   row_groups=tuple(b - a for a, b in plan_chunks(
                                       sizes[start:stop].tolist(), opts.row_group_bytes, opts.row_group_rows)),
                                   store=store, path_prefix=path_prefix, reader=reader))
    return specs


def pieces_for(segments: list[tuple[str, int]], start: int, stop: int) -> tuple[Piece, ...]:
    """Map the global row range ``[start, stop)`` onto (part, local start, local stop) pieces."""
    pieces, offset = [], 0
    for part, count in segments:
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            pieces.append(Piece(part, lo - offset, hi - offset))
        offset += count
        if offset >= stop:
            break
    return tuple(pieces)


def finish(store: Store, opts: ConvertOptions, task: TaskConfig | None, results: list[UnitResult],
           shards: list[ShardResult], features, stats: RunStats, command: str, workers: int,
           fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
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
    write_layout_metadata(store, opts.layout, features, splits, shards, doc, command,
                          task.instructions if task else None)
    if opts.layout == "arrow":  # how `engine update` finds a packed row by its id
        write_row_ids(store, row_ids_from_parts(store, results, list(splits)))
    doc.update({"splits": splits, "num_units": len(results), "workers": workers, "options": opts.to_dict(),
                "command": command, "versions": versions(), "fingerprint": fingerprint})
    store.write_bytes("stats.json", orjson.dumps(doc, option=orjson.OPT_INDENT_2))  # last: the commit marker
    return doc


def split_summary(shards: list[ShardResult], num_bytes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Rows, shards, data and file bytes, and files of each split (in split order)."""
    splits: dict[str, dict[str, Any]] = {}
    for shard in sorted(shards, key=lambda s: s.path):
        s = splits.setdefault(shard.split, {"num_rows": 0, "num_shards": 0, "num_bytes": 0, "file_bytes": 0, "files": []})
        s["num_rows"] += shard.num_rows
        s["num_shards"] += 1
        s["file_bytes"] += shard.num_bytes
        s["files"].append(shard.path)
    for split, n in num_bytes.items():
        splits[split]["num_bytes"] += n
    return {name: splits[name] for name in ordered_splits(list(splits))}


def write_layout_metadata(store: Store, layout: str, features, splits: dict[str, dict[str, Any]],
                          shards: list[ShardResult], doc: dict[str, Any], command: str,
                          instructions: str | None, title: str | None = None) -> None:
    """The dataset card (Parquet), or the save_to_disk metadata of each split (packed)."""
    if layout == "parquet":
        card = dataset_card(features=features, splits=splits, data_glob="data/{split}-*",
                            title=title or store.root.rstrip("/").rsplit("/", 1)[-1], stats=doc, command=command,
                            instructions=instructions)
        store.write_bytes("README.md", card.encode())
        return
    nested = len(splits) > 1
    for name, s in splits.items():
        write_save_to_disk_metadata(store, name, [x for x in shards if x.split == name], features,
                                    s["num_bytes"], nested)
    if nested:
        write_dataset_dict(store, list(splits))
    # the folder each split's trainer `packed_path` must name: with several splits, OUT/<split>
    # (OUT itself would load dataset_dict.json's folder as a one-row dataset)
    doc["packed_paths"] = {name: store.path(name) if nested else store.root for name in splits}

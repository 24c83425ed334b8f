"""``engine update OUT --retry-rejected``: run the rows that were rejected at some stages (a
timeout, a 503, a host down for an hour) again, and put each one that now succeeds at its
original place, so the data files are those of a fresh ``convert`` in which it had succeeded.

The rows are re-read from the dataset's own manifest (its digest, in ``stats.json``, is checked)
through a *sparse copy* of it: the retried lines at their line numbers, every other line blank,
so line numbers (and the ids a trainer-style row takes from them) are the original ones. The
new rows are spliced between the old ones by manifest line, and the shards are cut again as
``convert`` cuts them. A row is written or rejected, never both: rows that fail again keep
their place in ``rejects.jsonl`` with the new reason and an ``attempts`` count.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from engine.driver import (
    UNIT_GRAIN,
    _prewarm_datasets,
    ordered_splits,
    split_summary,
    unit_context,
    unit_rows_for,
)
from engine.errors import UsageError
from engine.imaging import configure_pillow
from engine.layouts import layout_for
from engine.layouts.base import SeenColumns
from engine.layouts.plan import cut_shards
from engine.pipeline import process_unit
from engine.progress import NullProgress, Progress
from engine.runners import make_runner
from engine.sinks.store import Store
from engine.sources import detect_kind, location
from engine.sources.jsonl import BOM, parse_row
from engine.stats import merge_image_changes
from engine.update.commit import Staging, crash_point
from engine.update.core import Report, commit_staged, scan, write_shards
from engine.update.dataset import Dataset, convert_options, dataset_layout, open_dataset
from engine.update.ids import ROW_IDS_SCHEMA, part_row_ids, write_row_ids
from engine.update.inputs import Inputs, UpdateOptions
from engine.update.rows import EDIT_SUFFIX, OFFSET_MARK, read_rows, write_edit_file
from engine.versions import versions
from engine.workdir import EDITS_DIR, RETRY_MANIFEST

RETRYABLE = ("fetch", "decode", "validate", "write")  # a manifest or duplicate reject would fail the same way
SPARSE = RETRY_MANIFEST


def parse_stages(text: str) -> tuple[str, ...]:
    stages = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in stages if s not in RETRYABLE]
    if not stages or bad:
        raise UsageError(
            f"--stages {text!r}: retryable stages are {', '.join(RETRYABLE)}"
            + (f" (not {', '.join(bad)})" if bad else "")
        )
    return stages


def retry(opts: UpdateOptions, progress: Progress | None = None, command: str = "") -> dict[str, Any]:
    configure_pillow()
    started = time.perf_counter()
    progress = progress or NullProgress()
    store = Store(opts.out)
    staging = Staging(store)
    staging.lock()
    try:
        return _retry(opts, progress, command, store, staging, started)
    finally:
        staging.unlock()


def _retry(
    opts: UpdateOptions, progress: Progress, command: str, store: Store, staging: Staging, started: float
) -> dict[str, Any]:
    # the retry's identity: the dataset it starts from and the stages
    # (a crashed commit of it is only finished)
    before = store.read_bytes("stats.json") if store.is_file("stats.json") else b""
    digest = hashlib.sha256(b"retry:" + ",".join(opts.stages).encode() + b"\n" + before).hexdigest()
    done = staging.recover()
    if done is not None:
        progress.message(f"engine: finished the update of {opts.out} that an earlier run left half-committed")
        if done == digest:
            return orjson.loads(store.read_bytes("stats.json"))
    ds = open_dataset(store)
    if ds.fs_image:  # a retried row's image name carries its line in a sparse manifest, not the dataset's
        raise UsageError(
            "engine update --retry-rejected does not handle fs-image datasets (--images-as-paths); "
            "convert the fixed manifest again"
        )
    _refuse_other_inputs(ds, opts)
    records = [
        orjson.loads(line)
        for line in (
            store.read_bytes("rejects.jsonl") if store.is_file("rejects.jsonl") else b""
        ).splitlines()
        if line.strip()
    ]
    # rows of the dataset's own manifest only (an --add manifest's rejects name their manifest)
    chosen = {
        rec["line"]: k
        for k, rec in enumerate(records)
        if rec.get("stage") in opts.stages and isinstance(rec.get("line"), int) and "manifest" not in rec
    }
    if not chosen:
        progress.message(
            f"engine: {opts.out} has no rejected rows at {', '.join(opts.stages)} to retry; nothing to do"
        )
        return ds.stats
    manifest, manifest_sha = _manifest(ds, opts)
    _prewarm_datasets()
    report = Report()
    scans = scan(ds, opts, Inputs(), ds.task, False, None, report)
    existing = {image_id for sc in scans for image_id in sc.ids}
    sparse, lines_of, taken = _sparse_manifest(
        manifest, set(chosen), existing, ds.options.get("split", "train")
    )
    next_store = staging.start(digest)
    crash_point("update-started")
    results = []
    config_path = store.path("config.json") if ds.task else None
    copts = convert_options(
        ds,
        out=next_store.root,
        quiet=True,
        overwrite=False,
        resume=False,
        workers=opts.workers,
        runner=opts.runner,
        config=config_path,
        manifest=next_store.path(SPARSE),
        input_format="jsonl",
        base_path=ds.options.get("base_path") or location.parent(manifest),
    )
    if sparse.strip():
        next_store.write_bytes(SPARSE, sparse)
        with make_runner(copts) as runner:
            ctx = unit_context(copts, ds.task, next_store, runner.embedded)
            plan = ctx.source.plan(UNIT_GRAIN)
            plan = plan.coalesce(unit_rows_for(plan.num_rows, runner.num_workers))
            progress.start(plan.num_rows, "retrying")
            for r in runner.map_unordered(process_unit, [(u, ctx) for u in plan.units]):
                results.append(r)
                progress.advance(r.num_rows, sum(r.rejected.values()))
            progress.close()
        results.sort(key=lambda r: r.index)
    new_rejects: dict[int, dict] = {}
    for r in results:
        if r.rejects:
            for raw in next_store.read_bytes(r.rejects).splitlines():
                doc = orjson.loads(raw)
                new_rejects[doc["line"]] = doc
    for line, image_id in taken.items():  # ids a later update added meanwhile: never written twice
        new_rejects[line] = {
            "line": line,
            "image_id": image_id,
            "stage": "duplicate",
            "reason": f"image_id {image_id!r} is already in the dataset (added by a later update)",
        }
    specs, features, num_bytes, row_ids = _plan(ds, copts, next_store, scans, results, lines_of)
    shards = write_shards(specs, progress)
    doc, counts = _finish(
        ds,
        opts,
        next_store,
        records,
        chosen,
        new_rejects,
        results,
        shards,
        features,
        num_bytes,
        row_ids,
        digest,
        {
            "manifest": {
                "path": os.path.basename(manifest) if "://" not in manifest else manifest,
                "sha256": manifest_sha,
            }
        },
        command,
        time.perf_counter() - started,
    )
    crash_point("update-staged")
    commit_staged(staging, ds, store, next_store, digest)
    progress.message(
        f"engine: retried {counts['retried']:,} rejected rows of {opts.out}: {counts['written']:,} "
        f"written, {counts['rejected_again']:,} rejected again (in rejects.jsonl)"
    )
    return doc


def _refuse_other_inputs(ds: Dataset, opts: UpdateOptions) -> None:
    """Rejected rows are rerun by their line in a sparse copy of a JSONL manifest: an input of
    another kind (a dataset, an image folder, tars, LLaVA JSON) has no such lines."""
    where = opts.manifest or ds.options.get("manifest")
    kind = ds.options.get("input_format") or (detect_kind(where) if where else None)
    if kind and kind != "jsonl":
        raise UsageError(
            f"engine update --retry-rejected reruns rows of a JSONL manifest, but {opts.out} was "
            f"converted from {kind} input {where}; fix the input and convert it again "
            "(or write the fixed rows as JSONL and pass them to --add)"
        )


def _manifest(ds: Dataset, opts: UpdateOptions) -> tuple[str, str]:
    """The manifest the dataset was made from (or --manifest, a moved copy), checked against the
    digest stats.json recorded."""
    path = opts.manifest or ds.options.get("manifest")
    expected = (ds.stats.get("fingerprint") or {}).get("manifest_sha256")
    if not path or not expected:
        raise UsageError(
            f"{opts.out}/stats.json records no manifest digest; it cannot tell which rows to retry"
        )
    digest = hashlib.sha256()
    try:
        with location.open_binary(path) as f:
            while block := f.read(2**20):
                digest.update(block)
    except FileNotFoundError:
        raise UsageError(
            f"the dataset's manifest {path} is not there; pass --manifest with its copy"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read manifest {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if digest.hexdigest() != expected:
        raise UsageError(
            f"manifest {path} is not the one the dataset was made from (its SHA-256 differs); "
            "pass --manifest with the original"
        )
    return path, expected


def _sparse_manifest(
    manifest: str, wanted: set[int], existing: set[str], default_split: str
) -> tuple[bytes, dict[str, int], dict[int, str]]:
    """The manifest with every line but the wanted ones blank (line numbers kept); the first line
    of every id (where its row sits in line order); wanted lines whose id the dataset already has."""
    out: list[bytes] = []
    first_line: dict[str, int] = {}
    taken: dict[int, str] = {}
    with location.open_binary(manifest) as f:
        for number, raw in enumerate(f, start=1):  # one line at a time: a manifest may be large
            raw = raw.rstrip(b"\n")
            if number == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                out.append(b"")
                continue
            row = parse_row(number, raw, base="", default_split=default_split)
            image_id = getattr(row, "image_id", None)
            if image_id is not None:
                first_line.setdefault(image_id, number)
            if number in wanted and image_id in existing:
                taken[number] = image_id
                out.append(b"")
            else:
                out.append(raw if number in wanted else b"")
    return b"\n".join(out), first_line, taken


def _effective_lines(ids: list[str], lines_of: dict[str, int]) -> np.ndarray:
    """Each old row's manifest line. The convert's rows come first, in line order; rows an --add
    appended (or replaced) after them have no place among them (infinite)."""
    lines = np.full(len(ids), np.inf)
    last = 0
    for i, image_id in enumerate(ids):
        line = lines_of.get(image_id)
        if line is None or line <= last:
            break
        lines[i] = last = line
    return lines


def _plan(ds: Dataset, copts, next_store: Store, scans, results: list, lines_of: dict[str, int]):
    splits = ordered_splits([sc.split for sc in scans] + [s for r in results for s in r.sizes])
    segments: dict[str, list[tuple[str, np.ndarray]]] = {}
    row_ids: list[pa.Table] = []
    layout = layout_for(copts)
    for split in splits:
        sources: list[str] = []
        src, local, sizes, ids, chars = [], [], [], [], []
        for k, sc in enumerate(scans):
            if sc.split != split or not len(sc.ids):
                continue
            rel = f"{EDITS_DIR}/{k:05d}{EDIT_SUFFIX}"
            write_edit_file(next_store, rel, ds.store.path(sc.rel), ds.layout, sc.keep, sc.texts, sc.sizes)
            n = len(sc.ids)
            src.append(np.full(n, len(sources)))
            sources.append(rel)
            local.append(np.arange(n))
            sizes.append(sc.sizes)
            ids += sc.ids
            chars.append(sc.text_chars)
        n_old = len(ids)
        old_lines = _effective_lines(ids, lines_of)
        new_lines = []
        for r in results:
            if split not in r.sizes:
                continue
            t = part_row_ids(next_store, r.part, split, with_line=True)
            n = t.num_rows
            src.append(np.full(n, len(sources)))
            sources.append(r.part)
            local.append(np.arange(n))
            sizes.append(t.column("num_bytes").to_numpy().astype(np.int64))
            ids += t.column("image_id").to_pylist()
            chars.append(t.column("text_chars").to_numpy().astype(np.int64))
            new_lines.append(t.column("line").to_numpy())
        if not ids:
            continue
        new = np.concatenate(new_lines) if new_lines else np.zeros(0, np.int64)
        # an old row keeps its rank; a new row goes before the first old row with a later line
        primary = np.concatenate([np.arange(n_old), np.searchsorted(old_lines, new, side="left")])
        secondary = np.concatenate([np.zeros(n_old), np.full(len(new), -1)])
        tertiary = np.concatenate([np.zeros(n_old), new])
        order = np.lexsort((tertiary, secondary, primary))
        src_all, local_all = np.concatenate(src)[order], np.concatenate(local)[order]
        size_all = np.concatenate(sizes).astype(np.int64)[order]
        parts = []
        start = 0
        for i in range(1, len(order) + 1):  # runs of consecutive rows of one source are one piece
            if i == len(order) or src_all[i] != src_all[i - 1] or local_all[i] != local_all[i - 1] + 1:
                first = int(local_all[start])
                rel = sources[src_all[start]] + (f"{OFFSET_MARK}{first}" if first else "")
                parts.append((rel, size_all[start:i]))
                start = i
        segments[split] = parts
        if layout.keeps_row_ids:
            row_ids.append(
                pa.table(
                    {
                        "split": [split] * len(order),
                        "image_id": [ids[j] for j in order],
                        "num_bytes": size_all,
                        "text_chars": np.concatenate(chars)[order],
                    },
                    schema=ROW_IDS_SCHEMA,
                )
            )
    if not segments:
        segments[copts.split] = []
    if ds.layout == "parquet":
        extra = {key for sc in scans for key, has in sc.extra_meta.items() if has.any()}
        seen = SeenColumns(meta_keys=frozenset(extra | {k for r in results for k in r.meta_keys}))
    else:
        seen = SeenColumns(text_columns=frozenset({ds.text_column}))
    features = layout.features(seen)
    specs = cut_shards(segments, copts, next_store, layout, features, reader=read_rows)
    num_bytes = {split: int(sum(int(s.sum()) for _, s in parts)) for split, parts in segments.items()}
    table = pa.concat_tables(row_ids) if row_ids else ROW_IDS_SCHEMA.empty_table()
    return specs, features, num_bytes, table


def _finish(
    ds: Dataset,
    opts: UpdateOptions,
    next_store: Store,
    records: list[dict],
    chosen: dict[int, int],
    new_rejects: dict[int, dict],
    results: list,
    shards,
    features,
    num_bytes: dict[str, int],
    row_ids: pa.Table,
    digest: str,
    inputs: dict,
    command: str,
    seconds: float,
):
    """rejects.jsonl (each retried row's record dropped, or replaced where it failed again), the
    card or save_to_disk metadata, row ids, and last stats.json."""
    if ds.task is not None:
        next_store.write_bytes("config.json", ds.task.raw)
    by_stage = Counter(ds.stats.get("rejected_by_reason", {}))
    kept = []
    retried = {k: line for line, k in chosen.items()}
    for k, rec in enumerate(records):
        line = retried.get(k)
        if line is None:
            kept.append(rec)
            continue
        by_stage[rec["stage"]] -= 1
        again = new_rejects.get(line)
        if again is not None:  # failed again: same place, the new reason, one attempt more
            kept.append({**again, "attempts": int(rec.get("attempts", 1)) + 1})
            by_stage[again["stage"]] += 1
    next_store.write_bytes("rejects.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in kept))
    splits = split_summary(shards, num_bytes)
    doc = json.loads(json.dumps(ds.stats))
    written_before = doc["num_written"]
    doc["num_written"] = sum(s["num_rows"] for s in splits.values())
    doc["num_rejected"] = len(kept)
    doc["rejected_by_reason"] = {k: v for k, v in by_stage.items() if v}
    if "num_passthrough" in doc:
        doc["num_passthrough"] += sum(r.num_passthrough for r in results)
    if "images" in doc:  # the retried rows' images join the counts; their ids follow the listed ones
        doc["images"] = merge_image_changes([doc["images"], *(r.images for r in results)])
    if doc["num_input_rows"] != doc["num_written"] + doc["num_rejected"]:
        raise AssertionError(
            f"accounting broken: {doc['num_input_rows']} rows != {doc['num_written']} written + "
            f"{doc['num_rejected']} rejected"
        )
    counts = {
        "retried": len(chosen),
        "written": doc["num_written"] - written_before,
        "rejected_again": sum(1 for line in chosen if line in new_rejects),
    }
    doc["splits"] = splits
    doc["versions"] = versions()
    doc["updates"] = list(doc.get("updates", [])) + [
        {
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command,
            "inputs": inputs,
            "digest": digest,
            "options": {"retry_rejected": True, "stages": list(opts.stages)},
            "counts": counts,
            "seconds": round(seconds, 3),
        }
    ]
    title = ds.store.root.rstrip("/").rsplit("/", 1)[-1]
    layout = dataset_layout(ds)
    layout.on_write_complete(
        next_store,
        splits,
        shards,
        features,
        doc,
        doc.get("command", ""),
        ds.task.instructions if ds.task else None,
        title=title,
    )
    if "packed_paths" in doc:  # where the splits will be once committed, not the staging folder
        doc["packed_paths"] = {n: ds.store.path(n) if len(splits) > 1 else ds.store.root for n in splits}
    if layout.keeps_row_ids:
        write_row_ids(next_store, row_ids)
    next_store.write_bytes("stats.json", orjson.dumps(doc, option=orjson.OPT_INDENT_2))  # last
    return doc, counts

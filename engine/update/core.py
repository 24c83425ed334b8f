"""``engine update``: change the outputs, drop rows, add rows or change the config of a finished
dataset, without decoding its images.

The update re-plans the shards from the updated rows' byte sizes and writes them through the
same writers as ``convert``, so the data files are those a fresh ``convert`` of the equivalent
final manifest makes: the old manifest without the deleted (and replaced) rows, with the new
outputs, and the ``--add`` manifest's lines after it. A Parquet shard whose row groups are whole
old row groups is spliced from the old shards' bytes instead (``engine.update.splice``).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import difflib
import functools
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from engine.config import TaskConfig
from engine.conversation import build_conversation
from engine.driver import (
    UNIT_GRAIN,
    _prewarm_datasets,
    load_task_config,
    ordered_splits,
    split_summary,
    unit_context,
    unit_rows_for,
)
from engine.errors import EngineError, UsageError
from engine.imaging import configure_pillow
from engine.layouts import layout_for, write_shard
from engine.layouts.base import SeenColumns
from engine.layouts.parquet import CardFeatures, meta_keys_of
from engine.layouts.plan import cut_shards
from engine.pipeline import MAX_OUTPUT_BYTES, process_unit
from engine.progress import NullProgress, Progress
from engine.records import META_FIXED, Reject, order_meta_keys
from engine.runners import make_runner
from engine.sinks.store import Finisher, Store
from engine.sources.dataset import card_front_matter
from engine.stats import merge_image_changes
from engine.update.commit import Staging, crash_point
from engine.update.dataset import Dataset, convert_options, dataset_layout, open_dataset
from engine.update.ids import ROW_IDS, ROW_IDS_SCHEMA, part_row_ids, write_row_ids
from engine.update.inputs import Inputs, UpdateOptions, read_inputs
from engine.update.rows import (
    EDIT_SUFFIX,
    IMAGES_PREFIX,
    LINE_DIGITS,
    LINES_MARK,
    new_name,
    read_rows,
    write_edit_file,
)
from engine.update.splice import NotSpliceable, SourceGroup, plain_lengths, splice_parquet_shard
from engine.validate import OutputValidator
from engine.versions import versions
from engine.workdir import EDITS_DIR

log = logging.getLogger(__name__)
LISTED = 1000  # at most this many ids of each list are kept in stats.json's history


class UpdateRefused(EngineError):
    """The update would leave rows that do not conform to the new schema; nothing was changed."""


@dataclass
class ShardScan:
    """One old shard: which rows stay, their new text and their new byte sizes."""

    split: str
    rel: str
    ids: list[str]
    sizes: np.ndarray  # new byte size of every row (kept or not)
    text_chars: np.ndarray  # packed: characters of the new text column
    keep: np.ndarray
    base: np.ndarray  # byte size of every row without its text (output or conversation)
    old: Any = None  # the rows' outputs (Parquet) or conversations (packed), read on demand
    texts: dict[int, str] = field(default_factory=dict)  # row -> its new output or conversation JSON
    extra_meta: dict[str, np.ndarray] = field(default_factory=dict)  # Parquet: key -> row has a value
    paths: list[list[str]] | None = None  # fs-image: every row's stored image paths
    dropped: set[int] = field(
        default_factory=set
    )  # rows --drop-invalid removes (they keep their manifest line)
    lines: np.ndarray | None = None  # fs-image: every row's new manifest line
    group_rows: np.ndarray | None = None  # Parquet: the rows of each of the shard's row groups

    def old_output(self, i: int) -> str | None:
        if self.old is None:
            return None
        value = self.old[i].as_py()
        if isinstance(value, str) or value is None:
            return value
        for turn in reversed(value):  # packed: the assistant turn holds the output
            if turn.get("role") == "assistant" and isinstance(turn.get("content"), str):
                return turn["content"]
        return None


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    unknown_outputs: list[str] = field(default_factory=list)
    unknown_delete: list[str] = field(default_factory=list)
    invalid_outputs: list[dict[str, Any]] = field(default_factory=list)
    no_longer_valid: list[dict[str, Any]] = field(default_factory=list)
    diffs: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # id, old, new
    rejects: list[dict[str, Any]] = field(default_factory=list)
    images: dict[str, Any] | None = None  # stats "images" of the --add rows written


def update(opts: UpdateOptions, progress: Progress | None = None, command: str = "") -> dict[str, Any]:
    configure_pillow()
    if opts.retry_rejected:
        from engine.update.retry import retry

        return retry(opts, progress, command)
    started = time.perf_counter()
    progress = progress or NullProgress()
    inputs = read_inputs(opts)  # every input is checked before anything is touched
    new_task = load_task_config(opts.config) if opts.config else None
    store = Store(opts.out)
    staging = Staging(store)
    if opts.show_diff:
        return _update(opts, progress, command, inputs, new_task, store, staging, started)
    staging.lock()
    try:
        return _update(opts, progress, command, inputs, new_task, store, staging, started)
    finally:
        staging.unlock()


def _update(
    opts: UpdateOptions,
    progress: Progress,
    command: str,
    inputs: Inputs,
    new_task: TaskConfig | None,
    store: Store,
    staging: Staging,
    started: float,
) -> dict[str, Any]:
    if not opts.show_diff:
        done = staging.recover()
        if done is not None:
            progress.message(
                f"engine: finished the update of {opts.out} that an earlier run left half-committed"
            )
            if done == inputs.digest:
                return orjson.loads(store.read_bytes("stats.json"))
    ds = open_dataset(store)
    _check_applicable(ds, opts, new_task)
    if not opts.show_diff and ds.history and ds.history[-1].get("digest") == inputs.digest:
        progress.message(f"engine: {opts.out} already has this update (same inputs); nothing to do")
        return ds.stats
    task = new_task or ds.task
    if opts.add or new_task is not None or ds.layout != "parquet":
        _prewarm_datasets()  # needed for the features only once the rows are read
    report = Report()
    report.counts["outputs_repeated"] = inputs.outputs_repeated
    config_path = opts.config or (store.path("config.json") if ds.task else None)
    user = None
    if new_task is not None:  # the user turn convert builds from the new config (layouts of conversations)
        user = unit_context(
            convert_options(
                ds, out=store.root, config=config_path, quiet=True, overwrite=False, resume=False
            ),
            task,
            store,
            embedded=True,
        ).user_content
    scans = scan(ds, opts, inputs, task, new_task is not None, user, report)
    log.debug("rows read and checked at %.2f s", time.perf_counter() - started)
    if report.no_longer_valid and not opts.drop_invalid:
        for item in report.no_longer_valid[:20]:
            print(f"  {item['split']}/{item['image_id']}: {item['reason']}", file=sys.stderr)
        first = report.no_longer_valid[0]
        raise UpdateRefused(
            f"{len(report.no_longer_valid):,} row(s) do not conform to the new schema (first: "
            f"{first['image_id']!r}: {first['reason']}); pass --drop-invalid to remove them. "
            "Nothing was changed"
        )
    if opts.show_diff:
        _print_diff(report, ds, opts)
        return ds.stats
    next_store = staging.start(inputs.digest)
    crash_point("update-started")
    copts = convert_options(
        ds,
        out=next_store.root,
        quiet=True,
        overwrite=False,
        resume=False,
        workers=opts.workers,
        runner=opts.runner,
        config=config_path,
        # the --add input's own kind (detected), not the one the dataset was made from
        **({"manifest": opts.add, "base_path": None, "input_format": None} if opts.add else {}),
        **({"split": opts.split} if opts.split else {}),
    )
    added = _run_add(ds, opts, copts, task, next_store, scans, report) if opts.add else []
    images = _place_images(ds, scans, next_store) if ds.fs_image else None
    specs, features, num_bytes, row_ids, edits = _plan(ds, copts, next_store, scans, added, images)
    splices = splice_groups(ds, scans, specs) if ds.layout == "parquet" else {}
    log.debug("%d shards planned at %.2f s", len(specs), time.perf_counter() - started)
    shards = write_shards(specs, progress, splices, report.counts, edits)
    log.debug("shards written at %.2f s", time.perf_counter() - started)
    doc = _finish(
        ds,
        opts,
        inputs,
        task,
        next_store,
        shards,
        features,
        num_bytes,
        row_ids,
        report,
        command,
        time.perf_counter() - started,
    )
    crash_point("update-staged")
    commit_staged(staging, ds, store, next_store, inputs.digest)
    log.debug("committed at %.2f s", time.perf_counter() - started)
    progress.message(f"engine: updated {opts.out}: {_summary(report)}")
    return doc


def _check_applicable(ds: Dataset, opts: UpdateOptions, new_task: TaskConfig | None) -> None:
    if (opts.outputs or opts.config) and ds.task is None and new_task is None:
        raise UsageError(
            f"{opts.out} has no config.json (a trainer-style packed dataset): its rows have no "
            "output to replace or validate"
        )
    if (opts.outputs or opts.config) and ds.layout == "arrow" and ds.text_column != "conversations":
        raise UsageError(f"{opts.out} holds pretraining text, which has no output to replace")
    if opts.split and opts.split not in ds.files and not opts.add:
        raise UsageError(f"{opts.out} has no split {opts.split!r} (it has {', '.join(ds.files)})")


# ---- reading the old rows ---------------------------------------------------------------------


def _open_parquet(store: Store, rel: str) -> pq.ParquetFile:
    if store.remote:
        return pq.ParquetFile(store.fs.open(store.path(rel), "rb"))
    return pq.ParquetFile(store.path(rel))


def _utf8(column) -> np.ndarray:
    return _lengths(pc.utf8_length(column))


def _lengths(lengths) -> np.ndarray:
    """An integer array's values as int64, a null as 0, read from its buffers: pyarrow's
    ``to_numpy`` and scalars import pandas (0.3 s), which an update that keeps the features does
    not otherwise need."""
    chunks = lengths.chunks if isinstance(lengths, pa.ChunkedArray) else [lengths]
    out = []
    for a in chunks:
        width = a.type.bit_width // 8
        values = np.frombuffer(a.buffers()[1], f"<i{width}", len(a), a.offset * width).astype(np.int64)
        if a.null_count:
            bits = np.unpackbits(np.frombuffer(a.buffers()[0], np.uint8), bitorder="little")
            values[bits[a.offset : a.offset + len(a)] == 0] = 0
        out.append(values)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def scan(
    ds: Dataset,
    opts: UpdateOptions,
    inputs: Inputs,
    task: TaskConfig | None,
    config_changed: bool,
    user: str | None,
    report: Report,
) -> list[ShardScan]:
    """Read the dataset once (row group by row group) and decide every row's fate, except the
    rows that ``--add --replace`` replaces, which are known once the new rows are converted."""
    validator = OutputValidator(task.json_schema) if task is not None else None
    delete = set(inputs.delete)
    found_outputs: set[str] = set()
    found_delete: set[str] = set()
    ids_by_split = {}
    if ds.layout == "arrow":
        offset = 0
        for split in ds.files:
            n = ds.stats["splits"][split]["num_rows"]
            ids_by_split[split] = ds.row_ids.slice(offset, n)
            offset += n
    scans = []
    for split, shards in ds.files.items():
        applies = opts.split is None or opts.split == split
        row_offset = 0
        for rel in shards:
            if ds.layout == "parquet":
                sc = _scan_parquet_shard(ds, split, rel)
            else:
                sc = _scan_arrow_shard(ds, split, rel, ids_by_split[split], row_offset)
                row_offset += len(sc.ids)
            scans.append(sc)
            if not applies:
                continue
            for i, image_id in enumerate(sc.ids):
                if image_id in delete:
                    sc.keep[i] = False
                    found_delete.add(image_id)
                    report.counts["deleted"] += 1
                    if opts.show_diff:  # only a diff keeps the old and new texts
                        report.diffs.append((image_id, sc.old_output(i), None))
                    continue
                change = inputs.outputs.get(image_id)
                if change is None and not config_changed:
                    continue
                old = final = sc.old_output(i)
                if change is not None:
                    found_outputs.add(image_id)
                    verdict = validator.check(change.output, MAX_OUTPUT_BYTES)
                    if verdict.reason is not None:
                        report.invalid_outputs.append(
                            {"line": change.line, "image_id": image_id, "reason": verdict.reason}
                        )
                    else:
                        final = verdict.output
                        report.counts["outputs_applied"] += 1
                        if opts.show_diff:
                            report.diffs.append((image_id, old, final))
                if config_changed:
                    verdict = validator.check(final, MAX_OUTPUT_BYTES)
                    if verdict.reason is not None:
                        report.no_longer_valid.append(
                            {"split": split, "image_id": image_id, "reason": verdict.reason}
                        )
                        if opts.drop_invalid:
                            sc.keep[i] = False
                            sc.dropped.add(i)
                            report.counts["dropped_invalid"] += 1
                            report.rejects.append(
                                {
                                    "line": None,
                                    "image_id": image_id,
                                    "stage": "validate",
                                    "reason": f"no longer valid under the new schema: {verdict.reason}",
                                }
                            )
                        continue
                if final is not None and (final != old or (config_changed and ds.layout == "arrow")):
                    _set_text(ds, sc, i, final, user)
            sc.old = None  # only what changed is kept
    report.unknown_outputs = [i for i in inputs.outputs if i not in found_outputs]
    report.unknown_delete = [i for i in dict.fromkeys(inputs.delete) if i not in found_delete]
    report.counts["outputs_unknown"] = len(report.unknown_outputs)
    report.counts["outputs_invalid"] = len(report.invalid_outputs)
    report.counts["delete_unknown"] = len(report.unknown_delete)
    return scans


def _scan_parquet_shard(ds: Dataset, split: str, rel: str) -> ShardScan:
    """Ids, outputs and byte sizes of a Parquet shard, read one row group at a time. A row's size
    is computed as ``Sample.num_bytes`` counts it (characters of its text fields, bytes of its image)."""
    ids: list[str] = []
    outputs: list[pa.Array] = []
    base: list[np.ndarray] = []
    extra: dict[str, list[np.ndarray]] = {}
    local = None if ds.store.remote else ds.store.path(rel)
    with _open_parquet(ds.store, rel) as f:
        group_rows = np.array([f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)], np.int64)
        column = [c.path for c in f.schema].index("image.bytes")
        for g in range(f.num_row_groups):
            t = f.read_row_group(g, columns=["image_id", "image.path", "output", "meta"])
            image, meta = t.column("image").combine_chunks(), t.column("meta").combine_chunks()
            size = _utf8(t.column("image_id")) + _utf8(image.field("path"))
            # the images' sizes from their length prefixes where the pages allow (never their bytes)
            lengths = plain_lengths(local, f, column, g) if local is not None else None
            if lengths is None:
                images = f.read_row_group(g, columns=["image.bytes"]).column("image").combine_chunks()
                lengths = _lengths(pc.binary_length(images.field("bytes")))
                del images
            size += lengths
            for k, key in enumerate(meta.type):
                values = meta.field(k)
                chars = _utf8(values)
                size = size + chars
                if key.name not in META_FIXED:  # the rows with a value (not null, not empty)
                    extra.setdefault(key.name, []).append(chars > 0)
            base.append(size)
            ids += t.column("image_id").to_pylist()
            outputs.append(t.column("output").combine_chunks())
            del t, image, meta
    n = len(ids)
    base_sizes = np.concatenate(base).astype(np.int64) if base else np.zeros(0, np.int64)
    old = pa.concat_arrays(outputs) if outputs else pa.array([], pa.string())
    return ShardScan(
        split=split,
        rel=rel,
        ids=ids,
        sizes=base_sizes + _utf8(old),
        text_chars=np.zeros(n, np.int64),
        keep=np.ones(n, bool),
        base=base_sizes,
        old=old,
        extra_meta={k: np.concatenate(v) for k, v in extra.items()},
        group_rows=group_rows,
    )


def _scan_arrow_shard(ds: Dataset, split: str, rel: str, split_ids: pa.Table, offset: int) -> ShardScan:
    """A packed shard: its rows' ids and sizes come from row_ids.parquet; only the text column
    is kept from the rows read."""
    batches, paths = [], [] if ds.fs_image else None
    with ds.store.open_arrow(rel) as f:
        for batch in ipc.open_stream(f):
            if paths is not None:  # fs-image: the modalities are paths, which the update renames
                paths += [[m["value"] for m in mods] for mods in batch.column("modalities").to_pylist()]
            batches.append(batch.select([ds.text_column]))  # the images are dropped as they are read
    n = sum(b.num_rows for b in batches)
    ids = split_ids.slice(offset, n)
    sizes = ids.column("num_bytes").to_numpy().astype(np.int64)
    chars = ids.column("text_chars").to_numpy().astype(np.int64)
    old = pa.Table.from_batches(batches).column(ds.text_column) if batches else None
    return ShardScan(
        split=split,
        rel=rel,
        ids=ids.column("image_id").to_pylist(),
        sizes=sizes.copy(),
        text_chars=chars.copy(),
        keep=np.ones(n, bool),
        base=sizes - chars,
        old=old,
        paths=paths,
    )


def _set_text(ds: Dataset, sc: ShardScan, i: int, output: str, user: str | None) -> None:
    """Record row ``i``'s new output (or, packed, its new conversation) and its new size."""
    if ds.layout == "parquet":
        sc.texts[i] = output
        sc.sizes[i] = sc.base[i] + len(output)
        return
    turns = sc.old[i].as_py()
    if user is not None:  # a new config: the conversation convert builds from it
        o = ds.options
        turns = build_conversation(user, output, o.get("system_prompt"))
    else:
        for turn in reversed(turns):
            if turn.get("role") == "assistant":
                turn["content"] = output
                break
    text = orjson.dumps(turns).decode()
    sc.texts[i] = text
    sc.text_chars[i] = len(text)
    sc.sizes[i] = sc.base[i] + len(text)


# ---- new rows ---------------------------------------------------------------------------------


def _run_add(
    ds: Dataset, opts: UpdateOptions, copts, task, next_store: Store, scans: list[ShardScan], report: Report
) -> list:
    """Convert the --add manifest into part files, as convert does; ids already in the dataset
    are rejected as duplicates, or (--replace) replace their old row once converted."""
    existing = {image_id: (sc, i) for sc in scans for i, image_id in enumerate(sc.ids) if sc.keep[i]}
    in_dataset: dict[int, str] = {}
    with make_runner(copts) as runner:
        ctx = unit_context(copts, task, next_store, runner.embedded)
        with contextlib.closing(ctx.source):  # its look-ahead state goes with the run, as in convert
            results = _convert_added(runner, ctx, existing, in_dataset, opts.replace)
    report.images = merge_image_changes(r.images for r in results)
    name = os.path.basename(opts.add)
    update_index = len(ds.history) + 1
    for r in results:
        report.counts["add_rows"] += r.num_rows
        report.counts["added"] += r.num_written
        report.counts["add_rejected"] += sum(r.rejected.values())
        if r.rejects:
            for raw in next_store.read_bytes(r.rejects).splitlines():
                doc = orjson.loads(raw)
                if doc["line"] in in_dataset:
                    doc["reason"] = (
                        f"image_id {doc['image_id']!r} is already in the dataset "
                        "(pass --replace to replace its row)"
                    )
                doc.update({"update": update_index, "manifest": name})
                report.rejects.append(doc)
        if opts.replace:
            for split in r.sizes:
                for image_id in part_row_ids(next_store, r.part, split).column("image_id").to_pylist():
                    if image_id in existing:
                        sc, i = existing.pop(image_id)
                        sc.keep[i] = False
                        report.counts["replaced"] += 1
    return results


def _convert_added(runner, ctx, existing: dict, in_dataset: dict[int, str], replace_rows: bool) -> list:
    """Convert the --add rows; rows whose id is in the dataset become duplicates unless replaced."""
    plan = ctx.source.plan(UNIT_GRAIN)
    plan = plan.coalesce(unit_rows_for(plan.num_rows, runner.num_workers))
    units = []
    # reading here must not count as the units starting (look-ahead), so a copy reads
    with contextlib.closing(copy.copy(ctx.source)) as scanning:
        for unit in plan.units:
            seen = set(unit.duplicate_lines)
            extra = []
            for row in scanning.read(unit, base=ctx.base, default_split=ctx.default_split):
                if isinstance(row, Reject) or row.line in seen or row.image_id not in existing:
                    continue
                if not replace_rows:
                    extra.append(row.line)
                    in_dataset[row.line] = row.image_id
            units.append(replace(unit, duplicate_lines=tuple(sorted(seen | set(extra)))))
    return sorted(runner.map_unordered(process_unit, [(u, ctx) for u in units]), key=lambda r: r.index)


# ---- planning and writing ---------------------------------------------------------------------


def _place_images(ds: Dataset, scans: list[ShardScan], next_store: Store) -> tuple[str, int]:
    """fs-image: give every kept row the line it has in the equivalent final manifest (the rows
    removed before it no longer count; --drop-invalid's rows stay, as rejects) and hard-link (or
    copy) its image files to the names that line gives; the --add rows' files, written under their
    lines in the --add manifest, move after the old manifest's. Returns (path prefix, the --add
    rows' line shift). No image is read or decoded."""
    prefix = dataset_layout(ds).path_prefix(ds.store)  # as convert into OUT writes it
    skip = len(prefix) + len(IMAGES_PREFIX)
    removed: list[int] = []
    for sc in scans:
        sc.lines = np.full(len(sc.ids), -1, np.int64)
        for i, values in enumerate(sc.paths):
            names = [v[skip:] for v in values]
            if not values or any(
                not v.startswith(prefix + IMAGES_PREFIX) or not n[:LINE_DIGITS].isdigit()
                for v, n in zip(values, names)
            ):
                raise UsageError(
                    f"{ds.store.root}: row {sc.ids[i]!r} has image paths {values!r} that are not "
                    f"'{prefix}{IMAGES_PREFIX}<line>-...' (was the folder moved or renamed since "
                    "convert?); convert it again"
                )
            sc.lines[i] = int(names[0][:LINE_DIGITS])
            if not sc.keep[i] and i not in sc.dropped:
                removed.append(int(sc.lines[i]))
    removed_sorted = np.sort(np.array(removed, np.int64))
    shift = ds.stats["num_input_rows"] - len(removed)
    folder = next_store.path(IMAGES_PREFIX.rstrip("/"))
    os.makedirs(folder, exist_ok=True)
    # only the --add rows' files are there yet: last line first, so no name is taken twice
    for name in sorted(os.listdir(folder), key=lambda n: -int(n[:LINE_DIGITS])):
        if shift:
            os.rename(
                os.path.join(folder, name),
                os.path.join(folder, new_name(name, int(name[:LINE_DIGITS]) + shift)),
            )
    for sc in scans:
        sc.lines = sc.lines - np.searchsorted(removed_sorted, sc.lines)
        for i in np.flatnonzero(sc.keep):
            for value in sc.paths[i]:
                source = ds.store.path(value[len(prefix) :])
                target = os.path.join(folder, new_name(value[skip:], int(sc.lines[i])))
                try:
                    os.link(source, target)
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(source, target)
        sc.paths = None
    return prefix, shift


def commit_staged(staging: Staging, ds: Dataset, store: Store, next_store: Store, digest: str) -> None:
    """Swap the staged dataset in: its files (stats.json last), the old dataset's files it no longer
    has removed, and a user's own files in OUT carried over."""
    new_files = _list_files(next_store)
    owned = _owned_files(ds, _list_files(store))
    carry = sorted(
        {f.split("/", 1)[0] for f in _list_files(store) if f not in owned}
        - {f.split("/", 1)[0] for f in new_files}
    )
    staging.commit(
        digest,
        [f for f in new_files if f != "stats.json"] + ["stats.json"],
        sorted(owned - set(new_files) - {"stats.json"}),
        carry,
    )


def write_shards(
    specs: list,
    progress: Progress,
    splices: dict[str, list[SourceGroup]] | None = None,
    counts: Counter | None = None,
    edits: dict[str, Callable[[], None]] | None = None,
) -> list:
    """Write the planned shards, one after another (a crash point after the first): a shard in
    ``splices`` is assembled from the old shards' bytes, the others go through convert's writers.
    ``counts`` gets ``shards_spliced`` (of which ``shards_linked``: unchanged, hard-linked) and
    ``shards_rewritten``. ``edits`` writes the edit files a rewritten shard reads, by name."""
    if specs:
        specs[0].layout.on_write_start(specs[0].store)
    progress.start(len(specs), "writing shards", unit="shard")
    shards = []
    counts = Counter() if counts is None else counts
    counts.update({"shards_spliced": 0, "shards_linked": 0, "shards_rewritten": 0})
    with Finisher() as finisher:
        for i, spec in enumerate(specs):
            result = None
            groups = (splices or {}).get(spec.relpath)
            if groups:
                try:
                    result, linked = splice_parquet_shard(spec, groups, finisher)
                    counts["shards_spliced"] += 1
                    counts["shards_linked"] += linked
                except NotSpliceable as exc:
                    log.debug("%s is rewritten: %s", spec.relpath, exc)
            if result is None:
                for piece in spec.pieces:
                    if edits and piece.part in edits:
                        edits.pop(piece.part)()
                result = write_shard(spec, finisher)
                counts["shards_rewritten"] += 1
            shards.append(result)
            progress.advance(1, 0)
            if i == 0:
                crash_point("update-first-shard")
    progress.close()
    return shards


def splice_groups(ds: Dataset, scans: list[ShardScan], specs: list) -> dict[str, list[SourceGroup]]:
    """The Parquet shards whose every row group holds exactly the rows of one old row group (in
    order, none removed), each with those old row groups and their new outputs: they are spliced."""
    edits = {f"{EDITS_DIR}/{k:05d}{EDIT_SUFFIX}": k for k in range(len(scans))}
    kept: dict[int, np.ndarray] = {}
    plans = {}
    for spec in specs:
        segments = []
        for piece in spec.pieces:
            k = edits.get(piece.part)
            if k is None:  # an --add part's rows
                break
            if k not in kept:
                kept[k] = np.flatnonzero(scans[k].keep)
            segments.append((k, kept[k][piece.start : piece.stop]))
        else:
            groups = _whole_groups(ds, scans, spec.row_groups, segments)
            if groups:
                plans[spec.relpath] = groups
    return plans


def _whole_groups(ds: Dataset, scans: list[ShardScan], counts, segments) -> list[SourceGroup] | None:
    groups: list[SourceGroup] = []
    segment, offset = 0, 0
    for count in counts:
        if segment == len(segments):
            return None
        k, rows = segments[segment]
        sc = scans[k]
        first = int(rows[offset]) if offset < len(rows) else -1
        starts = np.concatenate([[0], np.cumsum(sc.group_rows)[:-1]])
        g = int(np.searchsorted(starts, first))
        if (
            offset + count > len(rows)
            or g == len(starts)
            or starts[g] != first
            or sc.group_rows[g] != count
            or rows[offset + count - 1] != first + count - 1
        ):
            return None
        texts = {i - first: t for i, t in sc.texts.items() if first <= i < first + count}
        groups.append(SourceGroup(ds.store.path(sc.rel), g, texts))
        offset += count
        if offset == len(rows):
            segment, offset = segment + 1, 0
    return groups if groups and segment == len(segments) else None


def _plan(
    ds: Dataset,
    copts,
    next_store: Store,
    scans: list[ShardScan],
    added: list,
    images: tuple[str, int] | None = None,
):
    splits = ordered_splits([sc.split for sc in scans] + [s for r in added for s in r.sizes])
    segments: dict[str, list[tuple[str, np.ndarray]]] = {}
    row_ids: list[pa.Table] = []
    edits: dict[str, Callable[[], None]] = {}
    layout = layout_for(copts)
    for split in splits:
        parts = []
        for k, sc in enumerate(scans):
            if sc.split != split or not sc.keep.any():
                continue
            rel = f"{EDITS_DIR}/{k:05d}{EDIT_SUFFIX}"
            # written when a shard that reads it is rewritten (a spliced one reads the old shard)
            edits[rel] = functools.partial(
                write_edit_file,
                next_store,
                rel,
                ds.store.path(sc.rel),
                ds.layout,
                sc.keep,
                sc.texts,
                sc.sizes,
                sc.lines,
                images[0] if images else None,
            )
            parts.append((rel, sc.sizes[sc.keep]))
            if layout.keeps_row_ids:
                row_ids.append(
                    pa.table(
                        {
                            "split": [split] * int(sc.keep.sum()),
                            "image_id": [x for x, k in zip(sc.ids, sc.keep) if k],
                            "num_bytes": sc.sizes[sc.keep],
                            "text_chars": sc.text_chars[sc.keep],
                        },
                        schema=ROW_IDS_SCHEMA,
                    )
                )
        for r in added:
            if split in r.sizes:
                parts.append((r.part + (f"{LINES_MARK}{images[1]}" if images else ""), r.sizes[split]))
                if layout.keeps_row_ids:
                    row_ids.append(part_row_ids(next_store, r.part, split))
        if sum(len(s) for _, s in parts):
            segments[split] = parts
    if not segments:  # nothing left: one empty shard, as convert writes
        segments[copts.split] = []
    if ds.layout == "parquet":
        extra = {key for sc in scans for key, has in sc.extra_meta.items() if (has & sc.keep).any()}
        seen = SeenColumns(meta_keys=frozenset(extra | {k for r in added for k in r.meta_keys}))
    else:
        columns = {c for r in added for c in r.text_columns} | {ds.text_column}
        if len(columns) > 1:
            raise UsageError(
                "the --add manifest's rows are not of the dataset's kind ('text' against "
                "'conversations'); add them to a dataset of their kind"
            )
        seen = SeenColumns(text_columns=frozenset(columns))
    features = (_kept_features(ds, seen) if ds.layout == "parquet" else None) or layout.features(seen)
    specs = cut_shards(
        segments,
        copts,
        next_store,
        layout,
        features,
        reader=read_rows,
        path_prefix=images[0] if images else "",
    )
    num_bytes = {split: int(sum(int(s.sum()) for _, s in parts)) for split, parts in segments.items()}
    table = pa.concat_tables(row_ids) if row_ids else None  # None: the layout keeps none, or no row
    return specs, features, num_bytes, table, edits


def _kept_features(ds: Dataset, seen: SeenColumns) -> CardFeatures | None:
    """The dataset's own features when the update keeps them (the same meta keys), read from a
    shard's schema and the card; None when they change, or the card was edited away."""
    shards = [rel for rels in ds.files.values() for rel in rels]
    if not shards or not ds.store.is_file("README.md"):
        return None
    front = card_front_matter(ds.store.read_bytes("README.md"))
    try:
        features = front["dataset_info"]["features"] if front else None
    except (KeyError, TypeError):
        return None
    with _open_parquet(ds.store, shards[0]) as f:
        schema = f.schema_arrow
    if not isinstance(features, list) or meta_keys_of(schema) != order_meta_keys(seen.meta_keys):
        return None
    return CardFeatures(schema, features)


def _finish(
    ds: Dataset,
    opts: UpdateOptions,
    inputs: Inputs,
    task,
    next_store: Store,
    shards,
    features,
    num_bytes: dict[str, int],
    row_ids: pa.Table,
    report: Report,
    command: str,
    seconds: float,
) -> dict:
    """config.json, rejects.jsonl, the card or save_to_disk metadata, row ids, and last stats.json."""
    if opts.config:
        next_store.write_bytes("config.json", task.raw)
    elif ds.task is not None:
        next_store.write_bytes("config.json", ds.task.raw)
    old_rejects = ds.store.read_bytes("rejects.jsonl") if ds.store.is_file("rejects.jsonl") else b""
    next_store.write_bytes(
        "rejects.jsonl", old_rejects + b"".join(orjson.dumps(r) + b"\n" for r in report.rejects)
    )
    splits = split_summary(shards, num_bytes)
    doc = json.loads(json.dumps(ds.stats))
    c = report.counts
    removed = c["deleted"] + c["replaced"] + c["dropped_invalid"]
    new_rejects = Counter(r["stage"] for r in report.rejects)
    doc["num_written"] = sum(s["num_rows"] for s in splits.values())
    doc["num_rejected"] = doc["num_rejected"] + sum(new_rejects.values())
    doc["num_input_rows"] = doc["num_input_rows"] - removed + c["add_rows"] + c["dropped_invalid"]
    by_reason = Counter(doc.get("rejected_by_reason", {}))
    by_reason.update(new_rejects)
    doc["rejected_by_reason"] = dict(by_reason)
    if doc["num_input_rows"] != doc["num_written"] + doc["num_rejected"]:
        raise AssertionError(
            f"accounting broken: {doc['num_input_rows']} rows != {doc['num_written']} written + "
            f"{doc['num_rejected']} rejected"
        )
    doc["splits"] = splits
    doc["versions"] = versions()
    entry = {
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "inputs": inputs.files,
        "digest": inputs.digest,
        "options": {"replace": opts.replace, "drop_invalid": opts.drop_invalid, "split": opts.split},
        "counts": {k: int(v) for k, v in sorted(c.items())},
        "seconds": round(seconds, 3),
        "unknown_ids": {"outputs": report.unknown_outputs[:LISTED], "delete": report.unknown_delete[:LISTED]},
        "invalid_outputs": report.invalid_outputs[:LISTED],
        "no_longer_valid": report.no_longer_valid[:LISTED],
        # the top-level "images" stays the convert's (a deleted row's changes are not known):
        # what this update's --add rows went through is kept here
        **({"images": report.images} if report.images is not None else {}),
    }
    doc["updates"] = list(doc.get("updates", [])) + [entry]
    title = ds.store.root.rstrip("/").rsplit("/", 1)[-1]
    layout = dataset_layout(ds)
    layout.on_write_complete(
        next_store,
        splits,
        shards,
        features,
        doc,
        doc.get("command", ""),
        task.instructions if task else None,
        title=title,
    )
    if "packed_paths" in doc:  # where the splits will be once committed, not the staging folder
        doc["packed_paths"] = {n: ds.store.path(n) if len(splits) > 1 else ds.store.root for n in splits}
    if layout.keeps_row_ids:
        write_row_ids(next_store, row_ids if row_ids is not None else ROW_IDS_SCHEMA.empty_table())
    next_store.write_bytes("stats.json", orjson.dumps(doc, option=orjson.OPT_INDENT_2))  # last
    return doc


METADATA = (
    "README.md",
    "config.json",
    "stats.json",
    "rejects.jsonl",
    ROW_IDS,
    "state.json",
    "dataset_info.json",
    "dataset_dict.json",
)


def _owned_files(ds: Dataset, files: list[str]) -> set[str]:
    """The files of ``files`` that are the dataset's own (its shards and metadata), not a user's."""
    shards = {rel for rels in ds.files.values() for rel in rels}
    return {
        f
        for f in files
        if f in shards
        or f.rsplit("/", 1)[-1] in METADATA
        and f.count("/") <= 1
        or ds.fs_image
        and f.startswith(IMAGES_PREFIX)
    }


def _list_files(store: Store) -> list[str]:
    """Every file of a dataset folder (relative paths), its scratch folders left out."""
    if store.remote:
        root = store.root.split("://", 1)[-1].rstrip("/")
        found = [p[len(root) + 1 :] for p in store.fs.find(store.root)]
    else:
        found = []
        for folder, dirs, files in os.walk(store.root):
            dirs[:] = [d for d in dirs if not d.startswith(".engine")]
            found += [
                os.path.relpath(os.path.join(folder, f), store.root).replace(os.sep, "/") for f in files
            ]
    return sorted(f for f in found if not f.startswith(".engine"))


# ---- reporting --------------------------------------------------------------------------------


def _summary(report: Report) -> str:
    c = report.counts
    parts = [f"{c['outputs_applied']:,} outputs replaced"]
    for key, label in (
        ("outputs_invalid", "invalid outputs not applied"),
        ("outputs_unknown", "unknown ids in --outputs"),
        ("outputs_repeated", "repeated ids in --outputs (last line kept)"),
        ("deleted", "rows deleted"),
        ("delete_unknown", "unknown ids in --delete"),
        ("added", "rows added"),
        ("add_rejected", "--add rows rejected"),
        ("replaced", "rows replaced"),
        ("dropped_invalid", "rows dropped (invalid under the new schema)"),
    ):
        if c[key]:
            parts.append(f"{c[key]:,} {label}")
    text = ", ".join(parts)
    unknown = report.unknown_outputs + report.unknown_delete
    if unknown:
        text += (
            f"; unknown ids: {', '.join(unknown[:10])}{', ...' if len(unknown) > 10 else ''} "
            "(all in stats.json)"
        )
    return text


def _pretty(text: str | None) -> list[str]:
    if text is None:
        return []
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False).splitlines()
    except ValueError:
        return text.splitlines()


def _print_diff(report: Report, ds: Dataset, opts: UpdateOptions) -> None:
    """The old and new outputs as a unified diff of indented JSON (as labelr's --show-diff)."""
    out = sys.stdout
    for image_id, old, new in report.diffs:
        label = "deleted" if new is None else "new"
        for line in difflib.unified_diff(
            _pretty(old),
            _pretty(new),
            fromfile=f"{image_id} (old)",
            tofile=f"{image_id} ({label})",
            lineterm="",
        ):
            print(line, file=out)
    for item in report.invalid_outputs:
        print(
            f"# {item['image_id']}: new output not applied (line {item['line']}): {item['reason']}", file=out
        )
    for item in report.no_longer_valid:
        print(
            f"# {item['split']}/{item['image_id']}: not valid under the new schema: {item['reason']}",
            file=out,
        )
    print(f"# {_summary(report)}; nothing was changed (--show-diff)", file=out)

"""One work unit end to end, in one process: read -> check -> fetch -> transform -> write.

Per-sample failures are data (:class:`Reject`), kept in line order. This module knows nothing of
Ray or the CLI; runners call :func:`process_unit` wherever they run it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import orjson

from engine.bounds import ImageTimeout, time_limit, transform_bounded  # noqa: F401 - time_limit: the pipeline's bound
from engine.config import FetchOptions, ImageOptions
from engine.conversation import build_conversation, count_attachments
from engine.imaging import EncodedImage, ImageFailure
from engine.naming import safe_stem
from engine.records import META_FIXED, Reject, Sample, SourceRef
from engine.sinks.parts import PartWriter
from engine.sinks.store import WORK_DIR, Store
from engine.sources.fetch import FetchFailure, Fetcher, FetchTally
from engine.sources.base import ManifestRow, Source, Unit
from engine.sources.location import local_path
from engine.stats import ImageTally
from engine.validate import validator_for

log = logging.getLogger(__name__)
MAX_OUTPUT_BYTES = 1 << 20  # an `output` larger than 1 MiB is rejected at the validate stage
IMAGES_DIR = "images"  # fs-image files, relative to OUT


@dataclass(frozen=True, slots=True)
class UnitContext:
    """What every unit of a run shares: small and picklable."""

    layout: str  # parquet | arrow
    schema_json: str | None  # None without a config.json
    image: ImageOptions
    fetch: FetchOptions
    default_split: str
    base: str  # folder that relative image paths resolve against
    store: Store  # the output folder (local or object storage)
    user_content: str | None = None  # packed layout from labelr rows: the user turn (tokens + prompt)
    system_prompt: str | None = None
    attachment_token: str = "<|reserved_special_token_0|>"
    images_as_paths: bool = False  # fs-image: write files under OUT/images, store their paths
    # Part files may reference unchanged local source images instead of copying them: true
    # when every process of the run (the shard writers too) sees this machine's files.
    reference_sources: bool = False
    source: Source | None = None  # the run's input: reads each unit's rows (engine.sources)


@dataclass(slots=True)
class UnitResult:
    index: int
    num_rows: int
    num_written: int
    num_passthrough: int
    rejected: dict[str, int]
    meta_keys: tuple[str, ...]  # extra meta keys seen (beyond the fixed ones)
    text_columns: tuple[str, ...]  # packed layout: 'conversations' and/or 'text' seen
    sizes: dict[str, np.ndarray]  # split -> byte size of every written row, in line order
    part: str | None
    rejects: str | None
    seconds: float
    part_bytes: int | None = None  # sizes of the unit's files, checked when resuming
    rejects_bytes: int | None = None
    node: str | None = field(default=None)
    warnings: dict[str, int] = field(default_factory=dict)  # kind -> images written despite it
    fetch: dict[str, int] | None = None  # what fetching cost over HTTP (FetchTally), when it was used
    images: dict | None = None  # stats.json "images" of this unit (engine.stats.image_changes)


    def to_json(self) -> bytes:
        doc = {k: getattr(self, k) for k in self.__slots__}
        doc["sizes"] = {k: v.tolist() for k, v in self.sizes.items()}
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, raw: bytes) -> UnitResult:
        doc = orjson.loads(raw)
        doc["sizes"] = {k: np.asarray(v, dtype=np.int64) for k, v in doc["sizes"].items()}
        doc["meta_keys"], doc["text_columns"] = tuple(doc["meta_keys"]), tuple(doc["text_columns"])
        return cls(**doc)


def unit_paths(index: int) -> tuple[str, str, str]:
    """The unit's part file, its rejects, and its result (paths relative to OUT): the checkpoint a
    resumed run trusts."""
    stem = f"{WORK_DIR}/parts/unit-{index:06d}"
    return stem + ".arrow", stem + ".rejects.jsonl", stem + ".json"


def load_unit_result(store: Store, index: int) -> UnitResult | None:
    """The result of a unit that completed in an earlier run, or None (then it is redone).

    Scratch files are not fsynced (see ``Store.writing``), so after a power loss a checkpoint
    may be empty or name a part file that came back short: the checkpoint must parse and
    every file it names must have exactly the recorded size."""
    part, _, result = unit_paths(index)
    try:
        done = UnitResult.from_json(store.read_bytes(result))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):  # empty or torn checkpoint
        log.warning("unit %d: unreadable checkpoint; redoing the unit", index)
        return None
    recorded = {part: done.part_bytes}
    if done.rejects is not None:
        recorded[done.rejects] = done.rejects_bytes
    for path, size in recorded.items():
        if size is None or store.size(path) != size:
            log.warning("unit %d: %s missing or not the recorded size; redoing the unit", index, path)
            return None
    return done


@functools.lru_cache(maxsize=4)
def _fetcher(opts: FetchOptions, max_bytes: int) -> Fetcher:
    return Fetcher(opts, max_bytes)


@dataclass(frozen=True, slots=True)
class _Checked:
    """A row that passed every check that needs no image: what its sample will hold."""

    row: ManifestRow
    output: str | None = None
    conversations: str | None = None
    text: str | None = None


def check_row(row: ManifestRow, ctx: UnitContext) -> _Checked | Reject:
    """The manifest- and validate-stage checks of one parsed row, for the run's layout."""
    def reject(stage: str, reason: str) -> Reject:
        return Reject(row.line, row.image_id, stage, reason)

    if row.kind == "trainer":
        if ctx.layout != "arrow":
            return reject("manifest", "a trainer-style row (conversations/text + modalities) needs --layout arrow")
        found = count_attachments(row.conversations, row.text, ctx.attachment_token)
        if found != len(row.locations):
            return reject("manifest", f"{found} attachment token(s) {ctx.attachment_token!r} in the text but "
                          f"{len(row.locations)} image modality(ies)")
        turns = orjson.dumps(list(row.conversations)).decode() if row.conversations is not None else None
        return _Checked(row, conversations=turns, text=row.text)
    if ctx.schema_json is None:
        return reject("manifest", "a row with 'output' needs --config (instructions and JSON schema)")
    verdict = validator_for(ctx.schema_json).check(row.output, MAX_OUTPUT_BYTES)
    if verdict.reason is not None:
        return reject("validate", verdict.reason)
    if ctx.layout == "arrow":
        turns = build_conversation(ctx.user_content or "", verdict.output, ctx.system_prompt)
        return _Checked(row, conversations=orjson.dumps(turns).decode())
    return _Checked(row, output=verdict.output)


def process_unit(unit: Unit, ctx: UnitContext) -> UnitResult:
    started = time.perf_counter()
    source = ctx.source
    if source is None:  # a programming error: every run's context names its input
        raise ValueError("UnitContext.source is not set")
    duplicates = frozenset(unit.duplicate_lines)
    rejects: list[Reject] = []
    ready: list[_Checked] = []
    num_rows = 0
    for row in source.read(unit, base=ctx.base, default_split=ctx.default_split):
        num_rows += 1
        if isinstance(row, Reject):
            rejects.append(row)
        elif row.line in duplicates:
            rejects.append(Reject(row.line, row.image_id, "duplicate",
                                  f"image_id {row.image_id!r} already seen on an earlier line"))
        else:
            checked = check_row(row, ctx)
            (rejects if isinstance(checked, Reject) else ready).append(checked)

    part_path, rejects_path, result_path = unit_paths(unit.index)
    writer = PartWriter(ctx.store, part_path)
    sizes: dict[str, list[int]] = {}
    extra_keys: set[str] = set()
    text_columns: set[str] = set()
    num_passthrough = 0
    warnings: Counter = Counter()
    tally_images = ImageTally()
    fetcher = _fetcher(ctx.fetch, ctx.image.max_image_bytes)
    tally = FetchTally()
    try:
        lookahead = functools.partial(source.urls_after, unit, ctx.fetch.concurrency, base=ctx.base,
                                      default_split=ctx.default_split)
        for checked, payloads in _prefetched(fetcher, ready, ctx.fetch.io_threads, tally, lookahead,
                                             ctx.fetch.concurrency):
            row = checked.row
            images = _transform_all(row, [data for data, _ in payloads], ctx)
            if isinstance(images, Reject):
                rejects.append(images)
                continue
            stored = _store_images(row, images, [st for _, st in payloads], ctx)
            sample = Sample(line=row.line, split=row.split, image_id=row.image_id, images=stored, meta=row.meta,
                            output=checked.output, conversations=checked.conversations, text=checked.text)
            sizes.setdefault(row.split, []).append(writer.write(sample))
            extra_keys.update(k for k in row.meta if k not in META_FIXED)
            text_columns.add("text" if checked.text is not None else "conversations")
            num_passthrough += sum(im.passthrough for im in images)
            warnings.update(kind for im in images for kind in im.warnings)
            tally_images.add(row.image_id, images)
    except BaseException as exc:
        writer.abort(exc)
        raise
    part_bytes = writer.close()

    rejects.sort(key=lambda r: r.line)
    rejects_data = b"".join(r.to_json() + b"\n" for r in rejects)
    if rejects:
        ctx.store.write_bytes(rejects_path, rejects_data, durable=False)
    num_written = sum(len(v) for v in sizes.values())
    if num_written + len(rejects) != num_rows:  # an invariant, not an input problem
        raise AssertionError(f"unit {unit.index}: {num_rows} rows but {num_written} written + {len(rejects)} rejected")
    result = UnitResult(
        index=unit.index,
        num_rows=num_rows,
        num_written=num_written,
        num_passthrough=num_passthrough,
        rejected=dict(Counter(r.stage for r in rejects)),
        meta_keys=tuple(sorted(extra_keys)),
        text_columns=tuple(sorted(text_columns)),
        sizes={k: np.asarray(v, dtype=np.int64) for k, v in sizes.items()},
        part=part_path,
        rejects=rejects_path if rejects else None,
        seconds=time.perf_counter() - started,
        part_bytes=part_bytes,
        rejects_bytes=len(rejects_data) if rejects else None,
        warnings=dict(sorted(warnings.items())),
        images=tally_images.to_dict(),
        fetch={**tally.to_dict(), "max_in_flight": fetcher.max_in_flight} if tally.num_requests or tally.num_cache_hits else None,
    )
    ctx.store.write_bytes(result_path, result.to_json(), durable=False)  # last: marks the unit complete
    return result


def _transform_all(row: ManifestRow, payloads: list[bytes | FetchFailure], ctx: UnitContext) -> list[EncodedImage] | Reject:
    images = []
    for i, data in enumerate(payloads):
        which = f"image {i + 1} of {len(payloads)}: " if len(payloads) > 1 else ""
        if isinstance(data, FetchFailure):
            return Reject(row.line, row.image_id, "fetch", which + data.reason)
        image = transform_bounded(data, ctx.image)
        if isinstance(image, ImageFailure):
            return Reject(row.line, row.image_id, "decode", which + image.reason)
        images.append(image)
    return images


def _store_images(row: ManifestRow, images: list[EncodedImage], stats: list[os.stat_result | None],
                  ctx: UnitContext) -> tuple[tuple[bytes | SourceRef | None, str], ...]:
    """(bytes, file name) to embed, or, for fs-image, write each file under OUT/images and keep
    (None, path relative to OUT).

    Names come from safe_stem, so no id can escape OUT. fs-image names also start with the
    manifest line number, which no other row shares, so two rows can never write the same file
    (an id like ``two-0`` next to a two-image row ``two``, say).
    """
    stem = safe_stem(row.image_id)
    suffixes = [""] if len(images) == 1 else [f"-{i}" for i in range(len(images))]
    if not ctx.images_as_paths:
        return tuple((_source_or_bytes(im, loc, st, ctx), f"{stem}{sfx}.{im.extension}")
                     for im, loc, st, sfx in zip(images, row.locations, stats, suffixes))
    stored = []
    for im, sfx in zip(images, suffixes):
        name = f"{row.line:08d}-{stem}{sfx}.{im.extension}"
        ctx.store.write_bytes(f"{IMAGES_DIR}/{name}", im.data)
        stored.append((None, f"{IMAGES_DIR}/{name}"))
    return tuple(stored)


def _source_or_bytes(image: EncodedImage, location: str, st: os.stat_result | None, ctx: UnitContext) -> bytes | SourceRef:
    """A pass-through image of a local file is referenced, not copied (see ``engine.sinks.parts``),
    as long as the bytes read have the size the open file had. ``st`` is the file's status taken
    by the fetcher before it read the bytes, so a file rewritten since shows a newer mtime when
    its shard is written, and stops the run instead of writing bytes that were never checked."""
    path = local_path(location) if ctx.reference_sources and image.passthrough and st is not None else None
    if path is None or st.st_size != len(image.data):
        return image.data
    return SourceRef(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _fetch_all(fetcher: Fetcher, row: ManifestRow) -> list[tuple[bytes | FetchFailure, os.stat_result | None]]:
    return [fetcher.fetch_with_stat(loc) for loc in row.locations]


def _take(future: Future, tally: FetchTally) -> tuple[bytes | FetchFailure, os.stat_result | None]:
    fetched = future.result()
    tally.add(fetched)
    fetched.release()  # the bytes are the unit's now: they no longer count against the fetch buffer
    return fetched.data, fetched.stat


def _prefetched(fetcher: Fetcher, rows: list[_Checked], threads: int, tally: FetchTally | None = None,
                lookahead: Callable[[], Iterator[str]] | None = None, concurrency: int | None = None):
    """Yield (row, [(bytes | FetchFailure, local file status or None) per image]) in order,
    fetching a bounded window ahead, so file and network I/O overlap with decoding: up to
    ``concurrency`` rows ahead when some are URLs (their requests share the process's event
    loop, and the fetch buffer bounds their bytes), ``threads`` for files. A unit of
    local files is read inline while they are small and quick to read (see
    INLINE_LOCAL_READ_BYTES). In the driver's threads, which share one process and take the
    units in order, a unit of URLs also starts fetching the rows after it (``lookahead``), so
    the next unit's images are not waited for when it starts."""
    if not rows:
        return
    if fetcher.inline_local_reads and all(fetcher.is_local(loc) for c in rows for loc in c.row.locations):
        for checked in rows:
            yield checked, _fetch_all(fetcher, checked.row)
        return
    remote = any(not fetcher.is_local(loc) for c in rows for loc in c.row.locations)
    concurrency = concurrency or threads
    ahead = max(1, concurrency if remote else threads)
    tally = tally if tally is not None else FetchTally()
    window: deque[tuple[_Checked, list[Future]]] = deque()
    pending = iter(rows)

    def submit(checked: _Checked) -> None:
        window.append((checked, [fetcher.submit(loc) for loc in checked.row.locations]))

    try:
        for checked in itertools.islice(pending, ahead):
            submit(checked)
        if remote and lookahead is not None and threading.current_thread() is not threading.main_thread():
            fetcher.speculate(lookahead(), limit=concurrency)
        while window:
            checked, futures = window.popleft()
            nxt = next(pending, None)
            if nxt is not None:
                submit(nxt)
            payloads = [_take(future, tally) for future in futures]
            futures = None  # nothing here keeps the fetched results alive
            yield checked, payloads
    finally:  # the unit failed or was abandoned: fetch nothing more for it
        for _, futures in window:
            for future in futures:
                future.cancel()

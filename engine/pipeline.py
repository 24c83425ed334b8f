"""One work unit end to end, in one process: read -> check -> fetch -> transform -> write.

Per-sample failures are data (:class:`Reject`), kept in line order. This module knows nothing of
Ray or the CLI; runners call :func:`process_unit` wherever they run it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from engine.bounds import ImageTimeout, time_limit, transform_bounded  # noqa: F401 - time_limit: the pipeline's bound
from engine.config import FetchOptions, ImageOptions
from engine.imaging import EncodedImage, ImageFailure, configure_pillow
from engine.layouts.base import MAX_OUTPUT_BYTES, Checked, Layout  # noqa: F401 - MAX_OUTPUT_BYTES: engine update's
from engine.records import META_FIXED, Reject, Sample, SourceRef, StoredImage
from engine.runners.lane import WAIT_STEP
from engine.runners.ray_startup import ray_running
from engine.sinks.parts import PartWriter
from engine.sinks.store import Store
from engine.sources.base import ManifestRow, Source, Unit
from engine.sources.fetch import Fetched, Fetcher, FetchFailure, FetchTally
from engine.stats import ImageTally
from engine.workdir import UnitResult, unit_paths

log = logging.getLogger(__name__)
EARLY_TOPUP_SECONDS, EARLY_TOPUP_POLL = 3.0, 0.02  # the early start's top-ups: how long, how often
LOOKAHEAD_EVERY = 4  # rows taken between top-ups of the look-ahead (each reads the manifest)


@dataclass(frozen=True, slots=True)
class UnitContext:
    """What every unit of a run shares: small and picklable."""

    layout: Layout  # the run's layout (engine.layouts.layout_for): row checks, image names
    schema_json: str | None  # None without a config.json
    image: ImageOptions
    fetch: FetchOptions
    default_split: str
    base: str  # folder that relative image paths resolve against
    store: Store  # the output folder (local or object storage)
    user_content: str | None = None  # packed layout from labelr rows: the user turn (tokens + prompt)
    system_prompt: str | None = None
    # Part files may reference unchanged local source images instead of copying them: true
    # when every process of the run (the shard writers too) sees this machine's files.
    reference_sources: bool = False
    source: Source | None = None  # the run's input: reads each unit's rows (engine.sources)


@functools.lru_cache(maxsize=4)
def _fetcher(opts: FetchOptions, max_bytes: int) -> Fetcher:
    return Fetcher(opts, max_bytes)


class _Drawn:
    """An iterator that says when it has run out (``speculate`` draws from it in several calls)."""

    def __init__(self, items: Iterator[str]):
        self._items, self.exhausted = items, False

    def __iter__(self) -> _Drawn:
        return self

    def __next__(self) -> str:
        try:
            return next(self._items)
        except StopIteration:
            self.exhausted = True
            raise


def start_fetching(ctx: UnitContext) -> None:
    """In the background: when the input's first rows are URLs, import and start this process's
    HTTP client and begin fetching them (as look-ahead, which the first units take over), so
    the import and the first round trip overlap the planning instead of delaying the first units."""
    fetch, source = ctx.fetch, ctx.source

    def start() -> None:
        started = time.perf_counter()
        try:
            fetcher = _fetcher(fetch, ctx.image.max_image_bytes)
            urls = (
                url  # a URL a local download cache holds is read like a file: no client for it
                for url in source.first_urls(
                    fetch.concurrency, base=ctx.base, default_split=ctx.default_split
                )
                if not fetcher.reads_locally(url)
            )
            first = next(urls, None)  # drawn lazily: the look-ahead goes on from the last row drawn
            if first is None:
                return
            rest = _Drawn(itertools.chain([first], urls))
            num = fetcher.speculate(rest, limit=fetch.concurrency)
            log.debug(
                "HTTP client started, %d first rows fetching, in %.2f s", num, time.perf_counter() - started
            )
            # the look-ahead's cap follows the body sizes (a large guess until the first answers):
            # top it up as they come, until the first rows are all asked for or the units took over
            until = time.monotonic() + EARLY_TOPUP_SECONDS
            while not rest.exhausted and num < fetch.concurrency and time.monotonic() < until:
                time.sleep(EARLY_TOPUP_POLL)
                num += fetcher.speculate(rest, limit=fetch.concurrency - num)
            log.debug("%d first rows fetching at %.2f s", num, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - only a head start is lost; the units fetch their rows
            log.debug("fetching the first rows early failed: %s: %s", type(exc).__name__, exc)

    threading.Thread(target=start, name="engine-http-start", daemon=True).start()


def check_row(row: ManifestRow, ctx: UnitContext) -> Checked | Reject:
    """The manifest- and validate-stage checks of one parsed row, for the run's layout."""
    return ctx.layout.check_row(row, ctx)


def process_unit(unit: Unit, ctx: UnitContext) -> UnitResult:
    started = time.perf_counter()
    configure_pillow(ctx.image.max_pixels)  # a unit may be a Ray worker's first image work
    source = ctx.source
    if source is None:  # a programming error: every run's context names its input
        raise ValueError("UnitContext.source is not set")
    duplicates = frozenset(unit.duplicate_lines)
    rejects: list[Reject] = []
    ready: list[Checked] = []
    num_rows = 0
    for row in source.read(unit, base=ctx.base, default_split=ctx.default_split):
        num_rows += 1
        if isinstance(row, Reject):
            rejects.append(row)
        elif row.line in duplicates:
            rejects.append(
                Reject(
                    row.line,
                    row.image_id,
                    "duplicate",
                    f"image_id {row.image_id!r} already seen on an earlier line",
                )
            )
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
        lookahead = functools.partial(
            source.urls_after, unit, ctx.fetch.concurrency, base=ctx.base, default_split=ctx.default_split
        )
        for checked, payloads in _prefetched(
            fetcher, ready, ctx.fetch.io_threads, tally, lookahead, ctx.fetch.concurrency
        ):
            row = checked.row
            images = _transform_all(row, [data for data, _ in payloads], ctx)
            if isinstance(images, Reject):
                rejects.append(images)
                continue
            stored = _store_images(row, images, [origin for _, origin in payloads], ctx)
            sample = Sample(
                line=row.line,
                split=row.split,
                image_id=row.image_id,
                images=stored,
                meta=row.meta,
                output=checked.output,
                conversations=checked.conversations,
                text=checked.text,
            )
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
        raise AssertionError(
            f"unit {unit.index}: {num_rows} rows but {num_written} written + {len(rejects)} rejected"
        )
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
        fetch={**tally.to_dict(), "max_in_flight": fetcher.max_in_flight}
        if tally.num_requests or tally.num_cache_hits
        else None,
    )
    ctx.store.write_bytes(result_path, result.to_json(), durable=False)  # last: marks the unit complete
    return result


def _transform_all(
    row: ManifestRow, payloads: list[bytes | FetchFailure], ctx: UnitContext
) -> list[EncodedImage] | Reject:
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


def _store_images(
    row: ManifestRow, images: list[EncodedImage], origins: list[SourceRef | None], ctx: UnitContext
) -> tuple[StoredImage, ...]:
    """The images to embed under the names the layout gives (bytes, or a reference to the local
    source), or, for a layout of image files, each file written at its path under OUT (no bytes kept)."""
    names = ctx.layout.image_names(row, [im.extension for im in images])
    if not ctx.layout.image_files:
        return tuple(
            StoredImage(_source_or_bytes(im, origin, ctx), name)
            for im, origin, name in zip(images, origins, names)
        )
    for im, name in zip(images, names):
        ctx.store.write_bytes(name, im.data)
    return tuple(StoredImage(None, name) for name in names)


def _source_or_bytes(image: EncodedImage, origin: SourceRef | None, ctx: UnitContext) -> bytes | SourceRef:
    """A pass-through image whose bytes lie in a local file (the file itself, a local tar's
    member, a local download-cache entry) is referenced there, not copied (see
    ``engine.sinks.parts``), as long as the bytes read have the size the reference records.
    The fetcher took the file's status before it read the bytes, so a file rewritten since
    shows a newer mtime when its shard is written, and stops the run instead of writing bytes
    that were never checked."""
    keep = (
        ctx.reference_sources and image.passthrough and origin is not None and origin.size == len(image.data)
    )
    return origin if keep else image.data


def _take(fetched: Fetched, tally: FetchTally) -> tuple[bytes | FetchFailure, SourceRef | None]:
    tally.add(fetched)
    fetched.release()  # the bytes are the unit's now: they no longer count against the fetch buffer
    return fetched.data, fetched.origin


def _result(future: Future) -> Fetched:
    """The future's result, waited for in steps: Ctrl-C may reach another thread than the one
    waiting, and the main thread acts on it only when a wait ends."""
    while True:
        try:
            return future.result(timeout=WAIT_STEP)
        except FutureTimeout:
            continue


def _prefetched(
    fetcher: Fetcher,
    rows: list[Checked],
    threads: int,
    tally: FetchTally | None = None,
    lookahead: Callable[[], Iterator[str]] | None = None,
    concurrency: int | None = None,
):
    """Yield (row, [(bytes | FetchFailure, where they lie in a local file or None) per image])
    in order, fetching a bounded window ahead, so file and network I/O overlap with decoding: up
    to ``concurrency`` rows ahead when some are URLs (their requests share the process's event
    loop, and the fetch buffer bounds their bytes), ``threads`` for files. A unit of local
    files (or of URLs a local download cache holds) is read inline while they are small and
    quick to read (see INLINE_LOCAL_READ_BYTES). In the driver's threads, which share one
    process and take the units in order, a unit of URLs also starts fetching the rows after it
    (``lookahead``), so the next unit's images are not waited for when it starts."""
    if not rows:
        return
    tally = tally if tally is not None else FetchTally()
    local = [fetcher.reads_locally(loc) for c in rows for loc in c.row.locations]
    if fetcher.inline_local_reads and all(local):
        for checked in rows:
            yield checked, [_take(fetcher.read(loc), tally) for loc in checked.row.locations]
        return
    remote = not all(local)
    concurrency = concurrency or threads
    ahead = max(1, concurrency if remote else threads)
    window: deque[tuple[Checked, list[Future]]] = deque()
    pending = iter(rows)

    def submit(checked: Checked) -> None:
        window.append((checked, [fetcher.submit(loc) for loc in checked.row.locations]))

    # once Ray runs beside the driver, the units after a thread's may go to Ray's workers, which
    # would fetch again the rows it looked ahead at
    looking_ahead = (
        remote
        and lookahead is not None
        and threading.current_thread() is not threading.main_thread()
        and not ray_running()
    )
    try:
        for checked in itertools.islice(pending, ahead):
            submit(checked)
        if looking_ahead:
            fetcher.speculate(lookahead(), limit=concurrency)
        for taken in itertools.count(1):
            if not window:
                break
            checked, futures = window.popleft()
            nxt = next(pending, None)
            if nxt is not None:
                submit(nxt)
            # topped up as rows are taken (and the first bodies show their size), so the rows
            # after this unit are ready when a thread takes them, not only at this unit's start
            if (
                looking_ahead
                and taken % LOOKAHEAD_EVERY == 0
                and fetcher.lookahead_room() >= LOOKAHEAD_EVERY
                and not ray_running()
            ):
                fetcher.speculate(lookahead(), limit=concurrency)
            payloads = [_take(_result(future), tally) for future in futures]
            futures = None  # nothing here keeps the fetched results alive
            yield checked, payloads
    finally:  # the unit failed or was abandoned: fetch nothing more for it
        for _, futures in window:
            for future in futures:
                future.cancel()

"""One work unit end to end, in one process: read -> validate -> fetch -> transform -> write.

Per-sample failures are data (:class:`Reject`), kept in line order. This module knows nothing of
Ray or the CLI; runners call :func:`process_unit` wherever they run it.
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from engine.config import FetchOptions, ImageOptions
from engine.imaging import ImageFailure, transform_image
from engine.naming import safe_stem
from engine.records import META_FIXED, Reject, Sample
from engine.sinks.parts import PartWriter
from engine.sources.fetch import FetchFailure, Fetcher
from engine.sources.location import parent
from engine.sources.manifest import ManifestRow, UnitSpec, parse_row, read_unit_lines
from engine.validate import validator_for

MAX_OUTPUT_BYTES = 1 << 20  # an `output` larger than 1 MiB is rejected at the validate stage


@dataclass(frozen=True, slots=True)
class UnitContext:
    """What every unit of a run shares: small and picklable."""

    schema_json: str
    image: ImageOptions
    fetch: FetchOptions
    default_split: str
    work_dir: str


@dataclass(slots=True)
class UnitResult:
    index: int
    num_rows: int
    num_written: int
    num_passthrough: int
    rejected: dict[str, int]
    meta_keys: tuple[str, ...]  # extra meta keys seen (beyond the fixed ones)
    sizes: dict[str, np.ndarray]  # split -> byte size of every written row, in line order
    part: str | None
    rejects: str | None
    seconds: float
    node: str | None = field(default=None)


def unit_paths(work_dir: str, index: int) -> tuple[str, str]:
    stem = os.path.join(work_dir, "parts", f"unit-{index:06d}")
    return stem + ".arrow", stem + ".rejects.jsonl"


@functools.lru_cache(maxsize=4)
def _fetcher(opts: FetchOptions, max_bytes: int) -> Fetcher:
    return Fetcher(opts, max_bytes)


def process_unit(unit: UnitSpec, ctx: UnitContext) -> UnitResult:
    started = time.perf_counter()
    base = parent(unit.manifest)
    validator = validator_for(ctx.schema_json)
    duplicates = frozenset(unit.duplicate_lines)
    rejects: list[Reject] = []
    ready: list[tuple[ManifestRow, str]] = []  # rows that passed manifest, duplicate, validate
    num_rows = 0
    for line, raw in read_unit_lines(unit):
        num_rows += 1
        row = parse_row(line, raw, base=base, default_split=ctx.default_split)
        if isinstance(row, Reject):
            rejects.append(row)
        elif line in duplicates:
            rejects.append(Reject(line, row.image_id, "duplicate", f"image_id {row.image_id!r} already seen on an earlier line"))
        else:
            verdict = validator.check(row.output, MAX_OUTPUT_BYTES)
            if verdict.reason is not None:
                rejects.append(Reject(line, row.image_id, "validate", verdict.reason))
            else:
                ready.append((row, verdict.output))

    part_path, rejects_path = unit_paths(ctx.work_dir, unit.index)
    tmp_dir = os.path.join(ctx.work_dir, "tmp")
    writer = PartWriter(part_path, tmp_dir)
    sizes: dict[str, list[int]] = {}
    extra_keys: set[str] = set()
    num_passthrough = 0
    fetcher = _fetcher(ctx.fetch, ctx.image.max_image_bytes)
    try:
        for row, output, data in _prefetched(fetcher, ready, ctx.fetch.io_threads):
            if isinstance(data, FetchFailure):
                rejects.append(Reject(row.line, row.image_id, "fetch", data.reason))
                continue
            image = transform_image(data, ctx.image)
            del data
            if isinstance(image, ImageFailure):
                rejects.append(Reject(row.line, row.image_id, "decode", image.reason))
                continue
            sample = Sample(line=row.line, split=row.split, image_id=row.image_id, image_bytes=image.data,
                            image_name=f"{safe_stem(row.image_id)}.{image.extension}", output=output, meta=row.meta)
            writer.write(sample)
            sizes.setdefault(row.split, []).append(sample.num_bytes)
            extra_keys.update(k for k in row.meta if k not in META_FIXED)
            num_passthrough += image.passthrough
    except BaseException as exc:
        writer.abort(exc)
        raise
    writer.close()

    rejects.sort(key=lambda r: r.line)
    if rejects:
        with open(rejects_path, "wb") as f:
            f.writelines(r.to_json() + b"\n" for r in rejects)
    num_written = sum(len(v) for v in sizes.values())
    if num_written + len(rejects) != num_rows:  # an invariant, not an input problem
        raise AssertionError(f"unit {unit.index}: {num_rows} rows but {num_written} written + {len(rejects)} rejected")
    return UnitResult(
        index=unit.index,
        num_rows=num_rows,
        num_written=num_written,
        num_passthrough=num_passthrough,
        rejected=dict(Counter(r.stage for r in rejects)),
        meta_keys=tuple(sorted(extra_keys)),
        sizes={k: np.asarray(v, dtype=np.int64) for k, v in sizes.items()},
        part=part_path,
        rejects=rejects_path if rejects else None,
        seconds=time.perf_counter() - started,
    )


def _prefetched(fetcher: Fetcher, rows: list[tuple[ManifestRow, str]], threads: int):
    """Yield (row, output, bytes | FetchFailure) in order, fetching a bounded window ahead in
    threads so file and network I/O overlap with decoding."""
    if not rows:
        return
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fetch") as pool:
        window: deque[tuple[ManifestRow, str, Future]] = deque()
        pending = iter(rows)
        for row, output in pending:
            window.append((row, output, pool.submit(fetcher.fetch, row.location)))
            if len(window) >= threads:
                break
        while window:
            row, output, future = window.popleft()
            nxt = next(pending, None)
            if nxt is not None:
                window.append((nxt[0], nxt[1], pool.submit(fetcher.fetch, nxt[0].location)))
            yield row, output, future.result()

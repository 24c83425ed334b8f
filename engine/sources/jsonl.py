"""The labelr-style JSONL manifest (FORMATS.md §1): the first Source.

Planning (driver) streams the file once in large blocks: it records the byte range of every
work unit and each row's id (``engine.sources.identity``), and finds repeated ids with polars.
Reading (worker) parses only its own byte range, one line at a time, so one bad line can
never fail its neighbours.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from engine.config import SPLIT_NAME
from engine.errors import UsageError
from engine.records import Reject
from engine.sources import location, register

# ManifestRow: its old home; build_meta: manifest.py re-exports it from here
from engine.sources.base import ManifestRow, Row, Source, SourcePlan, build_meta, json_kind  # noqa: F401
from engine.sources.identity import duplicate_lines, is_trainer, row_id

BLOCK_BYTES = 8 * 2**20
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which Windows tools put at the start of a file


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """A small, picklable work unit: a byte range of the manifest and what the driver knows."""

    index: int
    manifest: str
    byte_start: int
    byte_end: int
    first_line: int  # 1-based number of the physical line at byte_start
    num_rows: int  # non-blank lines in the range
    duplicate_lines: tuple[int, ...]  # lines whose image_id an earlier line already claimed


@dataclass(frozen=True)
class ManifestPlan(SourcePlan):
    num_bytes: int = 0

    def merge(self, index: int, group: Sequence[UnitSpec]) -> UnitSpec:
        return UnitSpec(
            index=index,
            manifest=group[0].manifest,
            byte_start=group[0].byte_start,
            byte_end=group[-1].byte_end,
            first_line=group[0].first_line,
            num_rows=sum(u.num_rows for u in group),
            duplicate_lines=tuple(d for u in group for d in u.duplicate_lines),
        )


def _open_manifest(manifest: str):
    try:
        return location.open_binary(manifest)
    except FileNotFoundError:
        raise UsageError(f"manifest not found: {manifest}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot read manifest {manifest}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def check_has_rows(manifest: str) -> None:
    """Raise UsageError when the manifest holds no row (empty, or only blank lines): almost
    certainly the wrong file, which should not cost the user the output folder. Reads only up to
    the first non-blank byte."""
    with _open_manifest(manifest) as f:
        first = True
        while block := f.read(2**16):
            if first:
                block, first = block.removeprefix(BOM), False
            if block.strip():
                return
    raise _no_rows(manifest)


def _no_rows(manifest: str) -> UsageError:
    return UsageError(f"manifest {manifest} holds no rows (it is empty or has only blank lines)")


def plan_manifest(manifest: str, unit_rows: int) -> ManifestPlan:
    """Split the manifest into units of ``unit_rows`` non-blank lines and find duplicate ids."""
    import polars as pl  # the driver's planner only: workers never import it

    bounds: list[tuple[int, int, int, int]] = []  # (byte_start, byte_end, first_line, rows)
    id_lines: list[np.ndarray] = []
    ids: list = []  # polars Series of each block's ids: no Python object per row is kept
    unit_start, unit_first_line, unit_count = 0, 1, 0
    offset, line_no, num_rows = 0, 0, 0
    f = _open_manifest(manifest)
    digest = hashlib.sha256()
    with f:
        carry = b""
        while True:
            block = f.read(BLOCK_BYTES)
            digest.update(block)
            buf = carry + block
            if not block:
                lines, carry = ([buf] if buf else []), b""
            else:
                lines = buf.split(b"\n")
                carry = lines.pop()
            block_lines: list[int] = []
            block_ids: list[str | None] = []
            for raw in lines:
                line_no += 1
                start = offset
                offset += len(raw) + 1
                if line_no == 1:
                    raw = raw.removeprefix(BOM)
                if not raw.strip():
                    continue
                if unit_count == unit_rows:
                    bounds.append((unit_start, start, unit_first_line, unit_count))
                    unit_start, unit_first_line, unit_count = start, line_no, 0
                unit_count += 1
                num_rows += 1
                block_lines.append(line_no)
                block_ids.append(_line_id(raw, line_no))
            if block_lines:
                id_lines.append(np.asarray(block_lines, dtype=np.int64))
                ids.append(pl.Series("id", block_ids, dtype=pl.String))
            if not block:
                break
    if unit_count:
        bounds.append((unit_start, offset, unit_first_line, unit_count))
    if not num_rows:  # emptied since check_has_rows
        raise _no_rows(manifest)
    duplicates = duplicate_lines(np.concatenate(id_lines), pl.concat(ids, rechunk=False))
    units = []
    for i, (start, end, first, rows) in enumerate(bounds):
        last = bounds[i + 1][2] if i + 1 < len(bounds) else line_no + 1
        lo, hi = np.searchsorted(duplicates, [first, last])
        units.append(
            UnitSpec(
                index=i,
                manifest=manifest,
                byte_start=start,
                byte_end=end,
                first_line=first,
                num_rows=rows,
                duplicate_lines=tuple(int(x) for x in duplicates[lo:hi]),
            )
        )
    return ManifestPlan(
        units=units,
        num_rows=num_rows,
        num_duplicates=len(duplicates),
        num_bytes=offset,
        sha256=digest.hexdigest(),
    )


def _line_id(raw: bytes, line: int) -> str | None:
    """The id ``parse_row`` gives this line's row (None for a line it rejects without an id)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:  # also invalid UTF-8
        return None
    return row_id(obj, line) if isinstance(obj, dict) else None


def read_unit_lines(unit: UnitSpec) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for every non-blank line of the unit."""
    with location.open_binary(unit.manifest) as f:
        f.seek(unit.byte_start)
        data = f.read(unit.byte_end - unit.byte_start)
    if unit.byte_start == 0:
        data = data.removeprefix(BOM)
    for i, raw in enumerate(data.split(b"\n")):
        if raw.strip():
            yield unit.first_line + i, raw


def parse_row(line: int, raw: bytes, *, base: str, default_split: str) -> Row | Reject:
    """One manifest line -> a row, or a ``manifest``-stage reject naming what is wrong."""

    def reject(reason: str, image_id: str | None = None) -> Reject:
        return Reject(line, image_id, "manifest", reason)

    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject(f"line is not valid UTF-8 (byte {exc.start})")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return reject(f"line is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return reject(f"line is {json_kind(obj)}, not a JSON object")
    trainer = is_trainer(obj)
    image_id = row_id(obj, line)
    if image_id is None:
        return reject("no 'image_id' (a non-empty string)")
    if "\x00" in image_id:
        return reject("'image_id' contains a NUL byte", image_id.replace("\x00", "\\0"))
    split = obj.get("split") or default_split
    if not isinstance(split, str) or not SPLIT_NAME.match(split):
        return reject(f"invalid split name {split!r}", image_id)
    if trainer:
        return _trainer_row(obj, line, image_id, split, base, reject)
    where = obj.get("image_path") or obj.get("image_url")
    if not isinstance(where, str) or not where:
        return reject("no 'image_path' or 'image_url'", image_id)
    if "\x00" in where:
        return reject("image location contains a NUL byte", image_id)
    if "output" not in obj:
        return reject("no 'output'", image_id)
    return Row(
        line=line,
        kind="labelr",
        image_id=image_id,
        split=split,
        locations=(location.resolve(where, base),),
        meta=build_meta(obj),
        output=obj["output"],
    )


def _trainer_row(
    obj: dict[str, Any], line: int, image_id: str, split: str, base: str, reject
) -> Row | Reject:
    conversations, text = obj.get("conversations"), obj.get("text")
    if (conversations is None) == (text is None):
        return reject("a trainer-style row needs exactly one of 'conversations' and 'text'", image_id)
    if conversations is not None:
        if (
            not isinstance(conversations, list)
            or not conversations
            or not all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
                for t in conversations
            )
        ):
            return reject("'conversations' must be a non-empty list of {role, content} strings", image_id)
        conversations = tuple({"role": t["role"], "content": t["content"]} for t in conversations)
    elif not isinstance(text, str):
        return reject("'text' must be a string", image_id)
    modalities = obj.get("modalities", [])
    if not isinstance(modalities, list):
        return reject("'modalities' must be a list", image_id)
    locations = []
    for i, m in enumerate(modalities):
        if not isinstance(m, dict) or m.get("type") != "image":
            return reject(f"modality {i + 1} is not of type 'image'", image_id)
        value = m.get("value")
        if not isinstance(value, str) or not value or "\x00" in value:
            return reject(f"modality {i + 1} has no image path in 'value'", image_id)
        locations.append(location.resolve(value, base))
    return Row(
        line=line,
        kind="trainer",
        image_id=image_id,
        split=split,
        locations=tuple(locations),
        meta={},
        conversations=conversations,
        text=text,
    )


def manifest_sha256(manifest: str) -> str:
    """The SHA-256 of the manifest's bytes (what ``plan_manifest`` records), without planning."""
    digest = hashlib.sha256()
    with _open_manifest(manifest) as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


@register
@dataclass(frozen=True)
class JsonlSource(Source):
    """A JSONL manifest of labelr rows and trainer rows; what ``--manifest`` has always read."""

    kind = "jsonl"
    expects = "a JSONL manifest"
    detect_last = True
    where: str

    @classmethod
    def detect(cls, where: str) -> bool:
        # any file: its lines are checked row by row, as they always were; a local folder no
        # other source claims is not a manifest (source_for then names what it expected)
        path = location.local_path(where)
        return path is None or not os.path.isdir(path)

    def check(self) -> None:
        check_has_rows(self.where)

    def plan(self, grain: int) -> ManifestPlan:
        return plan_manifest(self.where, grain)

    def sha256(self) -> str:
        return manifest_sha256(self.where)

    def read(self, unit: UnitSpec, *, base: str, default_split: str) -> Iterator[Row | Reject]:
        self._claim(unit)
        for line, raw in read_unit_lines(unit):
            yield parse_row(line, raw, base=base, default_split=default_split)

    def urls_after(self, unit: UnitSpec, num_rows: int, *, base: str, default_split: str) -> Iterator[str]:
        """The URLs of about ``num_rows`` rows after ``unit`` that no unit of this process has
        started and no earlier look-ahead has seen."""
        progress = self._progress()
        with _RUNS_LOCK:
            start = max(unit.byte_end, progress.frontier)
        per_row = (unit.byte_end - unit.byte_start) / max(unit.num_rows, 1)
        return self._urls_from(unit.manifest, start, int(per_row * num_rows * 2) + 4096, base, default_split)

    def first_urls(self, num_rows: int, *, base: str, default_split: str) -> Iterator[str]:
        # about 1 KB a row at most (labelr rows are a few hundred bytes); rows past it are the units'
        return self._urls_from(self.where, 0, num_rows * 1024 + 4096, base, default_split)

    def _urls_from(
        self, manifest: str, start: int, size: int, base: str, default_split: str
    ) -> Iterator[str]:
        from engine.sources.fetch import Fetcher

        progress = self._progress()
        with location.open_binary(manifest) as f:
            f.seek(start)
            data = f.read(size)
        if start == 0 and data.startswith(BOM):
            data, start = data[len(BOM) :], len(BOM)
        if b"://" not in data:  # no URL in these rows (a manifest of files): nothing to parse
            with _RUNS_LOCK:
                progress.frontier = max(progress.frontier, start + data.rfind(b"\n") + 1)
            return
        offset = start
        for raw in data.split(b"\n")[:-1]:  # the last piece may be cut short
            pos, offset = offset, offset + len(raw) + 1
            with _RUNS_LOCK:  # other threads start units meanwhile
                progress.frontier = max(progress.frontier, offset)
                claimed = any(a <= pos < b for a, b in progress.started)
            if claimed or not raw.strip():
                continue
            row = parse_row(0, raw, base=base, default_split=default_split)
            if not isinstance(row, Reject):
                yield from (loc for loc in row.locations if isinstance(loc, str) and Fetcher.is_http(loc))

    def close(self) -> None:
        with _RUNS_LOCK:
            _RUNS.pop(id(self), None)

    def _claim(self, unit: UnitSpec) -> None:
        progress = self._progress()
        with _RUNS_LOCK:
            progress.started.append((unit.byte_start, unit.byte_end))

    def _progress(self) -> _Progress:
        with _RUNS_LOCK:
            progress = _RUNS.get(id(self))
            if progress is None:
                progress = _RUNS[id(self)] = _Progress()
                # a copy unpickled in a worker is never closed: its entry goes when the copy does
                weakref.finalize(self, _drop_run, id(self), progress)
        return progress


@dataclass
class _Progress:
    """What this process's units of one run have started or looked ahead at, in one manifest."""

    started: deque = field(default_factory=lambda: deque(maxlen=256))  # (byte_start, byte_end) of units
    frontier: int = 0  # rows before this offset have been looked ahead at already


# Per source object (one per run and process): the rows after a unit that no started unit
# holds are the ones this process's threads take next.
_RUNS: dict[int, _Progress] = {}
_RUNS_LOCK = threading.Lock()


def _drop_run(key: int, progress: _Progress) -> None:
    with _RUNS_LOCK:
        if _RUNS.get(key) is progress:  # not a later object's entry under a reused id
            del _RUNS[key]

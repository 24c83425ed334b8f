"""The labelr-style JSONL manifest (FORMATS.md §1).

Planning (driver) streams the file once in large blocks: it records the byte range of every
work unit and finds repeated ``image_id``s with polars, without holding rows as Python objects.
Reading (worker) parses only its own byte range, one line at a time, so one bad line can
never fail its neighbours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from engine.config import SPLIT_NAME
from engine.errors import UsageError
from engine.records import META_FIXED, RESERVED_KEYS, Reject
from engine.sources import location

BLOCK_BYTES = 8 * 2**20
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which Windows tools put at the start of a file
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


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
class ManifestPlan:
    units: list[UnitSpec]
    num_rows: int
    num_duplicates: int
    num_bytes: int
    sha256: str = ""  # of the manifest's bytes: part of the run's fingerprint

    def coalesce(self, rows_per_unit: int) -> ManifestPlan:
        """Merge consecutive units into units of about ``rows_per_unit`` rows, except the first,
        which stays small: the driver measures it to decide whether starting Ray pays. The output
        does not depend on unit boundaries, so this only tunes parallelism and load balance."""
        grain = max((u.num_rows for u in self.units), default=1)
        k = max(1, rows_per_unit // max(grain, 1))
        if k == 1 or not self.units:
            return self
        merged = []
        bounds = [0] + list(range(1, len(self.units), k))
        for i in bounds:
            group = self.units[i:i + k] if i else self.units[:1]
            merged.append(UnitSpec(index=len(merged), manifest=group[0].manifest, byte_start=group[0].byte_start,
                                   byte_end=group[-1].byte_end, first_line=group[0].first_line,
                                   num_rows=sum(u.num_rows for u in group),
                                   duplicate_lines=tuple(d for u in group for d in u.duplicate_lines)))
        return ManifestPlan(units=merged, num_rows=self.num_rows, num_duplicates=self.num_duplicates,
                            num_bytes=self.num_bytes, sha256=self.sha256)


def _open_manifest(manifest: str):
    try:
        return location.open_binary(manifest)
    except FileNotFoundError:
        raise UsageError(f"manifest not found: {manifest}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read manifest {manifest}: {getattr(exc, 'strerror', None) or exc}") from None


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
    id_frames: list[pl.DataFrame] = []
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
            block_texts: list[str | None] = []
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
                try:
                    block_texts.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    block_texts.append(None)
            if block_lines:
                texts = pl.Series("id", block_texts, dtype=pl.String)
                # a row's identity: image_id, or a trainer-style row's id (as parse_row reads it)
                ids = texts.str.json_path_match("$.image_id").fill_null(texts.str.json_path_match("$.id"))
                id_frames.append(pl.DataFrame({"line": block_lines, "id": ids}))
            if not block:
                break
    if unit_count:
        bounds.append((unit_start, offset, unit_first_line, unit_count))
    if not num_rows:  # emptied since check_has_rows
        raise _no_rows(manifest)
    duplicates = _duplicate_lines(id_frames)
    units = []
    for i, (start, end, first, rows) in enumerate(bounds):
        last = bounds[i + 1][2] if i + 1 < len(bounds) else line_no + 1
        lo, hi = np.searchsorted(duplicates, [first, last])
        units.append(UnitSpec(index=i, manifest=manifest, byte_start=start, byte_end=end, first_line=first,
                              num_rows=rows, duplicate_lines=tuple(int(x) for x in duplicates[lo:hi])))
    return ManifestPlan(units=units, num_rows=num_rows, num_duplicates=len(duplicates), num_bytes=offset,
                        sha256=digest.hexdigest())


def _duplicate_lines(frames: list) -> np.ndarray:
    """Lines whose id an earlier line already has (polars frames of line, id)."""
    import polars as pl

    if not frames:
        return np.zeros(0, dtype=np.int64)
    ids = pl.concat(frames).filter(pl.col("id").is_not_null() & (pl.col("id") != ""))
    dup = ids.filter(~pl.col("id").is_first_distinct()).get_column("line")
    return np.sort(dup.to_numpy().astype(np.int64))


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


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """A parsed manifest line. ``kind`` is ``labelr`` (image + output) or ``trainer``
    (conversations or text + image modalities, the packed trainer's own JSONL)."""

    line: int
    kind: str
    image_id: str
    split: str
    locations: tuple[str, ...]  # resolved against the base folder
    meta: dict[str, str | None]
    output: Any = None
    conversations: tuple[dict[str, str], ...] | None = None
    text: str | None = None


def parse_row(line: int, raw: bytes, *, base: str, default_split: str) -> ManifestRow | Reject:
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
        return reject(f"line is {_JSON_KINDS.get(type(obj), 'a JSON value')}, not a JSON object")
    trainer = "modalities" in obj or "conversations" in obj or ("text" in obj and "output" not in obj)
    image_id = obj.get("image_id")
    if image_id is None and trainer:
        image_id = obj.get("id", f"line-{line}")
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        image_id = str(image_id)
    if not isinstance(image_id, str) or not image_id:
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
    return ManifestRow(line=line, kind="labelr", image_id=image_id, split=split,
                       locations=(location.resolve(where, base),), meta=build_meta(obj), output=obj["output"])


def _trainer_row(obj: dict[str, Any], line: int, image_id: str, split: str, base: str, reject) -> ManifestRow | Reject:
    conversations, text = obj.get("conversations"), obj.get("text")
    if (conversations is None) == (text is None):
        return reject("a trainer-style row needs exactly one of 'conversations' and 'text'", image_id)
    if conversations is not None:
        if not isinstance(conversations, list) or not conversations or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in conversations
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
    return ManifestRow(line=line, kind="trainer", image_id=image_id, split=split, locations=tuple(locations),
                       meta={}, conversations=conversations, text=text)


def build_meta(obj: dict[str, Any]) -> dict[str, str | None]:
    """barcode, off_image_id, image_url, then every other non-reserved key, as strings."""
    meta: dict[str, str | None] = {k: _as_text(obj.get(k)) for k in META_FIXED}
    meta["image_url"] = _as_text(obj.get("image_url"))
    for key, value in obj.items():
        if key not in RESERVED_KEYS and key not in META_FIXED:
            meta[key] = _as_text(value)
    return meta


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()

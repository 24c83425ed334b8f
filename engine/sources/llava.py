"""LLaVA / ShareGPT JSON (FORMATS.md §4b): a JSON array of samples, or JSONL, one sample a line.

Each sample is ``conversations`` of ``{from, value}`` (or ``messages`` of ``{role, content}``,
content a string or a list of ``{type: text|image}`` parts) with ``image`` or ``images`` paths
resolved against the base folder. It becomes a trainer row: roles mapped (human -> user, gpt ->
assistant), ``<image>`` tokens replaced by the attachment token (engine.sources.sharegpt).

A JSON array is never loaded whole: the planner finds each item's byte span block by block
(engine.sources.jsonarray), and a worker parses only its unit's items, one at a time.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import orjson

from engine.config import DEFAULT_ATTACHMENT_TOKEN, SPLIT_NAME
from engine.errors import UsageError
from engine.records import Reject
from engine.sources import identity, jsonarray, location, register, sharegpt
from engine.sources.base import Row, Source, SourcePlan, json_kind

BLOCK_BYTES = 8 * 2**20
_PEEK_BYTES = 1 << 20  # detection reads at most this much


@dataclass(frozen=True, slots=True)
class LlavaUnit:
    """A byte range of the file holding ``num_rows`` consecutive samples."""

    index: int
    path: str
    array: bool  # a JSON array's items (rows numbered by item) or JSONL lines (by line)
    byte_start: int
    byte_end: int
    first_row: int  # the first item's 1-based number, or the first line's
    num_rows: int
    duplicate_lines: tuple[int, ...]


@dataclass(frozen=True)
class LlavaPlan(SourcePlan):
    def merge(self, index: int, group) -> LlavaUnit:
        first = group[0]
        return LlavaUnit(
            index=index,
            path=first.path,
            array=first.array,
            byte_start=first.byte_start,
            byte_end=group[-1].byte_end,
            first_row=first.first_row,
            num_rows=sum(u.num_rows for u in group),
            duplicate_lines=tuple(d for u in group for d in u.duplicate_lines),
        )


def _row_id(obj, line: int) -> str:
    """A sample's id, as for trainer-style JSONL: ``image_id``, else ``id`` (LLaVA's), else ``line-N``."""
    value = obj.get("image_id", obj.get("id")) if isinstance(obj, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value else f"line-{line}"


def _first_bytes(where: str) -> bytes:
    with location.open_binary(where) as f:
        return f.read(_PEEK_BYTES).removeprefix(jsonarray.BOM)


@register
@dataclass(frozen=True)
class LlavaSource(Source):
    kind: ClassVar[str] = "llava"
    expects: ClassVar[str] = (
        "a LLaVA/ShareGPT .json array or JSONL (conversations of {from, value}, or "
        "messages of {role, content})"
    )
    where: str
    attachment_token: str = DEFAULT_ATTACHMENT_TOKEN

    @classmethod
    def detect(cls, where: str) -> bool:
        """A ``.json`` file that is an array, or JSONL whose first row is a ShareGPT sample (a
        row with ``output`` is a labelr manifest, whatever else it holds)."""
        try:
            head = _first_bytes(where).lstrip()
        except (OSError, ValueError):
            return False
        if head[:1] == b"[":
            return where.lower().endswith(".json")
        line = head.split(b"\n", 1)[0]
        try:
            return sharegpt.is_sharegpt(orjson.loads(line))
        except orjson.JSONDecodeError:
            return False

    @classmethod
    def from_options(cls, opts) -> LlavaSource:
        return cls(opts.manifest, attachment_token=opts.attachment_token)

    def check(self) -> None:
        try:
            head = _first_bytes(self.where)
        except FileNotFoundError:
            raise UsageError(f"input not found: {self.where}") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {self.where}: {getattr(exc, 'strerror', None) or exc}") from None
        if not head.strip():
            raise UsageError(f"{self.where} holds no samples (it is empty)")

    def _is_array(self) -> bool:
        return _first_bytes(self.where).lstrip()[:1] == b"["

    def plan(self, grain: int) -> LlavaPlan:
        array = self._is_array()
        digest = hashlib.sha256()
        lines: list[int] = []
        ids: list[str] = []
        bounds: list[tuple[int, int, int, int]] = []  # (byte_start, byte_end, first_row, rows)
        with location.open_binary(self.where) as f:

            def read(n: int) -> bytes:
                block = f.read(n)
                digest.update(block)
                return block

            spans = _array_items(read) if array else _jsonl_items(read)
            try:
                for row, start, end, raw in spans:
                    if not bounds or bounds[-1][3] == grain:
                        bounds.append((start, end, row, 0))
                    s, _, first, n = bounds[-1]
                    bounds[-1] = (s, end, first, n + 1)
                    lines.append(row)
                    try:
                        ids.append(_row_id(orjson.loads(raw), row))
                    except orjson.JSONDecodeError:
                        ids.append(f"line-{row}")  # its reader rejects it
            except jsonarray.NotAnArray as exc:
                raise UsageError(f"{self.where}: {exc}") from None
        if not lines:
            raise UsageError(f"{self.where} holds no samples")
        dups = identity.duplicate_lines(lines, ids)
        units = []
        for i, (start, end, first, rows) in enumerate(bounds):
            last = bounds[i + 1][2] if i + 1 < len(bounds) else lines[-1] + 1
            lo, hi = np.searchsorted(dups, [first, last])
            units.append(
                LlavaUnit(
                    index=i,
                    path=self.where,
                    array=array,
                    byte_start=start,
                    byte_end=end,
                    first_row=first,
                    num_rows=rows,
                    duplicate_lines=tuple(int(x) for x in dups[lo:hi]),
                )
            )
        return LlavaPlan(
            units=units, num_rows=len(lines), num_duplicates=len(dups), sha256=digest.hexdigest()
        )

    def read(self, unit: LlavaUnit, *, base: str, default_split: str) -> Iterator[Row | Reject]:
        with location.open_binary(unit.path) as f:
            f.seek(unit.byte_start)
            data = f.read(unit.byte_end - unit.byte_start)
        if unit.array:
            items = (
                (unit.first_row + k, raw)
                for k, (_, _, raw) in enumerate(
                    jsonarray.items(io.BytesIO(data).read, unit.byte_start, inside=True)
                )
            )
        else:
            items = ((unit.first_row + i, raw) for i, raw in enumerate(data.split(b"\n")) if raw.strip())
        for row, raw in items:
            yield parse_sample(
                row, raw, base=base, default_split=default_split, attachment_token=self.attachment_token
            )


def _array_items(read) -> Iterator[tuple[int, int, int, bytes]]:
    for k, (start, end, raw) in enumerate(jsonarray.items(read), 1):
        yield k, start, end, raw


def _jsonl_items(read) -> Iterator[tuple[int, int, int, bytes]]:
    """(line number, start, end, line) of every non-blank line."""
    offset, line_no, carry = 0, 0, b""
    while True:
        block = read(BLOCK_BYTES)
        buf = carry + block
        if block:
            pieces = buf.split(b"\n")
            carry = pieces.pop()
        else:
            pieces, carry = ([buf] if buf else []), b""
        for raw in pieces:
            line_no += 1
            start, offset = offset, offset + len(raw) + 1
            if line_no == 1 and raw.startswith(jsonarray.BOM):
                raw, start = raw[len(jsonarray.BOM) :], start + len(jsonarray.BOM)
            if raw.strip():
                yield line_no, start, start + len(raw), raw
        if not block:
            return


def parse_sample(
    row: int, raw: bytes, *, base: str, default_split: str, attachment_token: str = DEFAULT_ATTACHMENT_TOKEN
) -> Row | Reject:
    """One LLaVA/ShareGPT sample -> a trainer row, or a ``manifest``-stage reject naming why."""

    def reject(reason: str, image_id: str | None = None) -> Reject:
        return Reject(row, image_id, "manifest", reason)

    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return reject(f"sample is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return reject(f"sample is {json_kind(obj)}, not a JSON object")
    image_id = _row_id(obj, row)
    if "\x00" in image_id:
        return reject("'id' contains a NUL byte", image_id.replace("\x00", "\\0"))
    split = obj.get("split") or default_split
    if not isinstance(split, str) or not SPLIT_NAME.match(split):
        return reject(f"invalid split name {split!r}", image_id)
    turns = sharegpt.convert(obj, attachment_token)
    if isinstance(turns, str):
        return reject(turns, image_id)
    return Row(
        line=row,
        kind="trainer",
        image_id=image_id,
        split=split,
        locations=tuple(location.resolve(p, base) for p in turns.images),
        meta={},
        conversations=turns.turns,
    )

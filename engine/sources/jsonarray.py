"""The byte spans of the items of a JSON array, found block by block without parsing the items.

A 1 GB LLaVA file is one JSON array. To cut it into work units, the planner needs where each
item starts and ends; a streaming parser such as ijson yields the items but not their offsets.
So this scans each block with numpy for the only bytes that matter (unescaped quotes, brackets
and braces outside strings, commas at depth 1), carrying the state from block to block: memory
is a block's, whatever the file's size. Each item is then parsed on its own (orjson), so one bad
item never fails its neighbours.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BLOCK_BYTES = 4 * 2**20
_WHITESPACE = b" \t\r\n"
BOM = b"\xef\xbb\xbf"


class NotAnArray(ValueError):
    """The input's first value is not a JSON array."""


@dataclass
class _State:
    depth: int = 0
    in_string: bool = False
    opened: bool = False  # the array's '[' has been seen
    closed: bool = False  # ... and its ']'


def _structure(b: np.ndarray, state: _State) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions in ``b`` of the array's opening bracket, its depth-1 commas and its closing
    bracket (at most one each of the first and last), updating ``state``. ``b`` must not end
    inside a run of backslashes (the caller carries such a tail into the next block)."""
    quote = b == 34
    bs = np.flatnonzero(b == 92)
    if bs.size:  # a character after an odd-length run of backslashes is escaped
        run = np.r_[True, np.diff(bs) != 1]
        run_start = bs[run][np.cumsum(run) - 1]
        escaped = bs[(bs - run_start) % 2 == 0] + 1
        quote[escaped[escaped < b.size]] = False
    parity = np.cumsum(quote, dtype=np.int32)
    outside = ((parity + state.in_string) & 1) == 0
    opens = ((b == 91) | (b == 123)) & outside
    closes = ((b == 93) | (b == 125)) & outside
    depth = state.depth + np.cumsum(opens.astype(np.int32) - closes.astype(np.int32), dtype=np.int32)
    first = np.flatnonzero(opens & (depth == 1))[:1] if state.depth == 0 else np.zeros(0, np.int64)
    commas = np.flatnonzero((b == 44) & outside & (depth == 1))
    last = np.flatnonzero(closes & (depth == 0))[:1]
    if b.size:
        state.depth = int(depth[-1])
        state.in_string = bool((parity[-1] + state.in_string) & 1)
    return first, commas, last


def items(read, start: int = 0, inside: bool = False) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, bytes) of every item of the array that ``read(n)`` returns, the offsets
    counted from ``start``. ``inside``: the bytes begin after the array's '[' (a work unit's
    range, which ends where its last item does); else the first non-blank byte must be '['.
    The inside of an empty array is no item; an unterminated last item is still yielded (the
    file was cut short), so it is read and rejected like any bad item."""
    state = _State(depth=1 if inside else 0, opened=inside)
    offset, carry = start, b""  # offset: of the next byte scanned
    buf, buf_at = b"", start  # the bytes from the current item's start (or the scan's)
    item_start = start if inside else None
    num_items = 0
    while True:
        block = read(BLOCK_BYTES)
        data = carry + block
        if block:
            cut = len(data.rstrip(b"\\"))  # a backslash run is never split across blocks
            data, carry = data[:cut], data[cut:]
        else:
            carry = b""
        if not state.opened:
            head = (data.removeprefix(BOM) if offset == start else data).lstrip(_WHITESPACE)
            if head and head[:1] != b"[":
                raise NotAnArray(f"the first value is not a JSON array (it starts with {head[:1]!r})")
        first, commas, last = _structure(np.frombuffer(data, np.uint8), state)
        buf += data
        if first.size and item_start is None:
            state.opened, item_start = True, offset + int(first[0]) + 1
        end_at = offset + int(last[0]) if last.size else None
        for pos in commas:
            p = offset + int(pos)
            if end_at is not None and p > end_at:
                break
            yield item_start, p, buf[item_start - buf_at : p - buf_at]
            num_items += 1
            item_start = p + 1
        if end_at is not None:
            raw = buf[item_start - buf_at : end_at - buf_at]
            if num_items or raw.strip(_WHITESPACE):
                yield item_start, end_at, raw
            return
        offset += len(data)
        if not block:
            raw = buf[item_start - buf_at :] if item_start is not None else b""
            if raw.strip(_WHITESPACE):
                yield item_start, offset, raw  # the file ends inside the array: a truncated item
            return
        keep = item_start if item_start is not None else offset
        buf, buf_at = buf[keep - buf_at :], keep

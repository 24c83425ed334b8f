"""engine.sources.jsonarray: item spans of a JSON array, found block by block."""

from __future__ import annotations

import io
import random

import orjson
import pytest

from engine.sources import jsonarray


def spans(data: bytes, **kw) -> list[bytes]:
    return [raw for _, _, raw in jsonarray.items(io.BytesIO(data).read, **kw)]


def test_items_and_offsets():
    data = b' \xef\xbb\xbf[1, {"a": "x,]\\"\\\\"}, [2,3]] '.replace(b" \xef", b"\xef", 1)
    got = list(jsonarray.items(io.BytesIO(data).read))
    assert [orjson.loads(r) for _, _, r in got] == [1, {"a": 'x,]"\\'}, [2, 3]]
    assert all(data[s:e] == r for s, e, r in got)


@pytest.mark.parametrize("data", [b"[]", b" [ \n ] ", b"\n[]\n"])
def test_empty_array_has_no_items(data):
    assert spans(data) == []


def test_not_an_array():
    with pytest.raises(jsonarray.NotAnArray, match="not a JSON array"):
        spans(b'{"conversations": []}')


def test_cut_short_yields_the_partial_item():
    assert spans(b'[{"a": 1}, {"b": [1, "x') == [b'{"a": 1}', b' {"b": [1, "x']


def test_blank_item_between_commas_is_an_item():
    assert [r.strip() for r in spans(b"[1,,2]")] == [b"1", b"", b"2"]


def _value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice(["a\\", 'q"uo\\"te', "x,]}[{", 1, 2.5, None, True, "\\\\", "é€"])
    if r < 0.6:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}\\": _value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def test_random_arrays_with_tiny_blocks(monkeypatch):
    """Blocks of 7 bytes split strings, escapes and backslash runs everywhere; the spans (and a
    unit's range read on its own, from inside the array) still give back every item."""
    monkeypatch.setattr(jsonarray, "BLOCK_BYTES", 7)
    rng = random.Random(5)
    for t in range(200):
        arr = [_value(rng) for _ in range(rng.randint(0, 6))]
        data = orjson.dumps(arr, option=orjson.OPT_INDENT_2 if t % 2 else 0)
        found = list(jsonarray.items(io.BytesIO(data).read))
        assert [orjson.loads(r) for _, _, r in found] == arr
        if len(found) >= 2:
            a, b = found[1][0], found[-1][1]
            inner = list(jsonarray.items(io.BytesIO(data[a:b]).read, a, inside=True))
            assert [x[:2] for x in inner] == [x[:2] for x in found[1:]]

"""Row identity is defined once (engine.sources.identity): the JSONL planner's duplicates and
parse_row's ids come from the same rules, so they can never disagree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.records import Reject
from engine.sources.identity import duplicate_lines, row_id
from engine.sources.jsonl import JsonlSource, _line_id, parse_row, plan_manifest


@pytest.mark.parametrize(
    "obj, expected",
    [
        ({"image_id": "a", "output": 1}, "a"),
        ({"image_id": 7, "output": 1}, "7"),  # an integer id is its decimal text
        ({"image_id": True, "output": 1}, None),  # a boolean is no id
        ({"image_id": 1.5, "output": 1}, None),
        ({"image_id": "", "output": 1}, None),
        ({"image_id": {"a": 1}, "output": 1}, None),
        ({"id": "x", "output": 1}, None),  # a labelr row's id is image_id only
        ({"id": "x", "text": "t"}, "x"),  # a trainer row falls back to id ...
        ({"id": 3, "conversations": []}, "3"),
        ({"text": "t"}, "line-12"),  # ... then to its line
        ({"image_id": "a", "id": "x", "text": "t"}, "a"),
        ({"image_id": None, "id": "x", "modalities": []}, "x"),
    ],
)
def test_row_id(obj, expected):
    assert row_id(obj, 12) == expected


def test_duplicate_lines_first_occurrence_wins_and_none_claims_nothing():
    lines = [5, 1, 2, 3, 4, 6]
    ids = ["b", "a", None, "a", None, "b"]
    assert duplicate_lines(lines, ids).tolist() == [3, 6]
    assert duplicate_lines([], []).dtype == np.int64


def _manifest(tmp_path, objs) -> str:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"".join(json.dumps(o).encode() + b"\n" for o in objs))
    return str(path)


def test_planner_and_parse_row_agree_where_the_old_rules_did_not(tmp_path):
    """The old planner read ids with polars' json_path_match ($.image_id, else $.id): it took a
    labelr row's 'id' and a boolean image_id for ids, though parse_row rejects both rows for
    having none, so a later row with that id was wrongly rejected as a duplicate."""
    objs = [
        {"id": "x", "image_path": "a.jpg", "output": {}},  # rejected: no image_id; claims nothing
        {"id": "x", "text": "hello"},  # a trainer row whose id is x: not a duplicate
        {"image_id": True, "image_path": "a.jpg", "output": {}},  # rejected: claims nothing
        {"image_id": "true", "image_path": "a.jpg", "output": {}},  # not a duplicate
        {"image_id": 7, "image_path": "a.jpg", "output": {}},
        {"image_id": "7", "image_path": "a.jpg", "output": {}},  # 7 and "7" are one id: a duplicate
    ]
    manifest = _manifest(tmp_path, objs)
    plan = plan_manifest(manifest, 16)
    assert [d for u in plan.units for d in u.duplicate_lines] == [6]
    rows = [
        r
        for u in plan.units
        for r in JsonlSource(manifest).read(u, base=str(tmp_path), default_split="train")
    ]
    assert [type(r).__name__ for r in rows] == ["Reject", "Row", "Reject", "Row", "Row", "Row"]
    assert [r.image_id for r in rows[1::2]] == ["x", "true", "7"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=6,
)
line_objects = st.fixed_dictionaries(
    {},
    optional={
        "image_id": json_values | st.text(max_size=6),
        "id": json_values | st.text(max_size=6),
        "image_path": st.just("a.jpg"),
        "output": json_values,
        "text": json_values,
        "conversations": json_values,
        "modalities": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(line_objects)
def test_the_planner_reads_the_id_parse_row_gives(obj):
    raw = json.dumps(obj).encode()
    row = parse_row(9, raw, base="/nonexistent", default_split="train")
    if not isinstance(row, Reject):
        assert _line_id(raw, 9) == row.image_id
    elif row.reason.startswith("no 'image_id'"):
        assert _line_id(raw, 9) is None


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"image_id": "a\xff"}', b'"a"'])
def test_lines_parse_row_rejects_unread_claim_no_id(raw):
    assert isinstance(parse_row(1, raw, base="", default_split="train"), Reject)
    assert _line_id(raw, 1) is None

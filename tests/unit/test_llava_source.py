"""engine.sources.llava read on its own: JSON arrays and JSONL of LLaVA/ShareGPT samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pytest

from engine.errors import UsageError
from engine.records import Reject
from engine.sources.llava import LlavaSource

TOKEN = "<|reserved_special_token_0|>"


def sample(i: int, **over) -> dict:
    return {
        "id": f"s{i}",
        "image": f"coco/{i:06d}.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": f"Answer {i}."},
        ],
        **over,
    }


def read_all(src: LlavaSource, grain: int, base: str = "/data"):
    plan = src.plan(grain)
    rows = [r for u in plan.coalesce(grain * 2).units for r in src.read(u, base=base, default_split="train")]
    assert len(rows) == plan.num_rows
    return plan, rows


@pytest.mark.parametrize("form", ["array", "indented", "jsonl"])
def test_forms_give_the_same_rows(tmp_path, form):
    samples = [sample(i) for i in range(7)]
    samples[2] = sample(
        2, conversations=[{"from": "human", "value": "no token"}, {"from": "gpt", "value": "x"}]
    )
    samples[4] = "not an object"
    samples[5] = sample(5, id="s1")  # a duplicate id
    if form == "jsonl":
        path = tmp_path / "llava.jsonl"
        path.write_bytes(b"\n".join(orjson.dumps(s) for s in samples) + b"\n\n")
    else:
        path = tmp_path / "llava.json"
        path.write_text(json.dumps(samples, indent=2 if form == "indented" else None))
    assert LlavaSource.detect(str(path))
    plan, rows = read_all(LlavaSource(str(path)), grain=2)
    assert plan.num_duplicates == 1
    numbers = [r.line for r in rows]
    if form != "jsonl":
        assert numbers == list(range(1, 8))  # an array's rows are numbered by item
    assert [u for u in plan.units if 6 in u.duplicate_lines or numbers[5] in u.duplicate_lines]
    first = rows[0]
    assert (
        first.kind == "trainer" and first.image_id == "s0" and first.locations == ("/data/coco/000000.jpg",)
    )
    assert first.conversations == (
        {"role": "user", "content": TOKEN + "\nWhat is in the image?"},
        {"role": "assistant", "content": "Answer 0."},
    )
    assert isinstance(rows[2], Reject) and "0 <image> token(s)" in rows[2].reason
    assert isinstance(rows[4], Reject) and rows[4].reason == "sample is a string, not a JSON object"


def test_detection_leaves_labelr_and_trainer_jsonl_alone(tmp_path):
    labelr = tmp_path / "m.jsonl"
    labelr.write_text(
        json.dumps(
            {
                "image_id": "a",
                "image_path": "a.jpg",
                "output": "x",
                "conversations": [{"from": "human", "value": "x"}],
            }
        )
        + "\n"
    )
    trainer = tmp_path / "t.jsonl"
    trainer.write_text(
        json.dumps({"conversations": [{"role": "user", "content": "x"}], "modalities": []}) + "\n"
    )
    messages = tmp_path / "msg.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    assert not LlavaSource.detect(str(labelr)) and not LlavaSource.detect(str(trainer))
    assert LlavaSource.detect(str(messages))
    assert not LlavaSource.detect(str(tmp_path / "missing.json"))


def test_a_cut_short_array_rejects_its_last_sample(tmp_path):
    path = tmp_path / "cut.json"
    data = json.dumps([sample(i) for i in range(3)]).encode()
    path.write_bytes(data[:-40])
    _, rows = read_all(LlavaSource(str(path)), grain=10)
    assert [type(r).__name__ for r in rows] == ["Row", "Row", "Reject"]
    assert "not valid JSON" in rows[2].reason


def test_not_an_array_or_empty_is_a_usage_error(tmp_path):
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UsageError, match="holds no samples"):
        LlavaSource(str(tmp_path / "empty.json")).plan(10)
    with pytest.raises(UsageError, match="not found"):
        LlavaSource(str(tmp_path / "nope.json")).check()


_RSS = """
import resource, sys
from engine.sources.llava import LlavaSource
src = LlavaSource(sys.argv[1])
n = sum(1 for u in src.plan(1000).units for _ in src.read(u, base="/d", default_split="train"))
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_json_array_streams(tmp_path):
    """Planning and reading a 50k-sample array (about 50 MB) peaks within a few MB of a 5k one:
    the file is never held whole."""
    peaks = {}
    for n in (5_000, 50_000):
        path = tmp_path / f"{n}.json"
        with open(path, "wb") as f:
            f.write(b"[")
            for i in range(n):
                f.write((b"," if i else b"") + orjson.dumps(sample(i, padding="x" * 800)))
            f.write(b"]")
        out = subprocess.run(
            [sys.executable, "-c", _RSS, str(path)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "POLARS_MAX_THREADS": "1"},
        ).stdout.split()
        assert int(out[0]) == n
        peaks[n] = int(out[1])
    assert os.path.getsize(tmp_path / "50000.json") > 40 * 2**20
    assert peaks[50_000] - peaks[5_000] < 20, peaks  # MB; holding the file alone would add over 40


def test_source_and_units_pickle(tmp_path):
    import pickle

    path = tmp_path / "a.json"
    path.write_text(json.dumps([sample(i) for i in range(3)]))
    src = LlavaSource(str(path), attachment_token="<t>")
    unit = src.plan(2).units[1]
    rows = list(
        pickle.loads(pickle.dumps(src)).read(pickle.loads(pickle.dumps(unit)), base="/b", default_split="x")
    )
    assert [(r.line, r.image_id, r.split, r.conversations[0]["content"][:3]) for r in rows] == [
        (3, "s2", "x", "<t>")
    ]

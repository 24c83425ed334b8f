"""stats.json "images": how many written images were kept as they were, resized, rotated or
re-encoded for their format or mode, with the ids of those resized and rotated, and
``engine inspect`` listing them (text and HTML)."""

from __future__ import annotations

import json

import datasets
import imagegen
import pytest
from conftest import convert, row, write_input

from engine.inspect.report import inspect_dataset, write_report
from engine.stats import LISTED_IMAGE_IDS


@pytest.fixture(scope="module")
def changed(tmp_path_factory):
    """Two plain JPEGs kept, two shrunk, one turned upright, one both, a palette PNG and a CMYK JPEG
    re-encoded as JPEG (--max-size 100; the quadrant picture is 64x48)."""
    root = tmp_path_factory.mktemp("changes")
    images = {
        "keep1.jpg": imagegen.jpeg(),
        "keep2.jpg": imagegen.noise_jpeg((96, 64), seed=1),
        "big1.jpg": imagegen.jpeg((400, 300)),
        "big2.jpg": imagegen.noise_jpeg((300, 300), seed=2),
        "rot.jpg": imagegen.oriented(6),
        "bigrot.jpg": imagegen.oriented(8, size=(400, 200)),
        "flat.png": imagegen.palette_png_with_transparency(),
        "cmyk.jpg": imagegen.cmyk_jpeg(),
    }
    names = ["keep1", "big1", "rot", "flat", "keep2", "bigrot", "cmyk", "big2"]
    inp = write_input(root, [row(n, f"{n}.{'png' if n == 'flat' else 'jpg'}") for n in names], images)
    out = root / "out"
    assert convert(inp, out, "--max-size", "100") == 0
    return out


def test_stats_count_each_kind_and_list_resized_and_rotated_ids(changed):
    stats = json.loads((changed / "stats.json").read_text())
    images = stats["images"]
    assert stats["num_passthrough"] == 2
    assert images == {
        "passthrough": 2,
        "resized": 3,
        "rotated": 2,
        "reencoded": 2,
        "resized_ids": ["big1", "bigrot", "big2"],
        "rotated_ids": ["rot", "bigrot"],
    }
    # the counts describe the pixels written
    table = datasets.load_dataset(str(changed), split="train")
    got = {r["image_id"]: r["image"].size for r in table}
    assert got["big1"] == (100, 75) and got["big2"] == (100, 100) and got["bigrot"] == (100, 50)  # upright
    assert got["rot"] == (64, 48) and got["keep2"] == (96, 64)
    assert sorted(p.name for p in changed.iterdir()) == [
        "README.md",
        "config.json",
        "data",
        "rejects.jsonl",
        "stats.json",
    ]


def test_inspect_text_and_html_list_the_changed_images(changed, tmp_path):
    insp = inspect_dataset(str(changed), samples=2, phash=False)
    text = insp.text
    assert "images at convert: resized 3, rotated 2, passthrough 2, reencoded 2" in text
    assert "    resized: big1, bigrot, big2\n" in text
    assert "    rotated: rot, bigrot\n" in text
    page = write_report(insp, str(tmp_path / "r.html"))
    html = open(page, encoding="utf-8").read()
    assert "<td>resized</td><td>3</td><td>big1, bigrot, big2</td>" in html
    assert "<td>rotated</td><td>2</td><td>rot, bigrot</td>" in html


def test_ids_are_capped_and_inspect_says_how_many_more(tmp_path):
    n = LISTED_IMAGE_IDS + 3
    images = {f"{i}.jpg": imagegen.noise_jpeg((40, 30), seed=i) for i in range(n)}
    inp = write_input(tmp_path / "in", [row(f"r{i:03d}", f"{i}.jpg") for i in range(n)], images)
    out = tmp_path / "out"
    assert convert(inp, out, "--max-size", "20", "--unit-rows", "16") == 0
    images = json.loads((out / "stats.json").read_text())["images"]
    assert images["resized"] == n and images["passthrough"] == 0 and images["rotated_ids"] == []
    assert images["resized_ids"] == [f"r{i:03d}" for i in range(LISTED_IMAGE_IDS)]  # line order across units
    text = inspect_dataset(str(out), samples=1, phash=False).text
    assert f"    resized: r000, r001, r002, r003, r004 and {n - 5:,} more" in text

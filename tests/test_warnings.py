"""Warnings: harmless trouble met while writing a row (an invalid orientation, an EXIF block read
only in part), counted per kind from EncodedImage through UnitResult to stats.json."""

from __future__ import annotations

import io

import imagegen
import numpy as np
import orjson
from conftest import Output, convert, row, write_input

from engine.pipeline import UnitResult
from engine.stats import RunStats


def _result(**extra) -> UnitResult:
    return UnitResult(
        index=0,
        num_rows=3,
        num_written=3,
        num_passthrough=0,
        rejected={},
        meta_keys=(),
        text_columns=(),
        sizes={"train": np.asarray([1, 2, 3])},
        part=None,
        rejects=None,
        seconds=0.1,
        **extra,
    )


def test_unit_warnings_survive_the_checkpoint_and_an_older_one_reads_as_none():
    done = _result(warnings={"exif_unreadable": 2})
    assert UnitResult.from_json(done.to_json()).warnings == {"exif_unreadable": 2}
    older = orjson.loads(done.to_json())
    del older["warnings"]  # a checkpoint written before warnings were counted
    assert UnitResult.from_json(orjson.dumps(older)).warnings == {}


def test_stats_sum_warnings_of_any_kind():
    stats = RunStats()
    stats.add_unit(_result(warnings={"exif_unreadable": 2, "some_other_kind": 1}))
    stats.add_unit(_result(warnings={"exif_unreadable": 1}))
    assert stats.to_dict()["warnings"] == {"exif_unreadable": 3, "some_other_kind": 1}


def test_stats_json_counts_warnings_per_kind(tmp_path):
    from PIL import Image

    def with_orientation(value) -> bytes:
        exif = Image.Exif()
        exif[imagegen.ORIENTATION_TAG] = value
        return imagegen.encode(imagegen.quadrant_image(), "JPEG", exif=exif.tobytes())

    broken = imagegen.jpeg()
    body = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0garbage"  # a TIFF header pointing nowhere
    broken = broken[:2] + b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body + broken[2:]
    images = {
        "o0.jpg": with_orientation(0),
        "o9.jpg": with_orientation(9),
        "bad.jpg": broken,
        "good.jpg": imagegen.jpeg(),
    }
    inp = write_input(tmp_path / "in", [row(n.split(".")[0], n) for n in images], images)
    assert convert(inp, tmp_path / "out") == 0
    out = Output(tmp_path / "out")
    assert out.rejects == [] and out.stats["num_written"] == 4
    assert out.stats["warnings"] == {"exif_orientation_invalid": 2, "exif_unreadable": 1}
    for image_id in ("o0", "o9", "bad"):
        stored = Image.open(io.BytesIO(out.by_id()[image_id]["image"]["bytes"]))
        assert stored.size == imagegen.UPRIGHT_SIZE
        imagegen.assert_quadrants(stored)


def test_a_clean_run_has_no_warnings(tmp_path):
    inp = write_input(tmp_path / "in", [row("a", "a.jpg")], {"a.jpg": imagegen.jpeg()})
    assert convert(inp, tmp_path / "out") == 0
    assert Output(tmp_path / "out").stats["warnings"] == {}

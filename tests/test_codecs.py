"""Codecs and the formats allow-list, with Pillow's own test images (tests/data/codecs/SOURCES.md).

A LAB TIFF, a JPEG 2000 and an AVIF convert, checked by pixel against the RGB originals Pillow's
tests compare them with; a codec the build lacks gives a reason naming the format and the
library; a format outside --formats is rejected with a reason naming it, and --formats widens or
narrows the list.
"""

from __future__ import annotations

import io
import subprocess
import sys

import imagegen
import numpy as np
import pytest
from conftest import REPO, TESTS, Output, convert, row, run_main, write_input
from PIL import Image

from engine.config import DEFAULT_FORMATS, ImageOptions, parse_formats
from engine.errors import UsageError
from engine.imaging import transform_image
from engine.versions import codecs

DATA = TESTS / "data" / "codecs"
PNG = ImageOptions(max_size=None, format="png", passthrough=False)


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def _reference(name: str) -> np.ndarray:
    return _rgb((DATA / name).read_bytes())


def _converted_rows(tmp_path, files: list[str], *extra: str) -> tuple[Output, dict]:
    images = {name: (DATA / name).read_bytes() for name in files}
    inp = write_input(tmp_path / "in", [row(name, name) for name in files], images)
    assert convert(inp, tmp_path / "out", "--max-size", "0", "--image-format", "png", *extra) == 0
    out = Output(tmp_path / "out")
    return out, out.by_id() if out.stats["num_written"] else {}


def test_lab_tiff_jpeg2000_and_avif_convert_by_pixel(tmp_path):
    """Before: LAB failed with "cannot import name '_imagingcms'" and JPEG 2000 and AVIF were
    rejected. The thresholds are those of Pillow's own tests for these files."""
    files = ["hopper.Lab.tif", "test-card-lossless.jp2"] + (["hopper.avif"] if "avif" in codecs()[0] else [])
    out, rows = _converted_rows(tmp_path, files)
    assert out.rejects == [] and sorted(rows) == sorted(files)
    hopper, card = _reference("hopper.png"), _reference("test-card.png")
    lab = _rgb(rows["hopper.Lab.tif"]["image"]["bytes"])
    assert lab.shape == hopper.shape and np.abs(lab - hopper).mean() < 3.5
    jp2 = _rgb(rows["test-card-lossless.jp2"]["image"]["bytes"])
    assert jp2.shape == card.shape and np.abs(jp2 - card).max() <= 1  # lossless, but for rounding
    if "hopper.avif" in rows:
        avif = _rgb(rows["hopper.avif"]["image"]["bytes"])
        assert avif.shape == hopper.shape and np.abs(avif - hopper).mean() < 8


def test_a_jpeg2000_is_downscaled_like_any_image():
    result = transform_image((DATA / "test-card-lossless.jp2").read_bytes(), ImageOptions(max_size=320))
    assert result.format == "jpeg" and (result.width, result.height) == (320, 240)


def _in_a_build_without(module: str, code: str) -> str:
    """Run ``code`` where ``module`` cannot be imported, as in a Pillow built without that
    library; return its stdout."""
    script = f"import sys\nsys.modules[{module!r}] = None\n" + code
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_missing_codec_gives_a_reason_naming_the_format_and_library():
    code = (
        f"from engine.imaging import transform_image\nfrom engine.config import ImageOptions\n"
        f"print(transform_image(open({str(DATA / 'hopper.Lab.tif')!r}, 'rb').read(), "
        "ImageOptions()).reason)\n"
    )
    reason = _in_a_build_without("PIL._imagingcms", code)
    assert reason == "LAB colour image: this Pillow build has no LittleCMS, which converts it to RGB"
    from PIL import features

    if features.check("avif"):
        pytest.skip("this Pillow has AVIF built in")
    code = (
        f"from engine.imaging import transform_image\nfrom engine.config import ImageOptions\n"
        f"print(transform_image(open({str(DATA / 'hopper.avif')!r}, 'rb').read(), ImageOptions()).reason)\n"
    )
    reason = _in_a_build_without("pillow_avif", code)
    assert (
        reason.startswith("AVIF image: this Pillow build has no libavif") and "pillow-avif-plugin" in reason
    )


def test_avif_support_is_loaded_only_for_avif():
    code = (
        "from engine.imaging import transform_image\nfrom engine.config import ImageOptions\n"
        f"assert transform_image({imagegen.jpeg()!r}, ImageOptions()).format == 'jpeg'\n"
        "print('pillow_avif' in sys.modules)\n"
        f"assert transform_image(open({str(DATA / 'hopper.avif')!r}, 'rb').read(), "
        "ImageOptions()).format == 'jpeg'\n"
    )
    if "avif" not in codecs()[0]:
        pytest.skip("no AVIF codec installed")
    assert _in_a_build_without("engine_nothing", code) == "False"


def _dds(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    imagegen.quadrant_image(size).convert("RGBA").save(buf, "DDS")
    return buf.getvalue()


def test_formats_outside_the_list_are_rejected_naming_the_format(tmp_path):
    images = {"tex.dds": _dds(), "photo.jpg": imagegen.jpeg(), "icon.png": imagegen.png()}
    inp = write_input(tmp_path / "in", [row(n, n) for n in images], images)
    assert convert(inp, tmp_path / "out") == 0
    out = Output(tmp_path / "out")
    assert sorted(out.by_id()) == ["icon.png", "photo.jpg"]
    [reject] = out.rejects
    assert reject["stage"] == "decode" and reject["reason"] == (
        f"DDS image: not in --formats ({','.join(DEFAULT_FORMATS)}); add it with --formats +dds"
    )

    assert convert(inp, tmp_path / "wide", "--formats", "+dds") == 0
    wide = Output(tmp_path / "wide")
    assert wide.rejects == [] and sorted(wide.by_id()) == ["icon.png", "photo.jpg", "tex.dds"]
    imagegen.assert_quadrants(
        Image.open(io.BytesIO(wide.by_id()["tex.dds"]["image"]["bytes"])).convert("RGB")
    )

    assert convert(inp, tmp_path / "narrow", "--formats", "jpg") == 0
    narrow = Output(tmp_path / "narrow")
    assert list(narrow.by_id()) == ["photo.jpg"]
    assert (
        narrow.rejects_by_id()["icon.png"]["reason"]
        == "PNG image: not in --formats (jpeg); add it with --formats +png"
    )


def test_formats_syntax():
    assert parse_formats("jpeg,png") == ("jpeg", "png")
    assert parse_formats("JPG, Tif,heic,jp2") == ("jpeg", "tiff", "heif", "jpeg2000")
    assert parse_formats("+dds,+ico") == DEFAULT_FORMATS + ("dds", "ico")
    assert parse_formats("-gif,-bmp") == tuple(f for f in DEFAULT_FORMATS if f not in ("gif", "bmp"))
    assert {"dds", "psd", "jpeg", "heif", "avif"} <= set(parse_formats("all"))
    for bad in ("nope", "+", "-all", ""):
        with pytest.raises(UsageError):
            parse_formats(bad)


def test_formats_usage_error_is_one_line(tmp_path, capsys, convert_help):
    inp = write_input(tmp_path / "in", [row("a", "a.jpg")], {"a.jpg": imagegen.jpeg()})
    code = run_main(
        [
            "convert",
            "--manifest",
            str(inp.manifest),
            "--config",
            str(inp.config),
            "--out",
            str(tmp_path / "out"),
            "--formats",
            "jpeg,webb",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "unknown format 'webb'" in err, err
    assert "--formats" in convert_help and "+NAME" in convert_help

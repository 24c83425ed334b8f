"""All 8 EXIF orientations, checked by pixel.

The upright picture has four coloured quadrants and is wider than tall. Each orientation is
stored rotated/flipped with the tag that restores it; after conversion the stored pixels must
be upright, the size must be the upright size, and no Orientation tag may remain.
"""

from __future__ import annotations

import io

import imagegen
import pytest
from conftest import Output, convert, decode, orientation_tag, row, write_input
from PIL import Image, ImageOps

ORIENTATIONS = range(1, 9)
LARGE = (3000, 2000)


# --- the fixtures themselves are right (independent of the engine) ---------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_fixture_stored_layout_matches_exif_definition(orientation, fmt):
    data = imagegen.oriented(orientation, fmt)
    im = Image.open(io.BytesIO(data))
    assert im.getexif().get(imagegen.ORIENTATION_TAG) == orientation
    w, h = imagegen.UPRIGHT_SIZE
    assert im.size == ((w, h) if orientation <= 4 else (h, w))
    tl, tr, bl, br = imagegen.STORED_LAYOUT[orientation]
    imagegen.assert_quadrants(im, {"tl": tl, "tr": tr, "bl": bl, "br": br}, tol=10)
    # and a reader that honours the tag gets the upright picture back
    upright = ImageOps.exif_transpose(im)
    assert upright.size == imagegen.UPRIGHT_SIZE
    imagegen.assert_quadrants(upright, tol=10)


# --- the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("orient")
    images, rows = {}, []
    for o in ORIENTATIONS:
        images[f"img/jpeg_{o}.jpg"] = imagegen.oriented(o, "JPEG")
        rows.append(row(f"jpeg_{o}", f"img/jpeg_{o}.jpg"))
        images[f"img/png_{o}.png"] = imagegen.oriented(o, "PNG")
        rows.append(row(f"png_{o}", f"img/png_{o}.png"))
        images[f"img/heic_{o}.heic"] = imagegen.oriented_heic(o)
        rows.append(row(f"heic_{o}", f"img/heic_{o}.heic"))
    for o in (6, 7):  # large: downscale and orientation together
        images[f"img/large_{o}.jpg"] = imagegen.oriented(o, "JPEG", size=LARGE)
        rows.append(row(f"large_{o}", f"img/large_{o}.jpg"))
    images["img/large_heic_6.heic"] = imagegen.oriented_heic(6, size=LARGE)
    rows.append(row("large_heic_6", "img/large_heic_6.heic"))
    inp = write_input(root / "in", rows, images)
    out = root / "out"
    code = convert(inp, out)
    return code, Output(out)


def test_run_succeeds_without_rejects(converted):
    code, out = converted
    assert code == 0
    assert out.rejects == []
    assert out.stats["num_written"] == 27


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("kind", ["jpeg", "png", "heic"])
def test_orientation_applied(converted, kind, orientation):
    _, out = converted
    r = out.by_id()[f"{kind}_{orientation}"]
    im = decode(r["image"])
    assert im.size == imagegen.UPRIGHT_SIZE, f"orientation {orientation}: stored size {im.size}"
    imagegen.assert_quadrants(im)


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("kind", ["jpeg", "png", "heic"])
def test_orientation_tag_removed(converted, kind, orientation):
    _, out = converted
    im = decode(out.by_id()[f"{kind}_{orientation}"]["image"])
    assert orientation_tag(im) is None, "the stored bytes still carry an Orientation tag"


@pytest.mark.parametrize("kind", ["jpeg", "png", "heic"])
def test_orientation_1_is_not_rotated(converted, kind):
    _, out = converted
    im = decode(out.by_id()[f"{kind}_1"]["image"])
    assert orientation_tag(im) in (None, 1)
    assert ImageOps.exif_transpose(im).size == imagegen.UPRIGHT_SIZE


@pytest.mark.parametrize("image_id", ["large_6", "large_7", "large_heic_6"])
def test_large_rotated_image_is_downscaled_and_upright(converted, image_id):
    _, out = converted
    im = decode(out.by_id()[image_id]["image"])
    assert orientation_tag(im) is None
    w, h = im.size
    assert w == 1024, f"longest side should be the default --max-size 1024, got {im.size}"
    assert h in (682, 683), f"aspect ratio lost: {im.size}"
    imagegen.assert_quadrants(im)


@pytest.mark.parametrize("orientation", [1, 6])
def test_heic_becomes_jpeg(converted, orientation):
    """HEIC is never passed through (few readers decode it): it is stored as a JPEG."""
    _, out = converted
    r = out.by_id()[f"heic_{orientation}"]
    assert decode(r["image"]).format == "JPEG"
    assert r["image"]["path"].endswith(".jpg"), r["image"]["path"]

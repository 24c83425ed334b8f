"""Odd modes become storable ones, large images are downscaled, and images that need nothing
are passed through byte for byte."""

from __future__ import annotations

import imagegen
import pytest
from conftest import Output, convert, decode, orientation_tag, row, write_input

LARGE = (3000, 2000)
RGBA_LARGE = (1200, 900)

# Small, upright, storable: the original bytes must be kept untouched, whatever the format.
PASS_THROUGH = {
    "pt_rgb_jpeg": ("pt/rgb.jpg", lambda: imagegen.jpeg()),
    "pt_l_jpeg": ("pt/l.jpg", lambda: imagegen.jpeg(mode="L")),
    "pt_exif1_jpeg": ("pt/exif1.jpg", lambda: imagegen.oriented(1, "JPEG")),
    "pt_rgb_png": ("pt/rgb.png", lambda: imagegen.png()),
    "pt_rgba_png": ("pt/rgba.png", lambda: imagegen.png(mode="RGBA")),
    "pt_l_png": ("pt/l.png", lambda: imagegen.png(mode="L")),
    "pt_la_png": ("pt/la.png", lambda: imagegen.png(mode="LA")),
    "pt_rgb_webp": ("pt/rgb.webp", lambda: imagegen.webp()),
}

NEEDS_WORK = {
    "cmyk": ("w/cmyk.jpg", imagegen.cmyk_jpeg),
    "palette": ("w/palette.png", imagegen.palette_png_with_transparency),
    "grey16": ("w/grey16.png", imagegen.grey16_png),
    "large": ("w/large.jpg", lambda: imagegen.jpeg(LARGE)),
    "rgba_large": ("w/rgba_large.png", lambda: imagegen.png(RGBA_LARGE, mode="RGBA")),
}

FORMAT_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def source_bytes():
    return {k: make() for k, (_, make) in {**PASS_THROUGH, **NEEDS_WORK}.items()}


@pytest.fixture(scope="module", params=["jpeg", "png", "webp"])
def converted(request, tmp_path_factory, source_bytes):
    fmt = request.param
    root = tmp_path_factory.mktemp(f"modes_{fmt}")
    table = {**PASS_THROUGH, **NEEDS_WORK}
    images = {table[k][0]: data for k, data in source_bytes.items()}
    rows = [row(k, table[k][0]) for k in table]
    inp = write_input(root / "in", rows, images)
    out = root / "out"
    code = convert(inp, out, "--image-format", fmt)
    return fmt, code, Output(out)


def test_all_rows_written(converted):
    fmt, code, out = converted
    assert code == 0
    assert out.rejects == []
    assert sorted(out.by_id()) == sorted({**PASS_THROUGH, **NEEDS_WORK})


@pytest.mark.parametrize("image_id", sorted(PASS_THROUGH))
def test_pass_through_is_byte_identical(converted, source_bytes, image_id):
    fmt, _, out = converted
    stored = out.by_id()[image_id]["image"]["bytes"]
    assert stored == source_bytes[image_id], (
        f"{image_id} (--image-format {fmt}) is small, upright and storable, "
        f"so its bytes must pass through unchanged ({len(source_bytes[image_id])} -> {len(stored)} bytes)"
    )


def test_cmyk_becomes_rgb(converted):
    fmt, _, out = converted
    im = decode(out.by_id()["cmyk"]["image"])
    assert im.format == FORMAT_NAMES[fmt]
    assert im.mode == "RGB"
    assert im.size == imagegen.UPRIGHT_SIZE
    imagegen.assert_quadrants(im)


def test_grey16_becomes_8bit_with_its_tones(converted):
    fmt, _, out = converted
    im = decode(out.by_id()["grey16"]["image"])
    assert im.format == FORMAT_NAMES[fmt]
    assert im.mode in ("L", "RGB"), f"16-bit grey must become 8-bit, got mode {im.mode}"
    grey = im.convert("L")
    for name, xy in imagegen.quadrant_centres(grey.size).items():
        got, want = grey.getpixel(xy), imagegen.GREY16_AS_8BIT[name]
        assert abs(got - want) <= 6, f"quadrant {name}: 16-bit level scaled to {got}, want about {want}"


def test_palette_with_transparency(converted):
    fmt, _, out = converted
    im = decode(out.by_id()["palette"]["image"])
    assert im.format == FORMAT_NAMES[fmt]
    opaque = {"tr": imagegen.GREEN, "bl": imagegen.BLUE, "br": imagegen.YELLOW}
    centres = imagegen.quadrant_centres(im.size)
    if fmt == "jpeg":
        assert im.mode == "RGB", "JPEG cannot hold alpha: the palette image must be composited to RGB"
        hidden = im.getpixel(centres["tl"])
        assert imagegen.colour_distance(hidden, imagegen.MAGENTA) > 100, (
            f"transparent area shows the palette's hidden colour {hidden}: converted without compositing"
        )
    else:
        assert im.mode == "RGBA", (
            f"{fmt} can hold alpha: palette+transparency must become RGBA, got {im.mode}"
        )
        assert im.getpixel(centres["tl"])[3] <= 5, "the transparent quadrant lost its transparency"
        for name in opaque:
            assert im.getpixel(centres[name])[3] >= 250
    rgb = im.convert("RGB") if im.mode == "RGB" else im
    for name, want in opaque.items():
        got = rgb.getpixel(centres[name])[:3]
        assert imagegen.colour_distance(got, want) <= 40, f"quadrant {name}: got {got}, want {want}"


def test_large_image_downscaled_to_max_size(converted):
    fmt, _, out = converted
    im = decode(out.by_id()["large"]["image"])
    assert im.format == FORMAT_NAMES[fmt]
    assert im.size[0] == 1024 and im.size[1] in (682, 683), im.size
    imagegen.assert_quadrants(im)


def test_rgba_keeps_alpha_only_where_the_format_can(converted):
    fmt, _, out = converted
    im = decode(out.by_id()["rgba_large"]["image"])
    assert im.format == FORMAT_NAMES[fmt]
    assert im.size == (1024, 768), im.size
    centres = imagegen.quadrant_centres(im.size)
    if fmt == "jpeg":
        assert im.mode == "RGB"
    else:
        assert im.mode == "RGBA", f"{fmt} holds alpha; got {im.mode}"
        assert im.getpixel(centres["tl"])[3] >= 250
        assert abs(im.getpixel(centres["br"])[3] - 128) <= 10, "half-transparent quadrant lost its alpha"
    rgb = im.convert("RGB")
    for name in ("tl", "tr", "bl"):  # the opaque quadrants keep their colour
        got, want = rgb.getpixel(centres[name]), imagegen.QUADRANTS[name]
        assert imagegen.colour_distance(got, want) <= 40, f"quadrant {name}: got {got}, want {want}"


def test_no_orientation_tag_on_reencoded(converted):
    _, _, out = converted
    for image_id in NEEDS_WORK:
        assert orientation_tag(decode(out.by_id()[image_id]["image"])) is None


# --- single-option runs ----------------------------------------------------------------------


def test_max_size_option(tmp_path):
    inp = write_input(
        tmp_path / "in",
        [row("large", "large.jpg"), row("small", "small.jpg")],
        {"large.jpg": imagegen.jpeg(LARGE), "small.jpg": imagegen.jpeg()},
    )
    assert convert(inp, tmp_path / "out", "--max-size", "256") == 0
    rows = Output(tmp_path / "out").by_id()
    large = decode(rows["large"]["image"])
    assert large.size[0] == 256 and large.size[1] in (170, 171), large.size
    imagegen.assert_quadrants(large)
    small = decode(rows["small"]["image"])
    assert small.size == imagegen.UPRIGHT_SIZE, "an image under --max-size must not be upscaled"


def test_max_size_applies_to_portrait_longest_side(tmp_path):
    inp = write_input(tmp_path / "in", [row("tall", "tall.jpg")], {"tall.jpg": imagegen.jpeg((200, 400))})
    assert convert(inp, tmp_path / "out", "--max-size", "100") == 0
    im = decode(Output(tmp_path / "out").by_id()["tall"]["image"])
    assert im.size == (50, 100)


def test_quality_option_changes_reencoded_size(tmp_path):
    """A re-encoded (rotated) noise image is much smaller at quality 20 than at 95."""
    import io

    from PIL import Image

    noise = Image.open(io.BytesIO(imagegen.noise_jpeg((200, 150), seed=7)))
    data = imagegen.encode(noise, "JPEG", orientation=6, quality=95)
    sizes = {}
    for q in (20, 95):
        inp = write_input(tmp_path / f"in{q}", [row("n", "n.jpg")], {"n.jpg": data})
        assert convert(inp, tmp_path / f"out{q}", "--quality", str(q)) == 0
        im = decode(Output(tmp_path / f"out{q}").by_id()["n"]["image"])
        assert im.size == (150, 200)
        sizes[q] = len(Output(tmp_path / f"out{q}").by_id()["n"]["image"]["bytes"])
    assert sizes[20] < 0.7 * sizes[95], sizes


def test_keep_format_passes_through_and_still_orients(tmp_path):
    small = imagegen.png()
    inp = write_input(
        tmp_path / "in",
        [row("small", "small.png"), row("rot", "rot.png")],
        {"small.png": small, "rot.png": imagegen.oriented(6, "PNG")},
    )
    assert convert(inp, tmp_path / "out", "--image-format", "keep") == 0
    rows = Output(tmp_path / "out").by_id()
    assert rows["small"]["image"]["bytes"] == small
    rot = decode(rows["rot"]["image"])
    assert rot.size == imagegen.UPRIGHT_SIZE, "pixels are always stored upright, even with keep"
    assert orientation_tag(rot) is None
    imagegen.assert_quadrants(rot)


def test_keep_format_stores_heic_as_jpeg_and_tiff_as_png(tmp_path):
    """Formats no reader takes as they are: a lossy phone photo becomes JPEG, anything else PNG."""
    inp = write_input(
        tmp_path / "in",
        [row("heic", "a.heic"), row("tiff", "b.tiff")],
        {"a.heic": imagegen.oriented_heic(8), "b.tiff": imagegen.encode(imagegen.quadrant_image(), "TIFF")},
    )
    assert convert(inp, tmp_path / "out", "--image-format", "keep") == 0
    rows = Output(tmp_path / "out").by_id()
    formats = {k: decode(v["image"]).format for k, v in rows.items()}
    assert formats == {"heic": "JPEG", "tiff": "PNG"}, formats
    for r in rows.values():
        imagegen.assert_quadrants(decode(r["image"]))

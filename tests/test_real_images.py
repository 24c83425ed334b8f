"""Public images nobody on this project made (tests/data/real/SOURCES.md), run through the CLI.

Every written image must be what a reader that honours orientation shows
(``ImageOps.exif_transpose(Image.open(original))``), upright in its stored pixels, with no
orientation left in any container, and decodable by plain PIL with LOAD_TRUNCATED_IMAGES off.
Files that cannot be decoded in full are rejected at ``decode``. A few cases no small public file
shows are built in memory from these files or from the quadrant picture.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import imagegen
import numpy as np
import pytest
from conftest import Output, convert, row, write_input
from PIL import Image, ImageFile, ImageOps

from engine.config import ImageOptions
from engine.imaging import EncodedImage, ImageFailure, transform_image

REAL = Path(__file__).resolve().parent / "data" / "real"
XMP = (
    '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
    '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{}"/></rdf:RDF></x:xmpmeta>'
    '<?xpacket end="w"?>'
)
NEVER_DECODE = {"truncated_jpeg.jpg", "apng_syntax_num_frames_zero.png", "ultrahdr.jpg"}
ORIENTED = (
    [f"g4_orientation_{o}.tif" for o in range(2, 9)]
    + [f"hopper_orientation_{o}.{ext}" for o in range(2, 9) for ext in ("jpg", "webp")]
    + [
        "exif_imagemagick_orientation.png",
        "xmp_tags_orientation_exiftool.png",
        "Landscape_6.jpg",
        "Portrait_5.jpg",
        "made/png_exif_after_idat_6.png",
        "made/jpeg_xmp_6.jpg",
        "made/webp_xmp_8.webp",
        "made/flower_progressive_8.jpg",
    ]
)


def _png_chunks(data: bytes) -> list[bytes]:
    chunks, pos = [], 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        chunks.append(data[pos : pos + 12 + length])
        pos += 12 + length
    return chunks


def _exif_after_idat(orientation: int) -> bytes:
    """A PNG whose eXIf chunk follows the image data, as the PNG spec allows: Pillow's ``open``
    does not see it, only ``load()`` does."""
    data = imagegen.oriented(orientation, "PNG")
    chunks = _png_chunks(data)
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert exif, "Pillow wrote no eXIf chunk"
    return data[:8] + b"".join(rest[:-1]) + exif[0] + rest[-1]


def _with_xmp(orientation: int, fmt: str, **params) -> bytes:
    stored = imagegen.stored_for_orientation(imagegen.quadrant_image(), orientation)
    return imagegen.encode(stored, fmt, xmp=XMP.format(orientation).encode(), **params)


def _flower_progressive(orientation: int) -> bytes:
    """flower.jpg's pixels and its EXIF block (with its thumbnail), as a progressive JPEG."""
    src = Image.open(REAL / "flower.jpg")
    exif = src.getexif()
    exif[imagegen.ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=90, progressive=True, exif=exif.tobytes())
    return buf.getvalue()


def _jfif_with_unparsable_exif() -> bytes:
    """A JFIF segment gives the DPI, so Pillow's open never parses this EXIF block, whose TIFF
    header is not valid; a reader's getexif() (datasets calls it) raises on it."""
    buf = io.BytesIO()
    imagegen.quadrant_image().save(buf, "JPEG", quality=95, dpi=(72, 72), exif=b"Exif\x00\x00XXXXXXXX")
    return buf.getvalue()


def _with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[imagegen.ORIENTATION_TAG] = value
    return imagegen.encode(imagegen.quadrant_image(), "JPEG", exif=exif.tobytes())


MADE = {
    "made/png_exif_after_idat_6.png": lambda: _exif_after_idat(6),
    "made/jpeg_xmp_6.jpg": lambda: _with_xmp(6, "JPEG", quality=95),
    "made/webp_xmp_8.webp": lambda: _with_xmp(8, "WEBP", lossless=True),
    "made/flower_progressive_8.jpg": lambda: _flower_progressive(8),
    "made/orientation_9.jpg": lambda: _with_orientation(9),
    "made/jfif_unparsable_exif.jpg": _jfif_with_unparsable_exif,
}


def _inputs() -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(REAL.iterdir()) if p.suffix != ".md"}
    files.update({name: make() for name, make in MADE.items()})
    return files


def _id(name: str) -> str:
    return name.replace("/", "_").replace(".", "_")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The corpus converted twice: defaults (longest side 1024, JPEG), and --max-size 0 with
    --image-format keep (nothing shrunk, formats kept)."""
    root = tmp_path_factory.mktemp("real")
    files = _inputs()
    inp = write_input(root / "in", [row(_id(n), n) for n in files], files)
    done = {}
    for name, extra in {"default": [], "keep": ["--max-size", "0", "--image-format", "keep"]}.items():
        assert convert(inp, root / name, *extra) == 0
        done[name] = Output(root / name)
    return files, done


def _decode(data: bytes) -> Image.Image:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _on_white(im: Image.Image) -> Image.Image:
    """What a JPEG of ``im`` shows: transparency composited over white (README)."""
    if im.mode not in ("RGBA", "LA", "PA") and "transparency" not in im.info:
        return im.convert("RGB")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    white.alpha_composite(im.convert("RGBA"))
    return white.convert("RGB")


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    a, b = _on_white(a), _on_white(b)
    if a.size != b.size:
        b = b.resize(a.size, Image.Resampling.LANCZOS)
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def _orientation_left(data: bytes) -> list[str]:
    """Where an orientation is still readable in stored bytes."""
    im = Image.open(io.BytesIO(data))
    found = []
    if im.getexif().get(imagegen.ORIENTATION_TAG) not in (None, 1):
        found.append("EXIF or XMP (getexif)")
    if b"tiff:Orientation" in data:
        found.append("XMP")
    if b"Raw profile type exif" in data:
        found.append("PNG text")
    return found


@pytest.mark.parametrize("mode", ["default", "keep"])
def test_every_row_is_written_or_rejected_at_decode(runs, mode):
    files, done = runs
    out = done[mode]
    written, rejected = set(out.by_id()), out.rejects_by_id()
    assert written | set(rejected) == {_id(n) for n in files} and not written & set(rejected)
    assert set(rejected) == {_id(n) for n in NEVER_DECODE}, rejected
    assert {r["stage"] for r in rejected.values()} == {"decode"}
    assert out.stats["num_written"] + out.stats["num_rejected"] == len(files)


@pytest.mark.parametrize("mode", ["default", "keep"])
def test_every_written_image_decodes_with_plain_pil_and_datasets(runs, mode):
    from datasets.features import Image as HFImage

    _, done = runs
    for image_id, r in done[mode].by_id().items():
        im = _decode(r["image"]["bytes"])
        shown = HFImage().decode_example(
            {"bytes": r["image"]["bytes"], "path": None}
        )  # applies exif_transpose
        assert shown.size == im.size, (
            f"{image_id}: datasets shows {shown.size}, the stored pixels are {im.size}"
        )


@pytest.mark.parametrize("mode", ["default", "keep"])
@pytest.mark.parametrize("name", ORIENTED)
def test_oriented_images_come_out_as_readers_show_them(runs, mode, name):
    files, done = runs
    stored = done[mode].by_id()[_id(name)]["image"]["bytes"]
    assert stored != files[name], "an image to turn upright was passed through"
    assert _orientation_left(stored) == []
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(files[name])))
    got = _decode(stored)
    assert got.size == want.size or mode == "default"
    assert abs(got.width / got.height - want.width / want.height) < 0.02, (got.size, want.size)
    _assert_shows(got, want, tolerance=8.0 if min(want.size) >= 64 else 40.0)


def _assert_shows(got: Image.Image, want: Image.Image, tolerance: float) -> None:
    """``got`` is ``want`` within JPEG tolerance, and closer to it than to any other of the 8
    orientations of ``want`` (so a wrong turn cannot hide in the tolerance)."""
    right = _mean_difference(got, want)
    assert right < tolerance
    for op in Image.Transpose:
        if (
            op
            in (
                Image.Transpose.ROTATE_90,
                Image.Transpose.ROTATE_270,
                Image.Transpose.TRANSPOSE,
                Image.Transpose.TRANSVERSE,
            )
            and want.width != want.height
        ):
            continue  # another shape: the size check above tells those apart
        other = want.transpose(op)
        if _mean_difference(other, want) > 1.0:
            assert right < _mean_difference(got, other), f"closer to {op.name} of the upright picture"


def test_tiff_orientations_all_equal_orientation_1(runs):
    """Pillow's TIFF loader applies the tag itself; applying it again rotated them twice."""
    _, done = runs
    rows = done["keep"].by_id()
    first = _decode(rows[_id("g4_orientation_1.tif")]["image"]["bytes"])
    assert first.size == (590, 88)
    for o in range(2, 9):
        im = _decode(rows[_id(f"g4_orientation_{o}.tif")]["image"]["bytes"])
        assert im.size == first.size, f"orientation {o}"
        _assert_shows(im, first, tolerance=1.0)  # Pillow's own test allows these files 0.7


def test_upright_files_still_pass_through(runs):
    files, done = runs
    rows = done["keep"].by_id()
    for name in (
        "hopper.jpg",
        "hopper.webp",
        "flower.jpg",
        "iptc.jpg",
        "Landscape_0.jpg",
        "made/orientation_9.jpg",
        "hopper_bad_exif.jpg",
        "rgb_trns.png",
    ):
        assert rows[_id(name)]["image"]["bytes"] == files[name], name


def test_invalid_orientations_and_unreadable_exif_are_upright_and_counted(runs):
    """Orientation 0 (cameras write it) and 9 are shown upright by readers, as are blocks Pillow
    reads only in part; they are written, not rejected, and counted per kind."""
    files, done = runs
    for mode in ("default", "keep"):
        out = done[mode]
        rows = out.by_id()
        for name in (
            "Landscape_0.jpg",
            "made/orientation_9.jpg",
            "hopper_bad_exif.jpg",
            "invalid-exif.jpg",
            "made/jfif_unparsable_exif.jpg",
        ):
            original = Image.open(io.BytesIO(files[name]))
            assert _mean_difference(_decode(rows[_id(name)]["image"]["bytes"]), original) < 8.0, name
        warnings = out.stats["warnings"]
        assert warnings["exif_orientation_invalid"] == 2, warnings
        assert warnings["exif_unreadable"] >= 3, warnings
    # a block a reader's getexif() raises on is never passed through: it is re-encoded without it
    stored = done["keep"].by_id()[_id("made/jfif_unparsable_exif.jpg")]["image"]["bytes"]
    assert stored != files["made/jfif_unparsable_exif.jpg"]
    Image.open(io.BytesIO(stored)).getexif()


def test_mpo_with_max_size_0_is_its_first_picture_decodable(runs):
    files, done = runs
    stored = done["keep"].by_id()[_id("sugarshack.mpo")]["image"]["bytes"]
    first = Image.open(io.BytesIO(files["sugarshack.mpo"]))
    assert _mean_difference(_decode(stored), first) < 8.0
    assert getattr(Image.open(io.BytesIO(stored)), "n_frames", 1) == 1


@pytest.mark.parametrize("name", ["rgb_trns.png", "l_trns.png"])
def test_colour_key_transparency_is_composited_over_white(name):
    data = (REAL / name).read_bytes()
    result = transform_image(data, ImageOptions(passthrough=False))
    assert isinstance(result, EncodedImage) and result.format == "jpeg"
    rgba = Image.open(io.BytesIO(data)).convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    assert (alpha == 0).any() and (alpha == 255).any()
    want = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    want.alpha_composite(rgba)
    got = np.asarray(_decode(result.data).convert("RGB"), np.int16)
    want = np.asarray(want.convert("RGB"), np.int16)
    hidden = alpha == 0
    assert np.abs(got[hidden] - 255).mean() < 6, "the hidden key colour shows"
    assert np.abs(got - want).mean() < 6


def test_colour_key_on_rgb_by_pixel():
    """A quadrant of the key colour (magenta, declared transparent by tRNS) becomes white."""
    colours = dict(imagegen.QUADRANTS, tl=imagegen.MAGENTA)
    data = imagegen.encode(imagegen.quadrant_image(colours=colours), "PNG", transparency=imagegen.MAGENTA)
    result = transform_image(data, ImageOptions(passthrough=False))
    imagegen.assert_quadrants(_decode(result.data), dict(imagegen.QUADRANTS, tl=(255, 255, 255)), tol=12)


@pytest.mark.parametrize("width", [65501, 70000])
def test_wider_than_jpeg_can_hold_is_written_as_png(width, capfd):
    """libjpeg cannot write a side over 65,500 px: such an image is stored as PNG (README says so),
    and libjpeg prints nothing."""
    im = Image.new("RGB", (width, 2), (10, 200, 30))
    data = imagegen.encode(im, "PNG")
    for fmt in ("jpeg", "webp"):
        result = transform_image(data, ImageOptions(max_size=None, format=fmt, passthrough=False))
        assert isinstance(result, EncodedImage), result
        assert result.format == "png" and result.extension == "png"
        assert _decode(result.data).size == (width, 2)
    assert capfd.readouterr().err == ""


# --- completeness: truncations of real JPEGs at every 5% ------------------------------------

TRUNCATED_SOURCES = {
    "flower.jpg": lambda: (REAL / "flower.jpg").read_bytes(),  # EXIF thumbnail: an FF D9 before the scan
    "iptc.jpg": lambda: (REAL / "iptc.jpg").read_bytes(),  # Photoshop IPTC block and a thumbnail
    "sugarshack.mpo": lambda: (REAL / "sugarshack.mpo").read_bytes(),
    "progressive": lambda: _flower_progressive(1),
    "Landscape_0.jpg": lambda: (REAL / "Landscape_0.jpg").read_bytes(),
}


@pytest.mark.parametrize("name", sorted(TRUNCATED_SOURCES))
@pytest.mark.parametrize(
    "opts", [ImageOptions(max_size=None, format="keep"), ImageOptions()], ids=["keep", "default"]
)
def test_truncated_real_jpegs_are_rejected_or_decodable(name, opts):
    whole = TRUNCATED_SOURCES[name]()
    for percent in range(5, 100, 5):
        data = whole[: len(whole) * percent // 100]
        result = transform_image(data, opts)
        if isinstance(result, ImageFailure):
            assert result.reason
            continue
        # written: the first picture of an MPO may be whole before the cut; what is stored decodes
        assert name == "sugarshack.mpo", f"{name} cut at {percent}% was written"
        _decode(result.data)
    whole_result = transform_image(whole, opts)
    assert isinstance(whole_result, EncodedImage), whole_result
    _decode(whole_result.data)


def test_truncated_jpegs_are_each_a_row_written_or_rejected(tmp_path):
    whole = (REAL / "flower.jpg").read_bytes()
    images = {f"cut{p}.jpg": whole[: len(whole) * p // 100] for p in range(5, 101, 5)}
    inp = write_input(tmp_path / "in", [row(n.split(".")[0], n) for n in images], images)
    assert convert(inp, tmp_path / "out", "--max-size", "0", "--image-format", "keep") == 0
    out = Output(tmp_path / "out")
    assert list(out.by_id()) == ["cut100"] and out.by_id()["cut100"]["image"]["bytes"] == whole
    assert len(out.rejects) == 19 and {r["stage"] for r in out.rejects} == {"decode"}


def test_png_crc_damage_is_not_passed_through():
    """A flipped byte inside the pixel data: the chunk CRC no longer matches, so the file is
    decoded in full rather than kept (Pillow does not check the IDAT CRC itself)."""
    data = bytearray(imagegen.png(size=(200, 150)))
    at = bytes(data).index(b"IDAT") + 20
    data[at] ^= 0x01
    result = transform_image(bytes(data), ImageOptions(max_size=None, format="keep"))
    assert isinstance(result, ImageFailure) or not result.passthrough
    if isinstance(result, EncodedImage):
        _decode(result.data)


def test_png_chunks_after_the_end_of_a_cut_file():
    whole = _exif_after_idat(1)
    for cut in range(9, len(whole)):
        result = transform_image(whole[:cut], ImageOptions(max_size=None, format="keep"))
        if isinstance(result, EncodedImage):
            assert not result.passthrough
            _decode(result.data)


def test_tiff_orientation_with_downscaling_keeps_the_upright_shape():
    """The TIFF turns itself in load(), so the target size is taken after it, not before."""
    sizes = set()
    for o in range(1, 9):
        result = transform_image(
            (REAL / f"g4_orientation_{o}.tif").read_bytes(), ImageOptions(max_size=100, format="png")
        )
        sizes.add(_decode(result.data).size)
    assert sizes == {(100, 15)}


def test_png_pass_through_decodes_no_pixels_unless_it_holds_orientation_metadata(monkeypatch):
    """getexif() on a PNG forces a decode (FORMATS.md §6): only a PNG whose chunk walk found an
    eXIf, EXIF-text or XMP chunk after the pixels (which only load() reads) pays for it."""
    from PIL import PngImagePlugin

    loads = []
    real_load = PngImagePlugin.PngImageFile.load

    def counting_load(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting_load)
    plain = imagegen.png(size=(300, 200))
    assert transform_image(plain, ImageOptions(max_size=None, format="keep")).passthrough
    assert loads == []
    upright_exif = imagegen.encode(imagegen.quadrant_image(), "PNG", orientation=1)  # eXIf before IDAT
    assert transform_image(upright_exif, ImageOptions(max_size=None, format="keep")).passthrough
    assert loads == []
    late = _exif_after_idat(1)
    assert transform_image(late, ImageOptions(max_size=None, format="keep")).passthrough
    assert loads == [imagegen.UPRIGHT_SIZE]

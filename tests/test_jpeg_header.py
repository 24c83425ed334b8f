"""The JPEG marker walk that lets pass-through skip Pillow's ``open``.

It must agree with Pillow on every file it answers for (size, mode, EXIF block), answer None
for everything unusual, and never change what ``transform_image`` decides: a file it keeps must
be kept by the full path too, and a file it does not keep goes down the full path unchanged.
"""

from __future__ import annotations

import io
from pathlib import Path
from unittest import mock

import imagegen
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine import imaging
from engine.config import ImageOptions
from engine.imaging import EncodedImage, ImageFailure, transform_image
from engine.jpeg_header import jpeg_end, read_jpeg_header

KEEP = ImageOptions(max_size=None, format="keep")


def _progressive() -> bytes:
    buf = io.BytesIO()
    imagegen.quadrant_image().save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


def _with_icc_and_comment() -> bytes:
    buf = io.BytesIO()
    im = imagegen.quadrant_image()
    im.save(buf, "JPEG", quality=90, icc_profile=b"\0" * 70_000, comment=b"a comment")  # ICC spans 2 APP2s
    return buf.getvalue()


def _mpo() -> bytes:
    buf = io.BytesIO()
    first, second = imagegen.quadrant_image(), imagegen.quadrant_image().transpose(Image.Transpose.ROTATE_180)
    first.save(buf, "MPO", save_all=True, append_images=[second])
    return buf.getvalue()


def _camera_exif() -> bytes:
    """EXIF as cameras write it: resolution tags (Pillow reads its DPI from them, as no JFIF
    segment gives one), make, model, date and an Exif sub-IFD."""
    exif = Image.Exif()
    exif.update(
        {
            0x0112: 1,
            0x0128: 2,
            0x011A: 72.0,
            0x011B: 72.0,
            0x010F: "Cam",
            0x0110: "Model 1",
            0x0132: "2026:11:22 12:00:00",
        }
    )
    exif.get_ifd(0x8769).update({0x9003: "2026:11:22 12:00:00", 0xA002: 64, 0xA003: 48})
    return imagegen.encode(imagegen.quadrant_image(), "JPEG", exif=exif.tobytes())


PLAIN = {
    "camera-exif": _camera_exif,
    "rgb": imagegen.jpeg,
    "grey": lambda: imagegen.jpeg(mode="L"),
    "progressive": _progressive,
    "exif-orientation-1": lambda: imagegen.oriented(1),
    "exif-orientation-6": lambda: imagegen.oriented(6),
    "icc-and-comment": _with_icc_and_comment,
    "noise": imagegen.noise_jpeg,
}


def _full_path(data: bytes, opts: ImageOptions):
    """transform_image as it was before the walk: Pillow opens every file."""
    with mock.patch.object(imaging, "read_jpeg_header", lambda _data: None):
        return transform_image(data, opts)


@pytest.mark.parametrize("kind", sorted(PLAIN))
def test_header_agrees_with_pillow(kind):
    data = PLAIN[kind]()
    header = read_jpeg_header(data)
    im = Image.open(io.BytesIO(data))
    assert header is not None
    assert (header.width, header.height, header.mode) == (im.width, im.height, im.mode)
    assert header.exif == im.info.get("exif")
    sos = data.index(b"\xff\xda")  # the start-of-scan segment; the scan follows it
    assert header.scan_start == sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


@pytest.mark.parametrize(
    "kind,data",
    [
        ("cmyk", imagegen.cmyk_jpeg()),
        ("mpo", _mpo()),
        ("png", imagegen.png()),
        ("truncated header", imagegen.jpeg()[:100]),
        ("garbage after SOI", imagegen.corrupt_jpeg()),
        ("empty", b""),
    ],
)
def test_unusual_files_are_left_to_pillow(kind, data):
    assert read_jpeg_header(data) is None


@pytest.mark.parametrize("kind", sorted(PLAIN))
@pytest.mark.parametrize(
    "opts",
    [KEEP, ImageOptions(max_size=48), ImageOptions(max_size=None, max_pixels=100)],
    ids=["keep", "shrink", "pixel-limit"],
)
def test_transform_decides_as_the_full_path(kind, opts):
    data = PLAIN[kind]()
    fast, full = transform_image(data, opts), _full_path(data, opts)
    assert type(fast) is type(full)
    if isinstance(fast, EncodedImage):
        assert (fast.passthrough, fast.width, fast.height, fast.format) == (
            full.passthrough,
            full.width,
            full.height,
            full.format,
        )
        if fast.passthrough:
            assert fast.data == data
        else:  # re-encoded by the same code from the same pixels
            assert fast.data == full.data
    else:
        assert fast.reason == full.reason


def test_kept_jpeg_is_the_plain_file_untouched():
    data = imagegen.oriented(1)
    with mock.patch.object(imaging.Image, "open", side_effect=AssertionError("Pillow opened a plain JPEG")):
        result = transform_image(data, KEEP)
    assert isinstance(result, EncodedImage) and result.passthrough and result.data == data
    assert (result.width, result.height) == Image.open(io.BytesIO(data)).size


def test_truncated_scan_is_rejected_even_with_an_end_marker_before_it():
    """Pillow's tile offset for a JPEG is 0, so an end-of-image marker anywhere (an EXIF
    thumbnail's, say) used to satisfy the check; the walk knows where the scan starts."""
    whole = imagegen.noise_jpeg((128, 128), seed=3)
    header = read_jpeg_header(whole)
    head, scan = whole[: header.scan_start], whole[header.scan_start :]
    # an APP15 segment holding an end-of-image marker, before the scan, then half the scan
    app = b"\xff\xef" + (2 + 4).to_bytes(2, "big") + b"\x00\xff\xd9\x00"
    data = head[:2] + app + head[2:] + scan[: len(scan) // 2]
    result = transform_image(data, KEEP)
    assert isinstance(result, ImageFailure)
    assert "truncated" in result.reason


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(sorted(PLAIN)),
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_headers_never_keep_what_pillow_would_not(base, flips, cut):
    """Bytes changed where the markers, tables and EXIF block are (the first 700), and cut."""
    data = bytearray(PLAIN[base]())
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[: max(cut, 1)] if cut < len(data) else data)
    fast, full = transform_image(data, KEEP), _full_path(data, KEEP)
    assert type(fast) is type(full), (fast, full)
    if isinstance(fast, EncodedImage):
        assert (fast.width, fast.height, fast.format, fast.passthrough) == (
            full.width,
            full.height,
            full.format,
            full.passthrough,
        )
        if fast.passthrough:  # a kept file is one a reader decodes in full
            Image.open(io.BytesIO(fast.data)).load()
    else:
        assert fast.reason == full.reason


def _exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A big-endian EXIF APP1 payload with one IFD of (tag, type, count, 4-byte value) entries."""
    out = b"Exif\x00\x00MM\x00\x2a" + (8).to_bytes(4, "big") + len(entries).to_bytes(2, "big")
    for tag, kind, count, value in entries:
        out += tag.to_bytes(2, "big") + kind.to_bytes(2, "big") + count.to_bytes(4, "big") + value
    return out + bytes(4)


def test_a_jpeg_pillow_cannot_open_is_not_kept():
    """An empty text XResolution makes Pillow's ``open`` fail while it reads the DPI from the EXIF
    block (no JFIF segment gives one). The walk alone would keep the file; trainers could not
    open it, so it must be rejected as before."""
    exif = _exif_block([(0x011A, 2, 1, bytes(4)), (0x0128, 3, 1, b"\x00\x02\x00\x00")])
    data = imagegen.encode(imagegen.quadrant_image(), "JPEG", exif=exif)
    assert read_jpeg_header(data) is not None
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(data))
    result = transform_image(data, KEEP)
    assert isinstance(result, ImageFailure)
    assert result.reason == _full_path(data, KEEP).reason


# --- jpeg_end: the structure proven whole, to the real end-of-image marker --------------------


def _exif_with_thumbnail() -> bytes:
    """A camera file whose EXIF block carries a JPEG thumbnail: that thumbnail's own end-of-image
    marker sits inside APP1, before the scan (tests/data/real/SOURCES.md)."""
    return (Path(__file__).resolve().parent / "data" / "real" / "flower.jpg").read_bytes()


def test_jpeg_end_is_the_real_end_of_image():
    for data in (
        imagegen.jpeg(),
        _progressive(),
        _with_icc_and_comment(),
        _camera_exif(),
        _exif_with_thumbnail(),
    ):
        assert jpeg_end(data) == len(data)
    assert jpeg_end(imagegen.jpeg() + b"trailing bytes after the picture") == len(imagegen.jpeg())


def test_jpeg_end_is_never_a_thumbnails_marker():
    data = _exif_with_thumbnail()
    sos = 2
    while data[sos + 1] != 0xDA:  # the real start of scan: segment by segment, past APP1
        sos += 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    assert data.find(b"\xff\xd9") < sos, "the fixture must hold an end marker before its scan"
    for cut in range(sos, len(data) - 1, max(1, (len(data) - sos) // 40)):
        assert jpeg_end(data[:cut]) is None, cut
        assert isinstance(transform_image(data[:cut], KEEP), ImageFailure)


def test_jpeg_end_of_an_mpo_is_its_first_picture():
    data = _mpo()
    end = jpeg_end(data)
    assert end is not None and end < len(data)
    Image.open(io.BytesIO(data[:end])).load()


@pytest.mark.parametrize(
    "kind,change",
    [
        ("no end marker", lambda d: d[:-2]),
        ("a second frame header", lambda d: d[:-2] + d[d.index(b"\xff\xc0") : d.index(b"\xff\xc4")] + d[-2:]),
        (
            "a Huffman table with too many codes",
            lambda d: d.replace(b"\xff\xc4\x00\x1f\x00\x00\x01", b"\xff\xc4\x00\x1f\x00\x00\xff", 1),
        ),
        ("12-bit samples", lambda d: d.replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c", 1)),
        ("a marker inside the scan data", lambda d: d[:-40] + b"\xff\xc8" + d[-38:]),
    ],
)
def test_jpeg_end_refuses_what_libjpeg_refuses(kind, change):
    data = change(imagegen.jpeg(size=(128, 96)))
    assert jpeg_end(data) is None
    result = transform_image(data, KEEP)
    assert isinstance(result, ImageFailure) or not result.passthrough


def test_progressive_cut_between_scans_is_never_kept():
    data = _progressive()
    for at in [m for m in range(len(data)) if data[m : m + 2] == b"\xff\xda"][1:]:
        assert jpeg_end(data[:at]) is None
        assert isinstance(transform_image(data[:at], KEEP), ImageFailure)


def test_flipped_bytes_in_the_scan_data_are_never_kept_undecodable():
    """A flipped byte in the entropy-coded data may make a marker libjpeg stops on (about 1 file
    in 20 here): the end marker is still found from the end of the file, but only the walk
    through the scan data sees the stray marker. Every kept file must decode."""
    import random

    rng = random.Random(5)
    whole = imagegen.noise_jpeg((96, 96), seed=4)
    scan = read_jpeg_header(whole).scan_start
    kept = 0
    for _ in range(400):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(scan, len(data) - 2)] ^= rng.randint(1, 255)
        result = transform_image(bytes(data), KEEP)
        if isinstance(result, EncodedImage):
            kept += result.passthrough
            Image.open(io.BytesIO(result.data)).load()
    assert kept > 200  # most flips leave a file libjpeg decodes (wrong pixels, no error): kept

"""Pure bytes -> bytes image work: decode, EXIF orientation, downscale, re-encode or pass through.

Nothing here touches files, stats or Ray. ``transform_image`` never raises for a bad image:
it returns an :class:`ImageFailure` whose reason goes to rejects.jsonl.

The order of operations follows what measured fastest (FORMATS.md §6): JPEG DCT scaling
(``draft``) to the smallest scale still at least the target, ``thumbnail``, and only then the
EXIF transpose, on the small image.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import struct
import threading
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, TiffImagePlugin, features

from engine.config import DEFAULT_FORMATS, ImageOptions
from engine.jpeg_header import read_jpeg_header
from engine.libwarnings import route_library_messages

ImageFile.LOAD_TRUNCATED_IMAGES = False
route_library_messages()  # Pillow's and libtiff's per-file messages: to logging, not stderr
# The pixel limit is enforced by transform_image from the header; Pillow's own warning is noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# "... because AVIF support not installed": the reject reason says so (sniff_non_image).
warnings.filterwarnings("ignore", message="image file could not be identified", category=UserWarning)


class _ThreadWarnings:
    """A stand-in for the ``warnings`` module inside Pillow's TIFF parser, which reads EXIF blocks.

    That parser reports a broken block only through ``warnings.warn``. ``catch_warnings`` would
    swap process-wide state, so when the driver's threads parse EXIF at the same time, one
    thread's warning could land in another's record, and a good image would be rejected for a
    neighbour's broken block (a test shows it). Here a thread that is collecting gets exactly its
    own warnings; in any other thread a warning goes to the real ``warnings.warn``."""

    def __init__(self, real):
        self._real = real
        self._local = threading.local()

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def warn(self, message, category=None, stacklevel: int = 1, **kwargs) -> None:
        caught = getattr(self._local, "caught", None)
        if caught is None:
            self._real.warn(message, category, stacklevel + 1, **kwargs)
        else:
            caught.append(str(message))

    @contextlib.contextmanager
    def collect(self):
        self._local.caught = caught = []
        try:
            yield caught
        finally:
            self._local.caught = None


if not isinstance(TiffImagePlugin.warnings, _ThreadWarnings):
    TiffImagePlugin.warnings = _ThreadWarnings(TiffImagePlugin.warnings)
_TIFF_WARNINGS: _ThreadWarnings = TiffImagePlugin.warnings

ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SOURCE_FORMAT = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
# Modes a reader handles as they are, per stored format: these may pass through untouched.
_STORABLE = {"jpeg": {"RGB", "L"}, "png": {"RGB", "RGBA", "L", "LA"}, "webp": {"RGB", "RGBA"}}
_EXTENSION = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# --image-format keep, for a source format no reader takes as it is: lossy photos become JPEG,
# anything else (TIFF, BMP, GIF, ...) lossless PNG.
_KEEP_AS = {"HEIF": "jpeg"}
TRUNCATED_JPEG = "truncated JPEG: no end-of-image marker after the scan data"
# Bytes a JPEG's decoder is given per call. Pillow's default (ImageFile.MAXBLOCK, 64 KB) makes
# about 40 calls for a 2.5 MB photo, each giving the GIL back and taking it again, so the
# driver's threads queue for it; one call per photo decoded 200 photos in two threads 5-8%
# faster (same pixels), and one thread 2.5% faster. The cap bounds the copy a larger file costs.
# Set per image in _open, not through Pillow's process-wide ImageFile.MAXBLOCK, which every
# other decoder and encoder in the process (a library user's too) would inherit.
JPEG_DECODE_BLOCK = 4 << 20


@dataclass(frozen=True, slots=True)
class EncodedImage:
    data: bytes
    format: str  # jpeg | png | webp
    width: int
    height: int
    passthrough: bool

    @property
    def extension(self) -> str:
        return _EXTENSION[self.format]


@dataclass(frozen=True, slots=True)
class ImageFailure:
    reason: str


def transform_image(data: bytes, opts: ImageOptions) -> EncodedImage | ImageFailure:
    """Make ``data`` upright, at most ``opts.max_size`` on its longest side, in a storable mode."""
    if not data:
        return ImageFailure("empty file (0 bytes)")
    try:
        return _transform(data, opts)
    except Image.DecompressionBombError as exc:
        return ImageFailure(f"over the pixel limit: {exc}")
    except MemoryError:
        return ImageFailure("out of memory while decoding")
    except ImportError as exc:  # a codec this Pillow build lacks, found only while decoding
        return ImageFailure(f"this Pillow build lacks a library the image needs: {exc}")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        return ImageFailure(f"cannot decode image: {type(exc).__name__}: {exc}")


def _transform(data: bytes, opts: ImageOptions) -> EncodedImage | ImageFailure:
    if opts.max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = opts.max_pixels
    if opts.passthrough:
        kept = _keep_plain_jpeg(data, opts)
        if kept is not None:
            return kept
    im = _open(data, opts.formats)
    if isinstance(im, ImageFailure):
        return im
    width, height = im.size
    if width < 1 or height < 1:
        return ImageFailure(f"invalid dimensions {width}x{height}")
    if width * height > opts.max_pixels:
        return ImageFailure(
            f"{width}x{height} = {width * height:,} pixels is over the pixel limit of {opts.max_pixels:,}"
        )
    orientation = read_orientation(im)
    if isinstance(orientation, ImageFailure):
        return orientation
    source = _SOURCE_FORMAT.get(im.format or "")
    target = target_size(width, height, opts.max_size)
    if (
        opts.passthrough
        and source is not None
        and orientation == 1
        and target == (width, height)
        and im.mode in _STORABLE[source]
        and getattr(im, "n_frames", 1) == 1
    ):
        problem = check_complete(data, source, im.tile[0][2] if im.tile else 0)
        if problem:
            return ImageFailure(problem)
        return EncodedImage(data, source, width, height, passthrough=True)

    out_format = opts.format if opts.format != "keep" else (source or _KEEP_AS.get(im.format or "", "png"))
    im = _normalise_mode_before_resize(im)
    if target != (width, height):
        if im.format in ("JPEG", "MPO"):
            im.draft(None, target)
        im.thumbnail(target)
    else:
        im.load()
    if orientation != 1:
        im = im.transpose(_TRANSPOSE[orientation])
    im = _mode_for_format(im, out_format)
    return EncodedImage(_encode(im, out_format, opts.quality), out_format, im.width, im.height, False)


# --formats name -> the Pillow formats it opens, where the names differ (MPO opens through JPEG).
_PILLOW_IDS = {"jpeg2000": ("JPEG2000",), "heif": ("HEIF",)}
# Pillow format -> (PIL.features name, library) of a codec the build may lack.
_CODEC_OF = {"JPEG2000": ("jpg_2000", "OpenJPEG"), "AVIF": ("avif", "libavif")}


def format_name(pillow_format: str) -> str:
    """The --formats name of a Pillow format: JPEG and MPO -> jpeg, JPEG2000 -> jpeg2000."""
    return "jpeg" if pillow_format == "MPO" else pillow_format.lower()


def _pillow_ids(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The registered Pillow formats for ``formats`` (Image.open raises KeyError for any other)."""
    Image.init()
    return tuple(i for f in formats for i in _PILLOW_IDS.get(f, (f.upper(),)) if i in Image.OPEN)


def _open(data: bytes, formats: tuple[str, ...] = DEFAULT_FORMATS) -> Image.Image | ImageFailure:
    """Pillow's ``open``, for the formats of ``--formats`` only (a JPEG set to reach its decoder in
    one call, see JPEG_DECODE_BLOCK); HEIF/HEIC (phone photos) through pillow-heif and AVIF,
    where this Pillow has no libavif, through pillow-avif-plugin, each loaded only when such a
    file turns up. Anything else gets a reason that says what it is and why it is not read."""
    kind = sniff_non_image(data)
    if kind == "HEIF" and "heif" in formats and not _heif_opener():
        return ImageFailure("HEIF/HEIC image, which needs pillow-heif (pip install pillow-heif)")
    if kind == "AVIF" and "avif" in formats and not _avif_opener():
        return ImageFailure("AVIF image: this Pillow build has no libavif and pillow-avif-plugin is not "
                            "installed (pip install pillow-avif-plugin)")
    try:
        im = Image.open(io.BytesIO(data), formats=_pillow_ids(formats))
    except Image.UnidentifiedImageError:
        return ImageFailure(_unidentified(data, formats, kind))
    if im.format in ("JPEG", "MPO"):
        im.decodermaxblock = max(im.decodermaxblock, min(len(data), JPEG_DECODE_BLOCK))
    feature, library = _CODEC_OF.get(im.format or "", (None, None))
    if feature and im.format != "AVIF" and not features.check(feature):
        return ImageFailure(f"{im.format} image: this Pillow build has no {library}, which decodes it")
    if im.mode == "LAB" and not features.check("littlecms2"):
        return ImageFailure("LAB colour image: this Pillow build has no LittleCMS, which converts it to RGB")
    return im


def _unidentified(data: bytes, formats: tuple[str, ...], kind: str | None) -> str:
    """Why Pillow opened none of ``formats``: the file is of another format (named, with how to
    allow it), a broken HEIF/AVIF container, or not an image at all."""
    allowed = ",".join(formats)
    if kind in ("HEIF", "AVIF"):
        name = kind.lower()
        if name not in formats:
            return f"{kind} image: not in --formats ({allowed}); add it with --formats +{name}"
        if kind == "HEIF":
            return "not an image (a HEIF container pillow-heif cannot read)"
        return "not an image (an AVIF image whose container libavif cannot read)"
    found = _format_of(data[:16])
    if found is not None:
        name = format_name(found)
        if name not in formats:
            return f"{found} image: not in --formats ({allowed}); add it with --formats +{name}"
        return f"cannot decode image: not a valid {found} file"
    return f"not an image ({_NON_IMAGES.get(kind, 'unrecognised format')})"


def _format_of(prefix: bytes) -> str | None:
    """The Pillow format whose signature check accepts ``prefix`` (formats without one are not
    guessed: they would accept anything)."""
    Image.init()
    for pillow_id in Image.ID:
        accept = Image.OPEN[pillow_id][1]
        try:
            if accept is not None and accept(prefix) is True:
                return pillow_id
        except Exception:  # noqa: BLE001 - a plugin's check on a short prefix
            continue
    return None


_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_NON_IMAGES = {
    "JXL": "a JPEG XL image, which this Pillow build cannot decode",
    "PDF": "a PDF document",
    "HTML": "an HTML page, such as a server's error page",
    "SVG": "an SVG drawing; vector images are not converted",
}


def sniff_non_image(data: bytes) -> str | None:
    """What a file Pillow does not recognise is, from its first bytes: HEIF, AVIF, JXL, PDF,
    HTML, SVG, or None."""
    if data[4:8] == b"ftyp":
        major = data[8:12]
        brands = {major} | {data[i:i + 4] for i in range(16, min(len(data), 64), 4)}
        if major in (b"avif", b"avis"):
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JXL"
    if data[:5] == b"%PDF-":
        return "PDF"
    head = data[:1024].lstrip().lower()
    if head.startswith(b"<"):
        if b"<svg" in head:
            return "SVG"
        if b"<html" in head or b"<!doctype html" in head:
            return "HTML"
    return None


@functools.cache
def _avif_opener() -> bool:
    """AVIF: Pillow's own plugin when the build has libavif, else pillow-avif-plugin (a wheel
    with its own libavif), registered once per process; False when neither is there."""
    if features.check("avif"):
        return True
    try:
        import pillow_avif  # noqa: F401 - registers its AVIF plugin in place of Pillow's
    except ImportError:
        return False
    return True


@functools.cache
def _heif_opener() -> bool:
    """Register pillow-heif's opener with Pillow, once per process (two threads may both do it,
    which is harmless); False when pillow-heif is missing."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _keep_plain_jpeg(data: bytes, opts: ImageOptions) -> EncodedImage | ImageFailure | None:
    """Pass-through of a plain JPEG judged from its markers, without Pillow's ``open``
    (``engine.jpeg_header`` says why). None sends the file down the full path, which decides
    anything this does not: a file to rotate, shrink or convert, or an unusual or broken header."""
    header = read_jpeg_header(data)
    if header is None or header.width * header.height > opts.max_pixels:
        return None
    if target_size(header.width, header.height, opts.max_size) != (header.width, header.height):
        return None
    exif = _load_exif(header.exif)
    if isinstance(exif, ImageFailure) or _orientation(exif) != 1:  # to rotate, or a broken block to report
        return None
    if exif is not None and not header.jfif_dpi and not _pillow_reads_dpi(exif):
        return None
    problem = check_complete(data, "jpeg", header.scan_start)
    if problem:
        return ImageFailure(problem)
    return EncodedImage(data, "jpeg", header.width, header.height, passthrough=True)


def target_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """Size after downscaling so the longest side is at most ``max_size`` (aspect kept, >= 1 px)."""
    if max_size is None or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_orientation(im: Image.Image) -> int | ImageFailure:
    """The EXIF orientation (1 when absent), read without decoding pixels.

    JPEG, PNG and WebP keep their EXIF block in ``im.info`` at open time; ``getexif()`` on a PNG
    would force a full decode (FORMATS.md §6).
    """
    if im.format in ("JPEG", "MPO", "PNG", "WEBP"):
        return exif_orientation(im.info.get("exif"))
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception as exc:  # noqa: BLE001
        return ImageFailure(f"corrupt EXIF block: {type(exc).__name__}: {exc}")
    return _valid_orientation(value)


def exif_orientation(raw: bytes | None) -> int | ImageFailure:
    """The orientation in a raw EXIF block (as Pillow keeps it in ``info["exif"]``), 1 when absent."""
    exif = _load_exif(raw)
    return exif if isinstance(exif, ImageFailure) else _orientation(exif)


def _load_exif(raw: bytes | None) -> Image.Exif | ImageFailure | None:
    """The parsed EXIF block; None when there is none."""
    if not raw:
        return None
    try:
        exif = Image.Exif()
        with _TIFF_WARNINGS.collect() as caught:  # Pillow only warns on a broken block
            exif.load(raw)
    except Exception as exc:  # noqa: BLE001
        return ImageFailure(f"corrupt EXIF block: {type(exc).__name__}: {exc}")
    if caught:  # any warning while parsing the block means part of it is unreadable
        return ImageFailure(f"corrupt EXIF block: {caught[0]}".strip())
    return exif


def _orientation(exif: Image.Exif | None) -> int | ImageFailure:
    if exif is None:
        return 1
    try:
        value = exif.get(ORIENTATION_TAG, 1)
    except Exception as exc:  # noqa: BLE001
        return ImageFailure(f"corrupt EXIF block: {type(exc).__name__}: {exc}")
    return _valid_orientation(value)


def _pillow_reads_dpi(exif: Image.Exif) -> bool:
    """Whether Pillow's JPEG ``open`` survives reading the DPI from this EXIF block, as it does
    when no JFIF segment gives it (``JpegImageFile._read_dpi_from_exif``, whose caught errors
    these are); a file it cannot open must not be kept."""
    try:
        unit, x_resolution = exif[0x0128], exif[0x011A]
        try:
            dpi = float(x_resolution[0]) / x_resolution[1]
        except TypeError:
            dpi = x_resolution
        if math.isnan(dpi):
            return True
        if unit == 3:
            dpi *= 2.54
    except (struct.error, KeyError, SyntaxError, TypeError, ValueError, ZeroDivisionError):
        return True
    except Exception:  # noqa: BLE001
        return False
    return True


def _valid_orientation(value) -> int | ImageFailure:
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if not isinstance(value, int) or not 1 <= value <= 8:
        return ImageFailure(f"invalid EXIF orientation {value!r} (must be 1 to 8)")
    return value


def check_complete(data: bytes, source: str, scan_start: int) -> str | None:
    """Cheap structural check of a file that passes through without a full decode.

    A truncated JPEG lacks its end-of-image marker after the scan data; a truncated PNG lacks
    its IEND chunk; a truncated WebP is shorter than its RIFF header says. ``scan_start`` is
    where the image data starts (Pillow's tile offset, 0 for a JPEG it opened; the marker walk
    knows the real one).
    """
    if source == "jpeg":
        if data.rfind(b"\xff\xd9") < scan_start:
            return TRUNCATED_JPEG
    elif source == "png":
        if data.rfind(b"IEND\xaeB`\x82") < scan_start:
            return "truncated PNG: no IEND chunk"
    elif source == "webp":
        if len(data) < 8 + int.from_bytes(data[4:8], "little"):
            return "truncated WebP: shorter than its RIFF header says"
    return None


def _normalise_mode_before_resize(im: Image.Image) -> Image.Image:
    """Modes that resize badly or cannot be stored: palette, 1-bit, 16/32-bit, float."""
    mode = im.mode
    if mode == "P" or mode == "PA":
        return im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I;16") or mode == "I":
        import numpy as np

        arr = np.asarray(im)
        if mode == "I" and arr.size and int(arr.max()) > 65535:
            arr = arr.astype(np.float64) * (255.0 / float(arr.max()))
        else:
            arr = arr.astype(np.uint32) >> 8
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if mode == "F":
        import numpy as np

        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    return im


def _mode_for_format(im: Image.Image, fmt: str) -> Image.Image:
    mode = im.mode
    has_alpha = mode in ("RGBA", "LA", "RGBa", "La")
    if fmt == "jpeg":
        if has_alpha:  # JPEG holds no alpha: composite over white rather than expose hidden colour
            rgba = im.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return im if mode in ("RGB", "L") else im.convert("RGB")
    if fmt == "webp":
        return im if mode in ("RGB", "RGBA") else im.convert("RGBA" if has_alpha else "RGB")
    return im if mode in ("RGB", "RGBA", "L", "LA") else im.convert("RGBA" if has_alpha else "RGB")


def _encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    icc = im.info.get("icc_profile")
    extra = {"icc_profile": icc} if icc else {}
    if fmt == "jpeg":
        im.save(buf, "JPEG", quality=quality, **extra)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality, **extra)
    else:
        im.save(buf, "PNG", **extra)
    return buf.getvalue()

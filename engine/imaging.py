"""Pure bytes -> bytes image work: decode, EXIF orientation, downscale, re-encode or pass through.

Nothing here touches files, stats or Ray. ``transform_image`` never raises for a bad image:
it returns an :class:`ImageFailure` whose reason goes to rejects.jsonl. Importing this module
changes nothing of Pillow's process-wide state: a process calls :func:`configure_pillow` once
before its image work (the driver, each unit, update, inspect, the isolated re-check do).

The order of operations follows what measured fastest (FORMATS.md §6): JPEG DCT scaling
(``draft``) to the smallest scale still at least the target, ``thumbnail``, and only then the
EXIF transpose, on the small image.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass

from PIL import Image, ImageFile, TiffImagePlugin, features

from engine.config import DEFAULT_FORMATS, ImageOptions
from engine.jpeg_header import MAX_JPEG_SIDE, jpeg_end, read_jpeg_header
from engine.libwarnings import route_library_messages


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


_TIFF_WARNINGS = _ThreadWarnings(warnings)  # put in TiffImagePlugin's place by configure_pillow
_CONFIGURE_LOCK = threading.Lock()
_configured = False


def configure_pillow(max_pixels: int | None = None) -> None:
    """Set the process-wide state of Pillow that the engine's image work relies on; calling it
    again changes nothing. ``max_pixels`` (the run's --max-pixels) raises Pillow's own
    decompression-bomb limit to it, never lowers it: the engine enforces its limit from the
    header, and Pillow's open stops only images of over twice that."""
    global _configured
    with _CONFIGURE_LOCK:
        if not _configured:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            route_library_messages()  # Pillow's and libtiff's per-file messages: to logging, not stderr
            # The pixel limit is enforced by transform_image from the header; Pillow's own warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # "... because AVIF support not installed": the reject reason says so (sniff_non_image).
            warnings.filterwarnings(
                "ignore", message="image file could not be identified", category=UserWarning
            )
            if (
                TiffImagePlugin.warnings is not _TIFF_WARNINGS
            ):  # EXIF warnings, per thread (see _ThreadWarnings)
                _TIFF_WARNINGS._real = TiffImagePlugin.warnings
                TiffImagePlugin.warnings = _TIFF_WARNINGS
            _configured = True
        if max_pixels is not None and max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
            Image.MAX_IMAGE_PIXELS = max_pixels


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
# Warning kinds (stats.json "warnings"): an image written upright although its EXIF says otherwise.
WARNING_ORIENTATION_INVALID = "exif_orientation_invalid"  # orientation 0, 9 or not a number: upright
WARNING_EXIF_UNREADABLE = "exif_unreadable"  # a block Pillow cannot fully parse: read as far as it can
# Widest side each encoder can write: libjpeg's JPEG_MAX_DIMENSION, libwebp's WEBP_MAX_DIMENSION.
_MAX_SIDE = {"jpeg": MAX_JPEG_SIDE, "webp": 16383}
# Bytes a JPEG's decoder is given per call: one call per photo, not one per 64 KB that each take
# the GIL again (faster in threads, bench/GAP.md); the cap bounds the copy a larger file costs.
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
    # kinds of harmless trouble met on the way (WARNING_* names), counted per kind in stats.json
    warnings: tuple[str, ...] = ()
    # what re-encoding did to it, counted in stats.json "images": shrunk to --max-size, turned upright
    resized: bool = False
    rotated: bool = False

    @property
    def extension(self) -> str:
        return _EXTENSION[self.format]


@dataclass(frozen=True, slots=True)
class ImageFailure:
    reason: str


def transform_image(data: bytes, opts: ImageOptions) -> EncodedImage | ImageFailure:
    """Make ``data`` upright, at most ``opts.max_size`` on its longest side, in a storable mode
    (in a process that called ``configure_pillow(opts.max_pixels)``)."""
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
    png = png_facts(data) if im.format == "PNG" else None
    if im.format in ("JPEG", "MPO", "WEBP") or (png is not None and not png.late_metadata):
        orientation = metadata_orientation(im.info)  # what Pillow kept at open: no pixels decoded
    else:
        # A PNG's eXIf chunk may follow the pixels, and a TIFF turns itself upright in load(), so
        # the orientation left to apply is the one after loading.
        im.load()
        orientation = metadata_orientation(im.info) if png is not None else _loaded_orientation(im)
        width, height = im.size
    source = _SOURCE_FORMAT.get(im.format or "")
    target = target_size(width, height, opts.max_size)
    if (
        opts.passthrough
        and source is not None
        and orientation.value == 1
        and not orientation.reader_fails
        and target == (width, height)
        and im.mode in _STORABLE[source]
        and getattr(im, "n_frames", 1) == 1
        and _proven_whole(data, source, im, png)
    ):
        return EncodedImage(data, source, width, height, passthrough=True, warnings=orientation.warnings)

    # Not kept: decoded in full below (a file cut short fails there, as LOAD_TRUNCATED_IMAGES is off).
    out_format = opts.format if opts.format != "keep" else (source or _KEEP_AS.get(im.format or "", "png"))
    if max(target) > _MAX_SIDE.get(out_format, max(target)):
        out_format = "png"  # wider than JPEG or WebP can hold: lossless PNG (README says so)
    im = _normalise_mode_before_resize(im)
    if target != (width, height):
        if im.format in ("JPEG", "MPO"):
            im.draft(None, target)
        im.thumbnail(target)
    else:
        im.load()
    if orientation.value != 1:
        im = im.transpose(_TRANSPOSE[orientation.value])
    im = _mode_for_format(im, out_format)
    return EncodedImage(
        _encode(im, out_format, opts.quality),
        out_format,
        im.width,
        im.height,
        False,
        orientation.warnings,
        resized=target != (width, height),
        rotated=orientation.value != 1,
    )


def _proven_whole(data: bytes, source: str, im: Image.Image, png: PngFacts | None) -> bool:
    """Whether the file's structure is proven complete, so every reader decodes it as it is.

    JPEG: every segment and scan walked to the real end-of-image marker (``jpeg_end``). PNG: every
    chunk's length and CRC, up to IEND (``png_facts``). WebP's bitstream has no checksum to check,
    so a WebP is decoded in full here (a broken one raises, and is rejected)."""
    if source == "jpeg":
        return jpeg_end(data) is not None
    if source == "png":
        return png is not None and png.whole
    im.load()
    return True


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
        return ImageFailure(
            "AVIF image: this Pillow build has no libavif and pillow-avif-plugin is not "
            "installed (pip install pillow-avif-plugin)"
        )
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
        brands = {major} | {data[i : i + 4] for i in range(16, min(len(data), 64), 4)}
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


def _keep_plain_jpeg(data: bytes, opts: ImageOptions) -> EncodedImage | None:
    """Pass-through of a plain JPEG judged from its markers, without Pillow's ``open``
    (``engine.jpeg_header`` says why). None sends the file down the full path, which decides
    anything this does not: a file to rotate, shrink or convert, an unusual header, or one whose
    structure is not proven whole (decoded in full there)."""
    header = read_jpeg_header(data)
    if header is None or header.width * header.height > opts.max_pixels:
        return None
    if target_size(header.width, header.height, opts.max_size) != (header.width, header.height):
        return None
    info = {k: v for k, v in (("exif", header.exif), ("xmp", header.xmp)) if v is not None}
    orientation, exif = _metadata_orientation(info)
    if orientation.value != 1 or orientation.reader_fails:
        return None
    if exif is not None and not header.jfif_dpi and not _pillow_reads_dpi(exif):
        return None
    if jpeg_end(data) is None:
        return None
    return EncodedImage(
        data, "jpeg", header.width, header.height, passthrough=True, warnings=orientation.warnings
    )


def target_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """Size after downscaling so the longest side is at most ``max_size`` (aspect kept, >= 1 px)."""
    if max_size is None or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True, slots=True)
class Orientation:
    """The transpose a reader applies (what ``ImageOps.exif_transpose`` does), and what was odd."""

    value: int  # 1 (upright) to 8
    warnings: tuple[str, ...] = ()
    reader_fails: bool = False  # a reader's getexif() raises on this block: re-encode without it


UPRIGHT = Orientation(1)
_XMP_ORIENTATION = r'tiff:Orientation(="|>)([0-9])'  # the pattern Image.getexif looks for


def metadata_orientation(info: dict) -> Orientation:
    """The orientation a reader applies, from the metadata Pillow keeps in ``info``, decoding no
    pixels: the EXIF block (JPEG APP1, PNG eXIf, WebP EXIF), else ImageMagick's "Raw profile type
    exif" PNG text, and only when the block has no Orientation tag, XMP ``tiff:Orientation``. This
    is the order of ``Image.getexif``. Orientation 0, 9 or a non-number is upright, as readers
    show it; a block Pillow cannot parse is read as far as it can be."""
    return _metadata_orientation(info)[0]


def _metadata_orientation(info: dict) -> tuple[Orientation, Image.Exif | None]:
    """``metadata_orientation``, and the parsed EXIF block (None when there is none or it raised)."""
    raw = info.get("exif")
    if raw is None and "Raw profile type exif" in info:
        try:
            raw = bytes.fromhex("".join(info["Raw profile type exif"].split("\n")[3:]))
        except (AttributeError, TypeError, ValueError):
            return Orientation(1, (WARNING_EXIF_UNREADABLE,), reader_fails=True), None
    exif, unreadable, fails = _load_exif(raw)
    warnings_seen = (WARNING_EXIF_UNREADABLE,) if unreadable else ()
    try:
        value = exif.get(ORIENTATION_TAG) if exif is not None and ORIENTATION_TAG in exif else None
    except Exception:  # noqa: BLE001 - a tag Pillow cannot decode
        value, warnings_seen = None, (WARNING_EXIF_UNREADABLE,)
    if value is None:
        value = _xmp_orientation(info)
    return _as_orientation(value, warnings_seen, fails), exif


def _xmp_orientation(info: dict) -> int | None:
    xmp, pattern = info.get("XML:com.adobe.xmp"), _XMP_ORIENTATION
    if not xmp and (xmp := info.get("xmp")):
        pattern = pattern.encode()
    if not xmp or not isinstance(xmp, (str, bytes)) or isinstance(xmp, str) != isinstance(pattern, str):
        return None
    match = re.search(pattern, xmp)
    return int(match[2]) if match else None


def _loaded_orientation(im: Image.Image) -> Orientation:
    """The orientation left to apply to a loaded image of another format, from Pillow's own
    ``getexif`` (a TIFF has applied its tag in ``load()`` and dropped it)."""
    try:
        with _TIFF_WARNINGS.collect() as caught:
            value = im.getexif().get(ORIENTATION_TAG)
    except Exception:  # noqa: BLE001
        return Orientation(1, (WARNING_EXIF_UNREADABLE,), reader_fails=True)
    return _as_orientation(value, (WARNING_EXIF_UNREADABLE,) if caught else (), False)


def _as_orientation(value, warnings_seen: tuple[str, ...], fails: bool) -> Orientation:
    try:
        applied = value in _TRANSPOSE  # exif_transpose looks the value up the same way
    except TypeError:
        applied = False
    if applied:
        return Orientation(int(value), warnings_seen, fails)
    if value is not None and not (isinstance(value, int) and value == 1):
        warnings_seen += (WARNING_ORIENTATION_INVALID,)
    return Orientation(1, warnings_seen, fails) if warnings_seen or fails else UPRIGHT


def _load_exif(raw: bytes | None) -> tuple[Image.Exif | None, bool, bool]:
    """(the parsed EXIF block or None, whether part of it is unreadable, whether parsing raised)."""
    if not raw:
        return None, False, False
    exif = Image.Exif()
    try:
        with _TIFF_WARNINGS.collect() as caught:  # Pillow only warns on a broken block
            exif.load(raw)
    except Exception:  # noqa: BLE001
        return None, True, True
    return exif, bool(caught), False


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


@dataclass(frozen=True, slots=True)
class PngFacts:
    whole: bool  # IHDR first, IDAT chunks together, every length and CRC right, up to IEND; no APNG
    # a chunk that may hold an orientation (eXIf, EXIF or XMP text) after the pixels, which only
    # load() reads (and a later one replaces what open() read)
    late_metadata: bool


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")
_PNG_ORIENTATION_KEYWORDS = (b"Raw profile type exif\x00", b"XML:com.adobe.xmp\x00")


def png_facts(data: bytes) -> PngFacts:
    """Walk a PNG's chunks. Only chunk headers are parsed; the CRCs are computed over each chunk
    (about a third of a millisecond per MB), as a flipped or missing byte in the pixel data would
    make a reader fail and nothing else here would see it. An APNG (acTL) is never whole: its
    frames are decoded in full (one declaring 0 frames cannot be loaded at all)."""
    view = memoryview(data)
    end = len(data)
    pos = len(_PNG_SIGNATURE)
    whole = data.startswith(_PNG_SIGNATURE)
    late = False
    idat = 0  # 0: none yet, 1: in the IDAT run, 2: after it
    first = True
    while whole:
        if pos + 12 > end:
            whole = False
            break
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        stop = pos + 12 + length
        if length > 0x7FFFFFFF or stop > end or (first and (kind != b"IHDR" or length != 13)):
            whole = False
            break
        if zlib.crc32(view[pos + 4 : stop - 4]) != int.from_bytes(view[stop - 4 : stop], "big"):
            whole = False
        if kind == b"IDAT":
            whole = whole and idat != 2
            idat = 1
        elif idat == 1:
            idat = 2
        if kind == b"eXIf" or (
            kind in _PNG_TEXT and bytes(view[pos + 8 : pos + 8 + 22]).startswith(_PNG_ORIENTATION_KEYWORDS)
        ):
            late = late or idat > 0
        elif kind == b"acTL":
            whole = False
        elif kind == b"IEND":
            whole = whole and idat == 2
            break
        first = False
        pos = stop
    # a file not walked to its end may still hide metadata: the caller then loads it and looks
    return PngFacts(whole, late or not whole)


def _normalise_mode_before_resize(im: Image.Image) -> Image.Image:
    """Modes that resize badly or cannot be stored: palette, 1-bit, 16/32-bit, float; and a PNG
    colour key (tRNS on a grey or RGB image), made an alpha channel so JPEG composites it over white."""
    mode = im.mode
    key = im.info.get("transparency")
    if mode == "P" or mode == "PA":
        return im.convert("RGBA" if (key is not None or mode == "PA") else "RGB")
    if mode in ("1", "L", "RGB") and key is not None:
        return im.convert("RGBA" if mode == "RGB" else "LA")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I;16") or mode == "I":
        import numpy as np

        raw = np.asarray(im)
        if mode == "I" and raw.size and int(raw.max()) > 65535:
            arr = raw.astype(np.float64) * (255.0 / float(raw.max()))
        else:
            arr = raw.astype(np.uint32) >> 8
        grey = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        if isinstance(key, int):
            grey.putalpha(Image.fromarray(((raw != key) * 255).astype(np.uint8), "L"))
        return grey
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

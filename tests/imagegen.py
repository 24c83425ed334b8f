"""Test images built in memory from fixed seeds. No binary fixture is committed.

Every helper returns encoded bytes (what the engine reads from disk or HTTP), so a test can
write them anywhere. The colour helpers (`QUADRANTS`, `quadrant_centres`, `assert_quadrants`)
check decoded output by pixel.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image, ImageDraw

ORIENTATION_TAG = 0x0112

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
YELLOW = (255, 255, 0)
MAGENTA = (255, 0, 255)

# The upright test picture: four coloured quadrants, wider than tall so that a missing or
# extra 90° rotation shows up in the size as well as in the pixels.
QUADRANTS = {"tl": RED, "tr": GREEN, "bl": BLUE, "br": YELLOW}
UPRIGHT_SIZE = (64, 48)

# How to store an upright image so that a reader applying EXIF orientation `o` gets it back.
# Orientations 2, 3, 4, 5 (transpose) and 7 (transverse) are their own inverse; 6 and 8
# are inverse to each other.
_STORE_TRANSFORM = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # display applies 90° clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # display applies 90° counter-clockwise
}

# What the *stored* pixels look like per orientation (tl, tr, bl, br), worked out from the
# EXIF 2.3 definitions rather than from Pillow, so the fixtures are checked independently.
STORED_LAYOUT = {
    1: (RED, GREEN, BLUE, YELLOW),
    2: (GREEN, RED, YELLOW, BLUE),
    3: (YELLOW, BLUE, GREEN, RED),
    4: (BLUE, YELLOW, RED, GREEN),
    5: (RED, BLUE, GREEN, YELLOW),
    6: (GREEN, YELLOW, RED, BLUE),
    7: (YELLOW, GREEN, BLUE, RED),
    8: (BLUE, RED, YELLOW, GREEN),
}


def quadrant_image(size: tuple[int, int] = UPRIGHT_SIZE, colours=QUADRANTS, mode: str = "RGB") -> Image.Image:
    """An upright picture with four solid quadrants."""
    w, h = size
    im = Image.new(mode, size)
    draw = ImageDraw.Draw(im)
    hw, hh = w // 2, h // 2
    draw.rectangle((0, 0, hw - 1, hh - 1), fill=colours["tl"])
    draw.rectangle((hw, 0, w - 1, hh - 1), fill=colours["tr"])
    draw.rectangle((0, hh, hw - 1, h - 1), fill=colours["bl"])
    draw.rectangle((hw, hh, w - 1, h - 1), fill=colours["br"])
    return im


def quadrant_centres(size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    w, h = size
    return {
        "tl": (w // 4, h // 4),
        "tr": (3 * w // 4, h // 4),
        "bl": (w // 4, 3 * h // 4),
        "br": (3 * w // 4, 3 * h // 4),
    }


def colour_distance(a, b) -> int:
    return max(abs(int(x) - int(y)) for x, y in zip(a, b))


def assert_quadrants(im: Image.Image, colours=QUADRANTS, tol: int = 40) -> None:
    """Assert the centre of each quadrant of `im` has the expected colour (±tol per channel)."""
    rgb = im.convert("RGB")
    for name, xy in quadrant_centres(rgb.size).items():
        got = rgb.getpixel(xy)
        want = colours[name]
        assert colour_distance(got, want) <= tol, f"quadrant {name} at {xy}: got {got}, want {want}"


def _exif_bytes(orientation: int | None) -> bytes | None:
    if orientation is None:
        return None
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    exif[0x010F] = "engine-tests"  # Make: a second tag, so an EXIF block stays after the tag goes
    return exif.tobytes()


def encode(im: Image.Image, fmt: str, *, orientation: int | None = None, **params) -> bytes:
    buf = io.BytesIO()
    exif = _exif_bytes(orientation)
    if exif is not None:
        params["exif"] = exif
    if fmt == "JPEG":
        params.setdefault("quality", 95)
    im.save(buf, fmt, **params)
    return buf.getvalue()


def stored_for_orientation(upright: Image.Image, orientation: int) -> Image.Image:
    op = _STORE_TRANSFORM[orientation]
    return upright.copy() if op is None else upright.transpose(op)


def oriented(orientation: int, fmt: str = "JPEG", size: tuple[int, int] = UPRIGHT_SIZE) -> bytes:
    """The quadrant picture stored rotated/flipped, with the EXIF tag that restores it."""
    return encode(stored_for_orientation(quadrant_image(size), orientation), fmt, orientation=orientation)


def oriented_heic(orientation: int, size: tuple[int, int] = UPRIGHT_SIZE) -> bytes:
    """``oriented`` as a HEIC file (HEVC in a HEIF container, pillow-heif's encoder): what phones
    save. pillow-heif turns the EXIF orientation into the container's rotation and mirror."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    return encode(
        stored_for_orientation(quadrant_image(size), orientation), "HEIF", orientation=orientation, quality=90
    )


def jpeg(size: tuple[int, int] = UPRIGHT_SIZE, mode: str = "RGB", quality: int = 95) -> bytes:
    """A plain upright quadrant JPEG without EXIF (a pass-through candidate)."""
    im = quadrant_image(size)
    if mode != "RGB":
        im = im.convert(mode)
    return encode(im, "JPEG", quality=quality)


def png(size: tuple[int, int] = UPRIGHT_SIZE, mode: str = "RGB") -> bytes:
    if mode == "RGBA":
        # opaque quadrants except a half-transparent bottom-right: the alpha channel is content
        colours = {k: v + (255,) for k, v in QUADRANTS.items()}
        colours["br"] = YELLOW + (128,)
        im = quadrant_image(size, colours=colours, mode="RGBA")
    else:
        im = quadrant_image(size)
        if mode != "RGB":
            im = im.convert(mode)
    return encode(im, "PNG")


def webp(size: tuple[int, int] = UPRIGHT_SIZE) -> bytes:
    return encode(quadrant_image(size), "WEBP", lossless=True)


CMYK_QUADRANTS = {
    "tl": (0, 255, 255, 0),  # red
    "tr": (255, 0, 255, 0),  # green
    "bl": (255, 255, 0, 0),  # blue
    "br": (0, 0, 255, 0),  # yellow
}


def cmyk_jpeg(size: tuple[int, int] = UPRIGHT_SIZE) -> bytes:
    """A CMYK JPEG whose RGB rendering is the quadrant picture."""
    return encode(quadrant_image(size, colours=CMYK_QUADRANTS, mode="CMYK"), "JPEG")


def palette_png_with_transparency(size: tuple[int, int] = UPRIGHT_SIZE) -> bytes:
    """A palette PNG: the top-left quadrant uses palette entry 0, which is transparent and
    whose hidden RGB value is magenta; the other quadrants are opaque green/blue/yellow."""
    im = Image.new("P", size, 0)
    palette = [*MAGENTA, *RED, *GREEN, *BLUE, *YELLOW] + [0] * (3 * 251)
    im.putpalette(palette)
    draw = ImageDraw.Draw(im)
    w, h = size
    hw, hh = w // 2, h // 2
    draw.rectangle((0, 0, hw - 1, hh - 1), fill=0)
    draw.rectangle((hw, 0, w - 1, hh - 1), fill=2)
    draw.rectangle((0, hh, hw - 1, h - 1), fill=3)
    draw.rectangle((hw, hh, w - 1, h - 1), fill=4)
    return encode(im, "PNG", transparency=0)


# 16-bit grey levels per quadrant, and the 8-bit value each must become (v / 257).
GREY16_LEVELS = {"tl": 0x1000, "tr": 0x4000, "bl": 0x8000, "br": 0xFFFF}
GREY16_AS_8BIT = {k: round(v / 257) for k, v in GREY16_LEVELS.items()}


def grey16_png(size: tuple[int, int] = UPRIGHT_SIZE) -> bytes:
    w, h = size
    values = []
    for y in range(h):
        for x in range(w):
            key = ("t" if y < h // 2 else "b") + ("l" if x < w // 2 else "r")
            values.append(GREY16_LEVELS[key])
    im = Image.frombytes("I;16", size, struct.pack(f"<{w * h}H", *values))
    return encode(im, "PNG")


def noise_jpeg(size: tuple[int, int] = (128, 128), seed: int = 0, quality: int = 90) -> bytes:
    """Seeded RGB noise: big, incompressible JPEG bytes (for truncation and shard sizes)."""
    rng = random.Random(seed)
    im = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    return encode(im, "JPEG", quality=quality)


def truncated_jpeg() -> bytes:
    """A noise JPEG cut in half: the header parses, the scan data ends early."""
    data = noise_jpeg((128, 128), seed=1)
    return data[: len(data) // 2]


def corrupt_jpeg() -> bytes:
    """A JPEG start-of-image marker followed by seeded garbage."""
    return b"\xff\xd8\xff\xe0" + random.Random(2).randbytes(2000)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side × side pixels (400 Mpx at the default) that is only tens of
    kilobytes on disk: a decompression bomb for any pixel limit below side²."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )

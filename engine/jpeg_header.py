"""A JPEG's markers, walked (pure bytes -> facts): the header of a plain JPEG, and where it ends.

Pass-through decides from the header alone whether a file may be kept byte for byte. Pillow's
``Image.open`` answers that too, but it also parses every quantisation and Huffman table, builds
an image object, and parses the EXIF block once for the DPI; for a 150 KB JPEG that was about
a third of the engine's whole per-row cost (profiled: open 23 µs, EXIF 10 µs, of about 110 µs).
This walk reads only what the decision needs: the frame size and component count, the EXIF
block (parsed by Pillow's own ``Exif``, once), and where the scan starts.

A file it keeps must be one Pillow opens, since trainers decode the dataset with Pillow. So it
answers only where it can tell that ``Image.open`` succeeds: it checks what Pillow's header
parser would trip on (short JFIF, Adobe and ICC segments, quantisation tables, frame component
lists), and returns None for anything else: other frame types (lossless, arithmetic, 12-bit),
CMYK, multi-picture files (MPO), Photoshop resource blocks, a second EXIF segment, a segment
running past the end, junk between markers. The caller then opens the file with Pillow as
before, so every unusual file is judged exactly as it was. ``tests/test_jpeg_header.py``
compares the two on mutated files.

``jpeg_end`` is the other half of a pass-through: the proof that the file is whole, by walking it
to its real end-of-image marker through every scan's entropy-coded data (any JPEG, not only
plain ones). A file it cannot vouch for is decoded in full instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_SOF_PLAIN = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive Huffman
# Segments that may come before the scan and that the decision does not need to look inside.
_SKIPPED = frozenset({0xC4, 0xDB, 0xDD, 0xFE} | set(range(0xE0, 0xF0)))


@dataclass(frozen=True, slots=True)
class JpegHeader:
    width: int
    height: int
    mode: str  # "L" or "RGB", as Pillow names one or three components
    exif: bytes | None  # the APP1 payload, "Exif\0\0" included, as Pillow keeps it in info["exif"]
    jfif_dpi: bool  # a JFIF segment gives the DPI, so Pillow does not look for it in the EXIF block
    xmp: bytes | None  # the last XMP packet, as Pillow keeps it in info["xmp"] (it may hold an orientation)
    scan_start: int  # offset of the first byte after the start-of-scan segment


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a plain 8-bit greyscale or colour JPEG, or None (see the module docstring)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    end = len(data)
    pos = 2
    size: tuple[int, int, str] | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    jfif_dpi = False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        body, pos = pos + 4, pos + 2 + length
        if length < 2 or pos > end:
            return None
        if marker == 0xDA:
            return None if size is None else JpegHeader(size[0], size[1], size[2], exif, jfif_dpi, xmp, pos)
        segment = data[body:pos]
        if marker in _SOF_PLAIN:
            if size is not None or length < 8 or (length - 8) % 3 or data[body] != 8:
                return None
            height = (data[body + 1] << 8) | data[body + 2]
            width = (data[body + 3] << 8) | data[body + 4]
            components = data[body + 5]
            if width < 1 or height < 1 or components not in (1, 3):
                return None
            size = (width, height, "L" if components == 1 else "RGB")
        elif marker == 0xDB:
            if not _tables_fit(segment):
                return None
        elif marker == 0xE0 and segment.startswith(b"JFIF"):
            if len(segment) < 7:
                return None
            jfif_dpi = jfif_dpi or (len(segment) >= 12 and segment[7] in (1, 2))
        elif marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            if exif is not None:  # Pillow joins later EXIF segments onto the first
                return None
            exif = segment
        elif marker == 0xE1 and segment.startswith(_XMP):
            xmp = segment.split(b"\x00", 1)[1]
        elif marker == 0xE2 and (
            segment.startswith(b"MPF\x00")  # may be a multi-picture file
            or (segment.startswith(b"ICC_PROFILE\x00") and len(segment) < 14)
        ):
            return None
        elif (marker == 0xED and segment.startswith(b"Photoshop 3.0\x00")) or (
            marker == 0xEE and segment.startswith(b"Adobe") and len(segment) < 7
        ):
            return None
        elif marker not in _SKIPPED:
            return None
    return None


def _tables_fit(segment: bytes) -> bool:
    """Every quantisation table in a DQT segment is complete (64 values of 1 or 2 bytes)."""
    at = 0
    while at < len(segment):
        at += 1 + (64 if segment[at] < 16 else 128)
        if at > len(segment):
            return False
    return True


# The end of a scan's entropy-coded data: a 0xFF that is neither a stuffed zero nor a restart marker.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_SOF_DECODED = frozenset({0xC0, 0xC1, 0xC2})  # the frame types the decision below can vouch for
_MAX_SCANS = 1000  # more is a hostile file, not a photo; it is decoded in full instead
MAX_JPEG_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION: larger frames cannot be decoded or written


def jpeg_end(data: bytes) -> int | None:
    """The offset just after the end-of-image marker that ends the first picture, when the file is
    proven whole up to it; None when it is not (cut short, or a structure libjpeg may refuse).

    It walks every marker segment, then each scan's entropy-coded data to the marker that ends it
    (in that data a 0xFF is always followed by a zero or a restart marker, so an end-of-image marker
    inside an EXIF thumbnail, before the scan, cannot be taken for the real one), then the segments
    and scans after it, to the end-of-image marker. On the way it checks what libjpeg would refuse
    in the headers: table definitions, frame and scan parameters, tables a scan uses. What follows
    the end marker (an MPO's or Ultra HDR file's second picture, a camera's trailer) is not read.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    end = len(data)
    pos = 2
    frame: dict[int, tuple[int, int, int]] | None = None  # component id -> (h, v, quant table)
    progressive = single_scan = False
    quant: set[int] = set()
    huffman: set[tuple[int, int]] = set()
    scans = 0
    while True:
        while pos < end and data[pos] == 0xFF and pos + 1 < end and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos + 2 if scans else None
        if pos + 4 > end:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        body, pos = pos + 4, pos + 2 + length
        if length < 2 or pos > end:
            return None
        if marker in _SOF_DECODED:
            if frame is not None:
                return None
            frame = _frame(data, body, pos)
            if frame is None:
                return None
            progressive = marker == 0xC2
        elif marker == 0xC4:
            if not _huffman_tables(data, body, pos, huffman):
                return None
        elif marker == 0xDB:
            if not _quant_tables(data, body, pos, quant):
                return None
        elif marker == 0xDA:
            if frame is None or single_scan or scans >= _MAX_SCANS:
                return None
            components = _scan(data, body, pos, frame, quant, huffman, progressive)
            if components is None:
                return None
            scans += 1
            # a sequential scan of every component is the only scan: libjpeg expects the end next
            single_scan = not progressive and components == len(frame)
            found = _SCAN_END.search(data, pos)
            if found is None:
                return None
            pos = found.start()
        elif marker == 0xDD:
            if length != 4:
                return None
        elif not (0xE0 <= marker <= 0xEF or marker == 0xFE):
            return None  # other frame types, DNL, reserved markers: left to a full decode


def _frame(data: bytes, body: int, stop: int) -> dict[int, tuple[int, int, int]] | None:
    """The components of an 8-bit frame whose parameters libjpeg accepts, or None."""
    if stop - body < 6 or data[body] != 8:
        return None
    height = (data[body + 1] << 8) | data[body + 2]
    width = (data[body + 3] << 8) | data[body + 4]
    count = data[body + 5]
    if not (1 <= width <= MAX_JPEG_SIDE and 1 <= height <= MAX_JPEG_SIDE) or count not in (1, 3, 4):
        return None
    if stop - body != 6 + 3 * count:
        return None
    frame = {}
    for at in range(body + 6, stop, 3):
        h, v, table = data[at + 1] >> 4, data[at + 1] & 15, data[at + 2]
        if data[at] in frame or not (1 <= h <= 4 and 1 <= v <= 4) or table > 3:
            return None
        frame[data[at]] = (h, v, table)
    max_h = max(h for h, _, _ in frame.values())
    max_v = max(v for _, v, _ in frame.values())
    if any(max_h % h or max_v % v for h, v, _ in frame.values()):  # fractional upsampling
        return None
    return frame


def _huffman_tables(data: bytes, at: int, stop: int, defined: set[tuple[int, int]]) -> bool:
    """Every table in a DHT segment is one libjpeg builds (jdhuff.c's checks)."""
    while at < stop:
        if at + 17 > stop:
            return False
        kind, index = data[at] >> 4, data[at] & 15
        counts = data[at + 1 : at + 17]
        total = sum(counts)
        if kind > 1 or index > 3 or total > 256 or at + 17 + total > stop:
            return False
        symbols = data[at + 17 : at + 17 + total]
        code = 0
        for bits, count in enumerate(counts, 1):
            code += count
            if count and code >= 1 << bits:  # over-subscribed code lengths
                return False
            code <<= 1
        if kind == 0 and any(s > 15 for s in symbols):
            return False
        defined.add((kind, index))
        at += 17 + total
    return True


def _quant_tables(data: bytes, at: int, stop: int, defined: set[int]) -> bool:
    while at < stop:
        precision, index = data[at] >> 4, data[at] & 15
        if precision > 1 or index > 3:
            return False
        at += 1 + (128 if precision else 64)
        if at > stop:
            return False
        defined.add(index)
    return True


def _scan(
    data: bytes,
    body: int,
    stop: int,
    frame: dict[int, tuple[int, int, int]],
    quant: set[int],
    huffman: set[tuple[int, int]],
    progressive: bool,
) -> int | None:
    """The number of components of a start-of-scan header libjpeg accepts, or None."""
    count = data[body] if body < stop else 0
    if not 1 <= count <= 4 or stop - body != 4 + 2 * count:
        return None
    ss, se, ah, al = data[stop - 3], data[stop - 2], data[stop - 1] >> 4, data[stop - 1] & 15
    if progressive:
        dc = ss == 0
        if (
            (dc and se != 0)
            or (not dc and (ss > se or se > 63 or count != 1))
            or (ah and al != ah - 1)
            or al > 13
        ):
            return None
    seen = set()
    blocks = 0
    for at in range(body + 1, stop - 3, 2):
        component = frame.get(data[at])
        if component is None or data[at] in seen:
            return None
        seen.add(data[at])
        h, v, table = component
        blocks += h * v
        dc_table, ac_table = data[at + 1] >> 4, data[at + 1] & 15
        if table not in quant:
            return None
        needs_dc = not progressive or (ss == 0 and ah == 0)
        needs_ac = not progressive or ss > 0
        if (needs_dc and (0, dc_table) not in huffman) or (needs_ac and (1, ac_table) not in huffman):
            return None
    if count > 1 and blocks > 10:  # libjpeg's limit on blocks in an interleaved MCU
        return None
    return count

"""Stream a dataset once and accumulate what ``inspect`` shows and ``check`` judges.

Per image only a few numbers and hashes are kept (sizes for the histograms, hashes for
leakage); the rows themselves are dropped batch by batch, so memory does not grow with the
images' bytes. Images are analysed in a thread pool: Pillow and xxhash release the GIL.

Each distinct stored content (by an xxh3 hash of its bytes) is analysed once: identical bytes
decode to identical pixels, so later copies reuse its facts. Without the perceptual hash, only
the distinct images whose size another distinct image shares are decoded: equal pixels need an
equal size, so any other image can only be an exact duplicate of its byte-identical copies. An
image is decoded as it is read when an earlier distinct image has its size; the first image of
each size that turns out shared is read again and decoded at the end
(``Scanner.decode_first_of_sizes``)."""

from __future__ import annotations

import io
import os
import posixpath
import random
import re
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import xxhash
from PIL import Image

from engine.config import DEFAULT_ATTACHMENT_TOKEN
from engine.imaging import configure_pillow
from engine.inspect.leakage import Leakage, LeakIndex
from engine.inspect.source import (
    FS,
    Dataset,
    Rows,
    iter_file_rows,
    iter_rows,
    load_image_bytes,
    row_count,
)
from engine.jpeg_header import JpegHeader, read_jpeg_header

MAX_EXAMPLES = 20  # rows named per problem kind
IMAGE_PART = '{"type": "image"}'  # the messages layout's attachment: a content part, not a token
MAX_DISTINCT = 5000  # distinct string values counted per property; later new ones count as "other"
MAX_NUMBERS = 100_000  # numbers kept per property for its histogram (a seeded reservoir beyond)
THUMB_PX = 192
# formats a training set holds; others (DDS, PSD, ...) are findings, and some hang Pillow-SIMD (FORMATS.md §6)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "MPO")
HEADER_BYTES = (1 << 12, 1 << 16)  # a JPEG's markers up to the scan fit in these, unless its EXIF/ICC is huge
MISSING = "image bytes missing (or the file is not found)"


@dataclass(frozen=True, slots=True)
class ImageFacts:
    format: str | None
    width: int
    height: int
    num_bytes: int
    exact: bytes  # xxh3-128 of the decoded pixels (decode) or of the stored bytes
    phash: int | None
    orientation: int  # EXIF Orientation still in the file (1: none)
    error: str | None


def analyse_image(data: bytes | None, *, decode: bool, phash: bool) -> ImageFacts:
    """Facts about one encoded image; never raises."""
    if data is None:
        return ImageFacts(None, 0, 0, 0, b"missing", None, 1, MISSING)
    if not decode:
        header = _jpeg_header(data)
        if header is not None:
            orient = stored_orientation(header.exif, getattr(header, "xmp", None))
            return ImageFacts(
                "JPEG",
                header.width,
                header.height,
                len(data),
                xxhash.xxh3_128_digest(data),
                None,
                orient,
                None,
            )
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        fmt, (width, height) = im.format, im.size
        orient = stored_orientation(im.info.get("exif"), im.info.get("xmp"))
        if not decode:
            return ImageFacts(fmt, width, height, len(data), xxhash.xxh3_128_digest(data), None, orient, None)
        im.load()
        digest = xxhash.xxh3_128()
        digest.update(f"{im.mode}:{width}x{height}:".encode())
        digest.update(im.tobytes())
        return ImageFacts(
            fmt,
            width,
            height,
            len(data),
            digest.digest(),
            perceptual_hash(im) if phash else None,
            orient,
            None,
        )
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a finding, not a crash
        return ImageFacts(
            None,
            0,
            0,
            len(data),
            xxhash.xxh3_128_digest(data),
            None,
            1,
            f"does not decode: {type(exc).__name__}: {exc}",
        )


def perceptual_hash(im: Image.Image) -> int:
    """``imagehash.phash`` as a 64-bit int, after a cheap box-filter reduction to >= 128 px (pHash
    resizes to 32x32 anyway; bench/GAP.md, "Perceptual hash")."""
    import imagehash

    small = im if im.mode in ("L", "RGB", "RGBA") else im.convert("L")
    factor = max(1, min(im.size) // 128)
    return int(str(imagehash.phash(small.reduce(factor) if factor > 1 else small)), 16)


def _jpeg_header(data) -> JpegHeader | None:
    """A plain JPEG's header from a short copy of its first bytes: 5 us instead of Pillow's 55."""
    if bytes(data[:3]) != b"\xff\xd8\xff":
        return None
    for size in HEADER_BYTES:  # the walk stops (None) at a segment running past the copy's end
        header = read_jpeg_header(bytes(data[:size]))
        if header is not None or len(data) <= size:
            return header
    return None


_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)([0-9])')  # as ImageOps.exif_transpose reads it


def stored_orientation(exif: bytes | None, xmp: bytes | str | None) -> int:
    """The orientation a reader would still apply (1: none), from the EXIF block, else XMP.
    Most EXIF blocks hold no Orientation tag (0x0112, in either byte order) and are not parsed:
    that costs 50 us."""
    if isinstance(exif, bytes) and (b"\x01\x12" in exif or b"\x12\x01" in exif):
        try:
            value = Image.Exif()
            value.load(exif)
            found = int(value.get(0x0112, 1) or 1)
            if found != 1:
                return found
        except Exception:  # noqa: BLE001 - a corrupt EXIF block holds no usable orientation
            pass
    if xmp:
        m = _XMP_ORIENTATION.search(xmp.encode() if isinstance(xmp, str) else xmp)
        if m and m.group(1) != b"1":
            return int(m.group(1))
    return 1


@dataclass
class PropertyStats:
    present: int = 0
    null: int = 0
    empty: int = 0
    kinds: Counter = field(default_factory=Counter)
    values: Counter = field(default_factory=Counter)
    other_values: int = 0
    numbers: list[float] = field(default_factory=list)
    num_numbers: int = 0


@dataclass
class SplitStats:
    num_rows: int = 0
    num_images: int = 0
    image_bytes: int = 0
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # location -> rows, bytes


@dataclass
class Sample:
    split: str
    key: str
    image: bytes | None
    output: str | None
    conversation: list[dict[str, Any]] | None
    thumbnail: bytes | None = None  # JPEG, filled in at the end


@dataclass
class ScanResult:
    dataset: Dataset
    decoded: bool
    splits: dict[str, SplitStats]
    formats: Counter
    widths: array
    heights: array
    sizes: array
    num_rotated: int  # images still carrying an EXIF orientation other than 1
    rotated: list[str]
    undecodable: list[tuple[str, str]]  # (row, reason)
    num_undecodable: int
    num_outputs: int
    invalid_outputs: list[tuple[str, str]]
    num_invalid_outputs: int
    properties: dict[str, PropertyStats]
    token_mismatches: list[tuple[str, str]]
    num_token_mismatches: int
    samples: list[Sample]
    leakage: Leakage
    schema: dict[str, Any] | None
    attachment_token: str | None
    num_distinct: int = 0  # distinct stored images that open (identical bytes count once)
    num_decoded: int = 0  # of those, how many were decoded (the rest: a size of their own, no copy)


class Scanner:
    """Accumulates one dataset's statistics; feed it ``Rows`` in order, then call ``result``."""

    def __init__(
        self,
        ds: Dataset,
        fs: FS,
        *,
        decode: bool = True,
        phash: bool = True,
        samples: int = 12,
        seed: int = 0,
        workers: int | None = None,
        decode_unique_sizes: bool = False,
    ):
        self.ds, self.fs, self.decode, self.phash = ds, fs, decode, phash and decode
        # the pHash needs every image's pixels (so does check's "the images decode"); exact
        # duplicates alone need only the images whose size another image has (module docstring)
        self.two_pass = decode and not self.phash and not decode_unique_sizes
        self.num_samples = samples
        self.rng = random.Random(seed)
        workers = workers or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inspect")
        # Pillow frees each image's pixel buffer to the OS and maps the next one afresh: 1,900 page
        # faults a 1024 px image, 2-3x the decode itself here (bench/GAP.md); keep a few blocks per thread
        Image.core.set_blocks_max(max(Image.core.get_blocks_max(), 4 * workers))
        self.splits: dict[str, SplitStats] = {}
        self.formats: Counter = Counter()
        self.widths, self.heights, self.sizes = array("I"), array("I"), array("Q")
        self.num_rotated, self.rotated = 0, []
        self.undecodable: list[tuple[str, str]] = []
        self.num_undecodable = 0
        self.num_outputs = 0
        self.invalid_outputs: list[tuple[str, str]] = []
        self.num_invalid_outputs = 0
        self.token_mismatches: list[tuple[str, str]] = []
        self.num_token_mismatches = 0
        self.properties: dict[str, PropertyStats] = defaultdict(PropertyStats)
        self.samples: list[Sample] = []
        self.num_seen = 0
        self.leaks = LeakIndex(exact_by="pixels" if decode else "bytes")
        # per distinct stored content: its facts, in arrays (a few dozen bytes each)
        self._contents: dict[int, int] = {}  # xxh3-128 of the stored bytes -> content
        self._format_codes: dict[str | None, int] = {}
        self._format_names: list[str] = []
        self._c_format, self._c_rotated = array("B"), array("B")
        self._c_width, self._c_height = array("I"), array("I")
        self._c_group = array("q")  # its exact-duplicate group; -1: it does not decode
        self._c_errors: dict[int, str] = {}
        # two-pass: size -> (first content of it, its file, row, image), or None once it is shared
        self._sizes: dict[tuple[int, int], tuple[int, int, int, int] | None] = {}
        self._reread: list[tuple[int, int, int, int]] = []  # first contents of shared sizes, to decode
        self._file_index = {f.location: n for n, f in enumerate(ds.files)}
        self.num_decoded = self.num_unopened = 0
        self.schema, self.validator = self._schema()
        self.token = (
            IMAGE_PART
            if ds.variant == "messages"
            else self._attachment_token()
            if ds.layout == "arrow"
            else None
        )

    def _schema(self):
        cfg = self.ds.config
        schema = cfg.get("json_schema") if isinstance(cfg, dict) else None
        if not isinstance(schema, dict):
            return None, None
        from engine.validate import check_schema, validator_for

        if check_schema(schema) is not None:
            return schema, None
        return schema, validator_for(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode())

    def _attachment_token(self) -> str:
        options = (self.ds.stats or {}).get("options") or {}
        return options.get("attachment_token") or DEFAULT_ATTACHMENT_TOKEN

    def add(self, rows: Rows) -> None:
        split = self.splits.setdefault(rows.split, SplitStats())
        n = len(rows.image_ids)
        keys = [self._key(rows, i) for i in range(n)]
        payloads = [(i, j, data, path) for i in range(n) for j, (data, path) in enumerate(rows.images[i])]
        split_dir = posixpath.dirname(rows.file)
        base = self.ds.root

        def load(item):
            return load_image_bytes(item[2], item[3], base, split_dir, self.fs)

        # embedded bytes are views of the row group; only files to read are worth threads
        reads = any(data is None and path for _, _, data, path in payloads)
        blobs = list(self.pool.map(load, payloads) if reads else map(load, payloads))
        contents = self._contents_of(rows, payloads, blobs)
        per_row: dict[int, list[tuple[int, bytes | None]]] = defaultdict(list)
        for (i, _, _, _), content, blob in zip(payloads, contents, blobs):
            per_row[i].append((content, blob))
        f = split.files.setdefault(rows.file, {"num_rows": 0, "image_bytes": 0})
        f["num_rows"] += n
        split.num_rows += n
        for i in range(n):
            key = keys[i]
            if rows.image_ids[i] is not None:
                self.leaks.add_id(rows.split, rows.image_ids[i])
            for content, blob in per_row.get(i, []):
                self._add_image(rows.split, key, content, 0 if blob is None else len(blob), split, f)
            if rows.outputs[i] is not None or rows.conversations is None:
                self._add_output(key, rows.outputs[i])
            if rows.image_parts is not None:
                self._check_image_parts(key, rows.image_parts[i], len(rows.images[i]))
            elif rows.conversations is not None:
                self._check_tokens(key, rows.conversations[i], len(rows.images[i]))
            self._offer_sample(rows, i, key, per_row.get(i))

    def _contents_of(self, rows: Rows, payloads, blobs) -> list[int]:
        """The content of each image (-1: no bytes), analysing each content not seen before once."""
        digests = [None if b is None else xxhash.xxh3_128_intdigest(b) for b in blobs]
        new: dict[int, int] = {}  # digest -> its first payload in this batch
        for k, d in enumerate(digests):
            if d is not None and d not in self._contents and d not in new:
                new[d] = k
        decoding = self.decode and not self.two_pass

        def facts(k: int) -> ImageFacts:
            return analyse_image(blobs[k], decode=decoding, phash=self.phash)

        # decoding is worth threads (Pillow releases the GIL); a header read is cheaper than a future
        found = list(self.pool.map(facts, new.values()) if decoding else map(facts, new.values()))
        pixels: list[ImageFacts | None] = [None] * len(found)
        if self.two_pass:
            first = [(rows.start + payloads[k][0], payloads[k][1]) for k in new.values()]
            shared = self._shared_sizes(found, self._file_index.get(rows.file, 0), first)
            todo = [blobs[k] for n, k in enumerate(new.values()) if n in shared]
            for n, im in zip(sorted(shared), self.pool.map(self._pixels, todo)):
                pixels[n] = im
        for d, im, px in zip(new, found, pixels):
            self._contents[d] = self._new_content(im, decoding, px)
        return [-1 if d is None else self._contents[d] for d in digests]

    def _shared_sizes(self, found: list[ImageFacts], file: int, places: list[tuple[int, int]]) -> set[int]:
        """Which of these new contents have the size of an earlier distinct content (decoded now);
        the first content of a size is remembered with its place, and read again at the end once
        the size turns out shared."""
        shared = set()
        base = len(self._c_group)  # the contents about to be made, in this order
        for n, im in enumerate(found):
            if im.error:
                continue
            size = (im.width, im.height)
            if size not in self._sizes:
                self._sizes[size] = (base + n, file, *places[n])
                continue
            first = self._sizes[size]
            if first is not None:
                self._reread.append(first)
                self._sizes[size] = None
            shared.add(n)
        return shared

    @staticmethod
    def _pixels(blob) -> ImageFacts:
        return analyse_image(blob, decode=True, phash=False)

    def _new_content(self, im: ImageFacts, decoded: bool, pixels: ImageFacts | None) -> int:
        content = len(self._c_group)
        code = self._format_codes.get(im.format)
        if code is None:
            code = self._format_codes[im.format] = len(self._format_names)
            self._format_names.append(im.format or "unknown")
        self._c_format.append(code)
        self._c_rotated.append(im.orientation != 1)
        self._c_width.append(im.width)
        self._c_height.append(im.height)
        error = im.error or (pixels.error if pixels is not None else None)
        if error:
            self._c_errors[content] = error
            self._c_group.append(-1)
            self.num_unopened += not decoded and pixels is None
        else:
            group = self.leaks.group_for(im.exact, im.phash)
            # two-pass: groups are keyed by the stored bytes; a decoded one joins its pixels' group
            self._c_group.append(group if pixels is None else self.leaks.join(pixels.exact, group))
        self.num_decoded += decoded or pixels is not None
        return content

    def _key(self, rows: Rows, i: int) -> str:
        image_id = rows.image_ids[i]
        return (
            image_id
            if image_id is not None
            else f"{rows.split}[{posixpath.basename(rows.file)}:{rows.start + i}]"
        )

    def _add_image(
        self, split_name: str, key: str, content: int, num_bytes: int, split: SplitStats, f: dict[str, int]
    ) -> None:
        split.num_images += 1
        split.image_bytes += num_bytes
        f["image_bytes"] += num_bytes
        error = MISSING if content < 0 else self._c_errors.get(content)
        if error:
            self.num_undecodable += 1
            if len(self.undecodable) < MAX_EXAMPLES:
                self.undecodable.append((f"{split_name}/{key}", error))
            self.formats["undecodable"] += 1
            return
        self.formats[self._format_name(content)] += 1
        self.widths.append(self._c_width[content])
        self.heights.append(self._c_height[content])
        self.sizes.append(num_bytes)
        if self._c_rotated[content]:
            self.num_rotated += 1
            if len(self.rotated) < MAX_EXAMPLES:
                self.rotated.append(f"{split_name}/{key}")
        self.leaks.add_member(self._c_group[content], split_name, key)

    def _format_name(self, content: int) -> str:
        return self._format_names[self._c_format[content]]

    def decode_first_of_sizes(self) -> None:
        """The second pass: read again and decode the first content of each size that a later
        distinct content turned out to share (the later ones were decoded as they came), and
        merge its byte-hash group into the group of its pixels. A content of a size no other has
        is decoded too where it has byte copies: a full decode would not group them if it failed."""
        wanted: dict[int, dict[tuple[int, int], int]] = defaultdict(dict)  # file -> (row, image) -> content
        copied = [
            w for w in self._sizes.values() if w is not None and self.leaks.has_copies(self._c_group[w[0]])
        ]
        for content, index, row, image in self._reread + copied:
            wanted[index][(row, image)] = content
        for index, in_file in sorted(wanted.items()):
            rows_needed = {r for r, _ in in_file}
            for rows in iter_file_rows(self.ds.files[index], self.fs, rows_needed):
                split_dir = posixpath.dirname(rows.file)
                items = [
                    (c, data, path)
                    for i, images in enumerate(rows.images)
                    for j, (data, path) in enumerate(images)
                    if (c := in_file.get((rows.start + i, j))) is not None
                ]

                def pixels(item, split_dir=split_dir):
                    return self._pixels(load_image_bytes(item[1], item[2], self.ds.root, split_dir, self.fs))

                for (c, _, _), im in zip(items, self.pool.map(pixels, items)):
                    self.num_decoded += 1
                    if im.error:
                        self._fails_to_decode(c, self._c_group[c], im.error)
                    else:
                        self._c_group[c] = self.leaks.join(im.exact, self._c_group[c])

    def _fails_to_decode(self, content: int, group: int, error: str) -> None:
        """A content whose header opened but whose pixels do not decode: its rows move from the
        images to the undecodable ones (the size histograms keep them)."""
        rows = self.leaks.drop(group)
        named = [f"{s}/{k}" for s, k in rows]
        self._c_group[content] = -1
        self._c_errors[content] = error
        self.num_undecodable += len(rows)
        self.undecodable += [(r, error) for r in named][: max(0, MAX_EXAMPLES - len(self.undecodable))]
        fmt = self._format_name(content)
        self.formats[fmt] -= len(rows)
        if self.formats[fmt] <= 0:
            del self.formats[fmt]
        self.formats["undecodable"] += len(rows)
        if self._c_rotated[content]:
            self.num_rotated -= len(rows)
            self.rotated = [r for r in self.rotated if r not in set(named)]

    def _add_output(self, key: str, output: str | None) -> None:
        self.num_outputs += 1
        value: Any = None
        if output is not None:
            try:
                value = orjson.loads(output)
            except orjson.JSONDecodeError:
                value = None
        if self.validator is not None:
            verdict = self.validator.check(output if value is None else value)  # parsed once
            if verdict.reason is not None:
                self.num_invalid_outputs += 1
                if len(self.invalid_outputs) < MAX_EXAMPLES:
                    self.invalid_outputs.append((key, verdict.reason))
        names = list((self.schema or {}).get("properties") or {})
        if isinstance(value, dict):
            names += [k for k in value if k not in names]
        for name in names:
            self._add_property(name, value.get(name, _ABSENT) if isinstance(value, dict) else _ABSENT)

    def _add_property(self, name: str, value: Any) -> None:
        p = self.properties[name]
        if value is _ABSENT:
            return
        p.present += 1
        if value is None:
            p.null += 1
            return
        if value in ("", [], {}):
            p.empty += 1
        kind = type(value).__name__
        p.kinds[kind] += 1
        if isinstance(value, bool) or isinstance(value, str):
            text = str(value).lower() if isinstance(value, bool) else value
            if text in p.values or len(p.values) < MAX_DISTINCT:
                p.values[text[:200]] += 1
            else:
                p.other_values += 1
        elif isinstance(value, (int, float)):
            p.num_numbers += 1
            if len(p.numbers) < MAX_NUMBERS:
                p.numbers.append(float(value))
            else:  # reservoir: every number has the same chance to be in the histogram
                j = self.rng.randrange(p.num_numbers)
                if j < MAX_NUMBERS:
                    p.numbers[j] = float(value)

    def _check_tokens(self, key: str, conversation: list[dict[str, Any]] | None, num_images: int) -> None:
        text = "".join(str(t.get("content") or "") for t in conversation or [])
        found = text.count(self.token) if self.token else 0
        if found != num_images:
            self.num_token_mismatches += 1
            if len(self.token_mismatches) < MAX_EXAMPLES:
                self.token_mismatches.append(
                    (key, f"{found} attachment token(s) {self.token!r} for {num_images} image(s)")
                )

    def _check_image_parts(self, key: str, indexes: list[int | None], num_images: int) -> None:
        given = [i for i in indexes if i is not None]  # a part without an index takes the next image
        if len(indexes) != num_images:
            reason = f"{len(indexes)} image part(s) for {num_images} image(s)"
        elif len(set(given)) != len(given) or any(not 0 <= i < num_images for i in given):
            reason = f"image part indexes {given} do not each name one of the {num_images} image(s)"
        else:
            return
        self.num_token_mismatches += 1
        if len(self.token_mismatches) < MAX_EXAMPLES:
            self.token_mismatches.append((key, reason))

    def _offer_sample(self, rows: Rows, i: int, key: str, images) -> None:
        """Reservoir sampling (algorithm R) with a seeded generator: the same rows every run."""
        self.num_seen += 1
        if self.num_samples <= 0:
            return
        if len(self.samples) < self.num_samples:
            slot = len(self.samples)
        else:
            slot = self.rng.randrange(self.num_seen)
            if slot >= self.num_samples:
                return
        blob = (
            bytes(images[0][1]) if images and images[0][1] is not None else None
        )  # a copy: not the row group
        sample = Sample(
            rows.split,
            key,
            blob,
            rows.outputs[i],
            rows.conversations[i] if rows.conversations is not None else None,
        )
        if slot == len(self.samples):
            self.samples.append(sample)
        else:
            self.samples[slot] = sample

    def result(self) -> ScanResult:
        if self.two_pass:
            self.decode_first_of_sizes()
        self.pool.shutdown()
        for s in self.samples:
            s.thumbnail = thumbnail(s.image)
            s.image = None
        return ScanResult(
            dataset=self.ds,
            decoded=self.decode,
            splits=self.splits,
            formats=self.formats,
            widths=self.widths,
            heights=self.heights,
            sizes=self.sizes,
            num_rotated=self.num_rotated,
            rotated=self.rotated,
            undecodable=self.undecodable,
            num_undecodable=self.num_undecodable,
            num_outputs=self.num_outputs,
            invalid_outputs=self.invalid_outputs,
            num_invalid_outputs=self.num_invalid_outputs,
            properties=dict(self.properties),
            token_mismatches=self.token_mismatches,
            num_token_mismatches=self.num_token_mismatches,
            samples=self.samples,
            leakage=self.leaks.result(),
            schema=self.schema,
            attachment_token=self.token,
            num_distinct=len(self._contents) - self.num_unopened,
            num_decoded=self.num_decoded,
        )


_ABSENT = object()


def thumbnail(data: bytes | None) -> bytes | None:
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            im.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            out = io.BytesIO()
            im.save(out, "JPEG", quality=80)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - an undecodable sample shows as a placeholder
        return None


def scan(
    ds: Dataset,
    fs: FS,
    *,
    decode: bool = True,
    phash: bool = True,
    samples: int = 12,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    start: Callable[[int | None], None] | None = None,
    decode_unique_sizes: bool = False,
) -> ScanResult:
    """Read every row once (and, without the pHash, the images that need decoding once more) and
    return the accumulated statistics."""
    configure_pillow()
    scanner = Scanner(
        ds,
        fs,
        decode=decode,
        phash=phash,
        samples=samples,
        seed=seed,
        decode_unique_sizes=decode_unique_sizes,
    )
    if start is not None:
        start(row_count(ds, fs))
    for rows in iter_rows(ds, fs):
        scanner.add(rows)
        if progress is not None:
            progress(len(rows.image_ids))
    return scanner.result()

"""Deterministic benchmark corpora, cached under ``<workdir>/corpora/<name>-<n>/``.

Each corpus folder holds:

- ``images/``        the image files;
- ``manifest.jsonl`` labelr-style rows (``image_id``, ``image_path``, ``output``, ``barcode``);
- ``config.json``    the task configuration (instructions + JSON schema matching ``output``);
- ``trainer.jsonl``  the same samples in the packed trainer's conversation style;
- ``corpus.json``    what the checks need: counts, input bytes and, per ``image_id``, the
  upright size of the image (``null`` for a file that is deliberately broken).

Big images are slow to synthesise, so a few distinct base images are drawn from a fixed seed
and every file is derived from one of them cheaply: a different EXIF orientation tag (set with
``Image.Exif`` and ``save(exif=...)``) and a per-file comment segment (JPEG COM / PNG tEXt), so
that no two files are byte-identical.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

log = logging.getLogger(__name__)

CORPUS_NAMES = ("photos", "small", "mixed", "tiny", "distinct")
ORIENTATION_TAG = 0x0112
PLACEHOLDER = "<|reserved_special_token_0|>"
INSTRUCTIONS = (
    "Extract the product name, the price and the currency from this price tag. Answer with a JSON object."
)
JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "product_name": {"type": "string"},
        "price": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
    },
    "required": ["product_name", "price", "currency"],
    "additionalProperties": False,
}
_WORDS = (
    "organic",
    "milk",
    "dark",
    "chocolate",
    "olive",
    "oil",
    "pasta",
    "rice",
    "coffee",
    "tea",
    "honey",
    "butter",
    "yogurt",
    "bread",
    "apple",
    "juice",
    "salted",
    "crackers",
)


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """A generated corpus on disk."""

    name: str
    root: Path
    num_rows: int
    num_valid: int
    input_bytes: int
    upright_sizes: dict[str, list[int] | None]

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def trainer(self) -> Path:
        return self.root / "trainer.jsonl"

    def summary(self) -> dict:
        return {
            "name": self.name,
            "root": str(self.root),
            "num_rows": self.num_rows,
            "num_valid": self.num_valid,
            "input_bytes": self.input_bytes,
        }


# --------------------------------------------------------------------------- drawing


def draw_scene(
    rng: np.random.Generator, width: int, height: int, *, noise_sigma: float, flat: bool = False
) -> Image.Image:
    """A price-tag-like scene: soft gradient, shapes, text lines and mild sensor noise."""
    c0, c1 = rng.integers(30, 226, size=(2, 3))
    gx, gy = rng.uniform(-1, 1, size=2)
    lw, lh = max(2, width // 16), max(2, height // 16)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    t = gx * xx / lw + gy * yy / lh
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    small = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    img = Image.fromarray(small.astype(np.uint8), "RGB").resize((width, height), Image.BICUBIC)

    draw = ImageDraw.Draw(img)
    scale = max(width, height)
    for _ in range(int(rng.integers(12, 24))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(scale // 30, scale // 5, size=2)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 3))
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        if kind == 0:
            draw.rectangle(box, fill=colour, outline=(0, 0, 0), width=max(1, scale // 800))
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            pts = [(int(x0 + rng.integers(0, w)), int(y0 + rng.integers(0, h))) for _ in range(5)]
            draw.polygon(pts, fill=colour)
    # A "price tag" with several lines of text.
    tag_w, tag_h = int(width * 0.6), int(height * 0.35)
    tx, ty = int(rng.integers(0, width - tag_w)), int(rng.integers(0, height - tag_h))
    draw.rounded_rectangle(
        [tx, ty, tx + tag_w, ty + tag_h],
        radius=scale // 80,
        fill=(250, 250, 245),
        outline=(200, 20, 20),
        width=max(2, scale // 400),
    )
    font_size = max(10, tag_h // 7)
    font = ImageFont.load_default(size=font_size)
    for line in range(5):
        words = " ".join(str(w) for w in rng.choice(_WORDS, size=3))
        text = f"{words.upper()}  {rng.integers(1, 99)},{rng.integers(0, 99):02d} EUR"
        draw.text(
            (tx + font_size // 2, ty + font_size // 2 + line * int(font_size * 1.25)),
            text,
            fill=(20, 20, 20),
            font=font,
        )
    if not flat:
        img = img.filter(ImageFilter.GaussianBlur(radius=max(1, scale // 1500)))
    if noise_sigma > 0:
        noise = np.asarray(Image.effect_noise((width, height), noise_sigma), dtype=np.int16) - 128
        arr = np.asarray(img, dtype=np.int16) + noise[..., None]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


def encode(img: Image.Image, fmt: str, *, orientation: int = 1, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x010F] = "BenchCam"  # Make: every photo carries some EXIF
        if orientation != 1:
            exif[ORIENTATION_TAG] = orientation
        img.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def tag_unique(data: bytes, tag: str) -> bytes:
    """Return ``data`` with a comment segment naming ``tag``; pixels are unchanged."""
    payload = tag.encode()
    if data[:2] == b"\xff\xd8":  # JPEG: COM segment right after SOI
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: tEXt chunk right after IHDR
        ihdr_end = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4
        body = b"Comment\x00" + payload
        chunk = (
            struct.pack(">I", len(body))
            + b"tEXt"
            + body
            + struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)
        )
        return data[:ihdr_end] + chunk + data[ihdr_end:]
    return data + b"\n" + payload


def upright_size(size: tuple[int, int], orientation: int) -> list[int]:
    w, h = size
    return [h, w] if orientation in (5, 6, 7, 8) else [w, h]


# --------------------------------------------------------------------------- corpora


def _photo_bases(rng: np.random.Generator, count: int) -> list[tuple[Image.Image, int]]:
    bases = []
    for i in range(count):
        size = (4000, 3000) if i % 2 == 0 else (3000, 4000)
        bases.append(draw_scene(rng, *size, noise_sigma=float(rng.uniform(2.6, 4.2))))
        log.info("photos: base %d/%d drawn", i + 1, count)
    return bases


def _build_photos(n: int, rng: np.random.Generator):
    """Phone-like 12 MP JPEG q90, ~40% with EXIF orientation 3, 6 or 8."""
    bases = _photo_bases(rng, min(16, n))
    encoded: dict[tuple[int, int], bytes] = {}
    for i in range(n):
        b = i % len(bases)
        orientation = int(rng.choice([3, 6, 8])) if rng.random() < 0.4 else 1
        key = (b, orientation)
        if key not in encoded:
            encoded[key] = encode(bases[b], "JPEG", orientation=orientation)
        yield (
            f"img{i:06d}.jpg",
            tag_unique(encoded[key], f"photos-{i}"),
            upright_size(bases[b].size, orientation),
        )


def _build_small(n: int, rng: np.random.Generator):
    """Upright 1024 px JPEG q90 (~150 KB), no orientation tag: the pass-through case."""
    bases = [
        draw_scene(rng, *((1024, 768) if i % 2 == 0 else (768, 1024)), noise_sigma=2.5)
        for i in range(min(64, n))
    ]
    encoded = [encode(b, "JPEG") for b in bases]
    for i in range(n):
        b = i % len(bases)
        yield f"img{i:06d}.jpg", tag_unique(encoded[b], f"small-{i}"), list(bases[b].size)


def _build_mixed(n: int, rng: np.random.Generator):
    """PNG RGB / RGBA / palette, rotated JPEG, and every 12th file broken."""
    variants = []
    for i in range(min(24, max(n, 4))):
        kind = ("png-rgb", "png-rgba", "png-palette", "jpeg-rot6")[i % 4]
        size = (1600, 1200) if i % 3 else (900, 1400)
        img = draw_scene(rng, *size, noise_sigma=0.0 if kind != "jpeg-rot6" else 4.0, flat=True)
        if kind == "png-rgba":
            alpha = Image.linear_gradient("L").resize(size)
            img.putalpha(alpha)
            data, upright = encode(img, "PNG"), list(size)
        elif kind == "png-palette":
            data, upright = encode(img.quantize(64), "PNG"), list(size)
        elif kind == "jpeg-rot6":
            data, upright = encode(img, "JPEG", orientation=6), upright_size(size, 6)
        else:
            data, upright = encode(img, "PNG"), list(size)
        variants.append((kind, data, upright))
    for i in range(n):
        kind, data, upright = variants[i % len(variants)]
        ext = "jpg" if kind.startswith("jpeg") else "png"
        if i % 12 == 11:
            broken = i // 12 % 3
            if broken == 0:  # JPEG cut inside its headers: no decoder gets any pixels
                yield f"bad{i:06d}.jpg", encode(draw_scene(rng, 64, 64, noise_sigma=0), "JPEG")[:200], None
            elif broken == 1:  # PNG cut in the middle of its pixel data
                yield f"bad{i:06d}.png", data[: len(data) // 2], None
            else:  # not an image at all
                yield f"bad{i:06d}.jpg", b"this is not an image\n" * 10, None
            continue
        yield f"img{i:06d}.{ext}", tag_unique(data, f"mixed-{i}"), upright


def _build_tiny(n: int, rng: np.random.Generator):
    """Upright 32x24 JPEGs (~1 KB): pass-through rows whose cost is all per-row overhead, for
    driver-memory runs at a million rows."""
    bases = [draw_scene(rng, 32, 24, noise_sigma=2.5) for _ in range(min(16, n))]
    encoded = [encode(b, "JPEG") for b in bases]
    for i in range(n):
        yield f"img{i:06d}.jpg", encoded[i % len(bases)], [32, 24]


def _build_distinct(n: int, rng: np.random.Generator):
    """Upright 1024x768 JPEG q90, each a different picture (a seeded noise patch on one of 64
    scenes): no two images share their pixels, all share their size (inspect's decode-bound case)."""
    bases = [draw_scene(rng, 1024, 768, noise_sigma=2.5) for _ in range(min(64, n))]
    for i in range(n):
        img = bases[i % len(bases)].copy()
        patch = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        img.paste(Image.fromarray(patch, "RGB"), (int(rng.integers(0, 992)), int(rng.integers(0, 736))))
        yield f"img{i:06d}.jpg", encode(img, "JPEG"), [1024, 768]


_BUILDERS = {
    "photos": _build_photos,
    "small": _build_small,
    "mixed": _build_mixed,
    "tiny": _build_tiny,
    "distinct": _build_distinct,
}


def _output_for(rng: np.random.Generator) -> dict:
    return {
        "product_name": " ".join(str(w) for w in rng.choice(_WORDS, size=2)),
        "price": round(float(rng.uniform(0.5, 30.0)), 2),
        "currency": str(rng.choice(["EUR", "USD", "GBP"])),
    }


def write_config(path: Path) -> None:
    path.write_text(json.dumps({"instructions": INSTRUCTIONS, "json_schema": JSON_SCHEMA}, indent=2) + "\n")


def _trainer_row(rel_path: str, output: dict) -> dict:
    return {
        "conversations": [
            {"role": "user", "content": f"{INSTRUCTIONS} {PLACEHOLDER}"},
            {"role": "assistant", "content": json.dumps(output, separators=(",", ":"))},
        ],
        "modalities": [{"type": "image", "value": rel_path}],
    }


def build_corpus(name: str, n: int, workdir: Path, *, seed: int = 1234) -> Corpus:
    """Return the corpus ``name`` with ``n`` rows, generating it on first use."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown corpus {name!r}; choose from {', '.join(CORPUS_NAMES)}")
    root = Path(workdir) / "corpora" / f"{name}-{n}"
    meta_path = root / "corpus.json"
    if meta_path.exists():
        return _load(meta_path)

    log.info("generating corpus %s with %d rows under %s", name, n, root)
    tmp = root.with_name(root.name + ".tmp")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, CORPUS_NAMES.index(name), n])
    label_rng = np.random.default_rng([seed, 99, n])
    upright: dict[str, list[int] | None] = {}
    input_bytes = 0
    with open(tmp / "manifest.jsonl", "w") as manifest, open(tmp / "trainer.jsonl", "w") as trainer:
        for i, (file_name, data, size) in enumerate(_BUILDERS[name](n, rng)):
            rel = f"images/{file_name}"
            (tmp / rel).write_bytes(data)
            input_bytes += len(data)
            barcode = f"{3000000000000 + i * 7919:013d}"
            image_id = f"{barcode}_{i % 9 + 1}"
            output = _output_for(label_rng)
            upright[image_id] = size
            manifest.write(
                json.dumps({"image_id": image_id, "image_path": rel, "output": output, "barcode": barcode})
                + "\n"
            )
            trainer.write(json.dumps(_trainer_row(rel, output)) + "\n")
    write_config(tmp / "config.json")
    meta = {
        "name": name,
        "num_rows": n,
        "num_valid": sum(v is not None for v in upright.values()),
        "input_bytes": input_bytes,
        "seed": seed,
        "upright_sizes": upright,
    }
    (tmp / "corpus.json").write_text(json.dumps(meta))
    if root.exists():
        import shutil

        shutil.rmtree(root)
    tmp.rename(root)
    log.info("corpus %s-%d: %d files, %.1f MB", name, n, n, input_bytes / 1e6)
    return _load(meta_path)


def _load(meta_path: Path) -> Corpus:
    meta = json.loads(meta_path.read_text())
    return Corpus(
        name=meta["name"],
        root=meta_path.parent,
        num_rows=meta["num_rows"],
        num_valid=meta["num_valid"],
        input_bytes=meta["input_bytes"],
        upright_sizes=meta["upright_sizes"],
    )


def cycled(corpus: Corpus, num_rows: int, out_dir: Path) -> Corpus:
    """``corpus`` seen as ``num_rows`` rows that cycle over its images, each with its own id: a
    longer job over the same files (and the same page cache), for runs where the fixed start-up
    cost should be spread over more rows than the corpus has. Only corpora without bad files."""
    if corpus.num_valid != corpus.num_rows:
        raise SystemExit(
            f"--rows needs a corpus without bad files; {corpus.name} has {corpus.num_rows - corpus.num_valid}"
        )
    rows = _manifest_rows(corpus)
    repeated_manifest(corpus, num_rows, out_dir, name="manifest.jsonl", rows=rows)
    ids = [r["image_id"] for r in rows]
    file_bytes = [(corpus.root / r["image_path"]).stat().st_size for r in rows]
    return Corpus(
        name=corpus.name,
        root=out_dir,
        num_rows=num_rows,
        num_valid=num_rows,
        input_bytes=sum(file_bytes[i % len(rows)] for i in range(num_rows)),
        upright_sizes={
            f"{ids[i % len(ids)]}-r{i}": corpus.upright_sizes.get(ids[i % len(ids)]) for i in range(num_rows)
        },
    )


def _manifest_rows(corpus: Corpus) -> list[dict]:
    return [json.loads(line) for line in corpus.manifest.read_text().splitlines() if line]


def repeated_manifest(
    corpus: Corpus, num_rows: int, out_dir: Path, name: str | None = None, rows: list[dict] | None = None
) -> Path:
    """A manifest of ``num_rows`` rows cycling over ``corpus``'s images with distinct ids."""
    rows = rows if rows is not None else _manifest_rows(corpus)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (name or f"manifest-{num_rows}.jsonl")
    with open(path, "w") as f:
        for i in range(num_rows):
            row = dict(rows[i % len(rows)])
            row["image_id"] = f"{row['image_id']}-r{i}"
            row["image_path"] = str(corpus.root / row["image_path"])
            f.write(json.dumps(row) + "\n")
    write_config(out_dir / "config.json")
    return path


def warm_page_cache(corpus: Corpus) -> None:
    """Read every image the manifest names, so that no tool pays for cold reads. The harness
    does this right before each tool runs: the machines this was measured on page out memory
    not touched for about 30 s (DAMON ``pageout``), so one warm-up per batch did not last
    through the slower peers, and whichever tool ran first after them could read from disk."""
    for path in {corpus.root / row["image_path"] for row in _manifest_rows(corpus)}:
        with contextlib.suppress(OSError):  # the mixed corpus names missing files on purpose
            path.read_bytes()

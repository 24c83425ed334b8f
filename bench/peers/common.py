"""What every peer script shares: arguments, manifest reading and the image functions.

Peers are run as subprocesses by ``bench.measure`` so that the RSS and CPU of their whole
process tree can be sampled. Each one reads the same manifest and writes its output under
``--out``; ``bench.verify`` checks every output the same way.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

log = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
JPEG_DECODE_BLOCK = 4 << 20  # engine/imaging.py's value
# Orientation tag value -> the transpose that makes the pixels upright. Deliberately a copy of
# engine/imaging.py's table: peers and the limit probe must not import the engine they are compared with.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True, slots=True)
class Row:
    """One manifest row: its identity, absolute image path and compact JSON output."""

    image_id: str
    path: str
    output: str


def peer_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layout", choices=("parquet", "arrow"), default="parquet")
    parser.add_argument("--mode", choices=("resize", "passthrough"), default="resize")
    parser.add_argument("--max-size", type=int, default=1024)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def read_manifest(path: Path) -> list[Row]:
    rows = []
    base = path.parent
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            output = record["output"]
            if not isinstance(output, str):
                output = json.dumps(output, separators=(",", ":"))
            rows.append(Row(record["image_id"], str(base / record["image_path"]), output))
    return rows


def read_instructions(config: Path) -> str:
    return json.loads(config.read_text())["instructions"]


def conversation(instructions: str, output: str) -> list[dict]:
    return [
        {"role": "user", "content": f"{instructions} <|reserved_special_token_0|>"},
        {"role": "assistant", "content": output},
    ]


def shard_path(out: Path, layout_name: str = "train", index: int = 0, total: int = 1) -> Path:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    return data / f"{layout_name}-{index:05d}-of-{total:05d}.parquet"


# --------------------------------------------------------------------------- images


def load_rotate_resize(source: str | bytes, max_size: int) -> Image.Image | None:
    """What scripts do today: full decode, ``exif_transpose``, LANCZOS thumbnail.

    ``source`` is a path or the file's bytes. Returns None for a file that cannot be
    decoded (the caller drops the row).
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
        upright.thumbnail((max_size, max_size), Image.LANCZOS)
        return upright
    except Exception as err:  # noqa: BLE001 - a bad file is data, not a crash
        log.warning("skipping %s: %s", source if isinstance(source, str) else "image", err)
        return None


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def exif_orientation(im: Image.Image) -> int:
    """Orientation from the raw EXIF block in ``im.info`` (no decode, unlike ``getexif``)."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # noqa: BLE001 - unreadable EXIF means no rotation
        return 1
    return int(exif.get(EXIF_ORIENTATION, 1) or 1)


def fast_resize_encode(data: bytes, max_size: int, quality: int) -> bytes | None:
    """The imaging floor: draft → thumbnail → transpose on the small image → JPEG encode.
    The JPEG decoder gets the photo in one call, not 64 KB at a time, as the engine gives it
    (``engine.imaging.JPEG_DECODE_BLOCK``): the floor keeps every trick the engine uses."""
    try:
        im = Image.open(io.BytesIO(data))
        orientation = exif_orientation(im)
        if im.format == "JPEG":
            im.decodermaxblock = max(im.decodermaxblock, min(len(data), JPEG_DECODE_BLOCK))
            im.draft("RGB", (max_size, max_size))
        im.thumbnail((max_size, max_size))
        if orientation in ORIENTATION_TRANSPOSE:
            im = im.transpose(ORIENTATION_TRANSPOSE[orientation])
        return encode_jpeg(im, quality)
    except Exception as err:  # noqa: BLE001
        log.warning("skipping image: %s", err)
        return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """Pass-through: parse the header only."""
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001
        return None


def passthrough_bytes(path: str) -> bytes | None:
    data = Path(path).read_bytes()
    return data if header_size(data) is not None else None


def hf_features(layout: str):
    """The ``datasets`` features each peer writes for ``layout``."""
    from datasets import Features, List, Value
    from datasets import Image as HFImage

    if layout == "arrow":
        return Features(
            {
                "image_id": Value("string"),
                "conversations": List({"role": Value("string"), "content": Value("string")}),
                "modalities": List({"type": Value("string"), "value": HFImage()}),
            }
        )
    return Features({"image_id": Value("string"), "image": HFImage(), "output": Value("string")})


def hf_record(layout: str, image_id: str, image, output: str, instructions: str) -> dict:
    """One row for :func:`hf_features`; ``image`` is a PIL image or ``{"bytes", "path"}``."""
    if layout == "arrow":
        return {
            "image_id": image_id,
            "conversations": conversation(instructions, output),
            "modalities": [{"type": "image", "value": image}],
        }
    return {"image_id": image_id, "image": image, "output": output}


def write_hf(ds, args: argparse.Namespace) -> None:
    """``to_parquet`` for the Parquet layout, ``save_to_disk`` for packed Arrow."""
    if args.layout == "arrow":
        ds.save_to_disk(str(args.out / "dataset"))
    else:
        ds.to_parquet(str(shard_path(args.out)))

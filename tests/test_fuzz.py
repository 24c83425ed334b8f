"""Property-based fuzzing of the per-sample path: mutated JPEG/PNG/WebP bytes and mutated manifest
lines must come out written or rejected, never as an escaped exception or a hang.

Bounded for CI: a few hundred examples, a per-image time bound, a small pixel limit.
Regression seeds of crashes found so far are pinned with @example.
"""

from __future__ import annotations

import io
import json

import imagegen
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from engine.config import FetchOptions, ImageOptions
from engine.imaging import EncodedImage, ImageFailure, transform_image
from engine.layouts.parquet import ParquetLayout
from engine.pipeline import UnitContext, process_unit, time_limit
from engine.records import Reject
from engine.sinks.store import Store
from engine.sources.jsonl import JsonlSource
from engine.sources.manifest import ManifestRow, parse_row, plan_manifest

OPTS = ImageOptions(max_size=48, max_pixels=4_000_000, timeout=5.0)
BASES = {
    "jpeg": imagegen.oriented(6, "JPEG"),
    "png": imagegen.png(mode="RGBA"),
    "webp": imagegen.webp(),
    "palette": imagegen.palette_png_with_transparency(),
    "heic": imagegen.oriented_heic(6),  # libheif, through pillow-heif
}


def _apng() -> bytes:
    frames = [imagegen.quadrant_image(), imagegen.quadrant_image().transpose(Image.Transpose.ROTATE_180)]
    return imagegen.encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


def _progressive() -> bytes:
    return imagegen.encode(imagegen.quadrant_image(), "JPEG", progressive=True)


# Upright files that pass through when whole (nothing to shrink or turn): what a mutation must
# never sneak past the completeness proof.
KEEPABLE = {
    "jpeg": imagegen.jpeg(),
    "jpeg-progressive": _progressive(),
    "png": imagegen.png(),
    "png-rgba": imagegen.png(mode="RGBA"),
    "apng": _apng(),
    "webp-lossless": imagegen.webp(),
    "webp-lossy": imagegen.encode(imagegen.quadrant_image(), "WEBP", quality=80),
}
KEEP = ImageOptions(max_size=None, format="keep", max_pixels=4_000_000, timeout=5.0)


@st.composite
def mutated(draw, bases=BASES) -> bytes:
    data = bytearray(bases[draw(st.sampled_from(sorted(bases)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "header"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 256))]
        else:  # the header is where sizes, markers and EXIF live
            data[min(pos, 64) % max(len(data), 1)] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
@example(b"")
@example(b"\xff\xd8\xff")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"RIFF\xff\xff\xff\x7fWEBPVP8 ")
def test_mutated_images_are_written_or_rejected(data):
    with time_limit(10):
        result = transform_image(data, OPTS)
    assert isinstance(result, (EncodedImage, ImageFailure))
    if isinstance(result, EncodedImage):
        assert max(result.width, result.height) <= OPTS.max_size
        if not result.passthrough:  # a re-encoded image is always a clean, readable file
            im = Image.open(io.BytesIO(result.data))
            im.load()
            assert im.size == (result.width, result.height)
    else:
        assert result.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(KEEPABLE))
def test_every_written_image_decodes_with_plain_pil(data):
    """Kept or re-encoded, what is written decodes in full with LOAD_TRUNCATED_IMAGES off."""
    with time_limit(10):
        result = transform_image(data, KEEP)
    if isinstance(result, EncodedImage):
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
        im = Image.open(io.BytesIO(result.data))
        im.load()
        assert im.size == (result.width, result.height)
    else:
        assert result.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
line_objects = st.fixed_dictionaries(
    {},
    optional={
        "image_id": json_values | st.text(max_size=12),
        "image_path": json_values | st.text(max_size=12),
        "image_url": json_values,
        "output": json_values,
        "split": json_values | st.sampled_from(["train", "a b"]),
        "conversations": json_values,
        "modalities": json_values,
        "text": json_values,
        "id": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        line_objects.map(lambda o: json.dumps(o).encode()),
        st.binary(max_size=80),
        line_objects.map(lambda o: json.dumps(o).encode()).flatmap(
            lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda i: b[:i] + b"\xff" + b[i + 1 :])
        ),
    )
)
def test_mutated_manifest_lines_parse_or_reject(raw):
    result = parse_row(7, raw, base="/nonexistent", default_split="train")
    assert isinstance(result, (ManifestRow, Reject))
    if isinstance(result, Reject):
        assert result.stage == "manifest" and result.line == 7 and result.reason


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(mutated(), st.sampled_from(["good", "bad-json", "no-id", "bad-output"])),
        min_size=1,
        max_size=8,
    )
)
def test_units_account_for_every_row(tmp_path_factory, cases):
    root = tmp_path_factory.mktemp("fuzz")
    lines = []
    for i, (data, kind) in enumerate(cases):
        (root / f"{i}.img").write_bytes(data)
        rec = {"image_id": f"id{i}", "image_path": f"{i}.img", "output": {"price": 1.5, "currency": "EUR"}}
        if kind == "bad-json":
            lines.append(b"{not json")
            continue
        if kind == "no-id":
            rec.pop("image_id")
        if kind == "bad-output":
            rec["output"] = {"price": "x"}
        lines.append(json.dumps(rec).encode())
    manifest = root / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    schema = json.dumps(
        {"type": "object", "properties": {"price": {"type": "number"}}, "required": ["price"]}
    )
    ctx = UnitContext(
        layout=ParquetLayout(),
        schema_json=schema,
        image=OPTS,
        fetch=FetchOptions(),
        default_split="train",
        base=str(root),
        store=Store(str(root / "out")),
        source=JsonlSource(str(manifest)),
    )
    [unit] = plan_manifest(str(manifest), 64).units
    result = process_unit(unit, ctx)
    assert result.num_rows == len(cases)
    assert result.num_written + sum(result.rejected.values()) == len(cases)

"""Exact duplicates by pixels, decoding only what can change the answer: each distinct stored
content is decoded once, and without the perceptual hash only the contents whose size another
content shares. The groups must be exactly those a full decode finds."""

from __future__ import annotations

import io
import struct

import imagegen
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import convert, row, write_input
from PIL import Image

from engine.check import check_dataset
from engine.inspect.report import inspect_dataset
from engine.inspect.scan import scan
from engine.inspect.source import open_dataset

SIZE = (128, 96)


def noise(seed: int, size: tuple[int, int] = SIZE) -> bytes:
    return imagegen.noise_jpeg(size, seed=seed)


def png_of(jpeg: bytes) -> bytes:
    """The JPEG's decoded pixels saved as PNG: other bytes, the same pixels."""
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, "PNG")
    return out.getvalue()


def with_exif(jpeg: bytes) -> bytes:
    """The JPEG with an EXIF block (a camera make) after its SOI: the same scan data, so the same
    pixels; the file without it is the EXIF-stripped copy."""
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    payload = exif.tobytes()  # "Exif\0\0" and the TIFF block
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def truncated(seed: int, size: tuple[int, int]) -> bytes:
    data = noise(seed, size)
    return data[: len(data) // 2]  # the header opens, the pixels do not decode


def write_parquet(root, splits: dict[str, list[tuple[str, bytes]]]) -> None:
    """Plain HF-style Parquet (struct<bytes, path> image column), 3 rows a row group, so that the
    second pass reads only the row groups it needs."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        table = pa.table(
            {
                "image_id": [k for k, _ in rows],
                "image": pa.array([{"bytes": b, "path": None} for _, b in rows], type=image),
            }
        )
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet", row_group_size=3)


A = noise(1)
B = noise(2)
C = noise(3)
MIXED = {
    "train": [
        # corrupt, the first of its size: read again at the end, it fails there; a byte copy in test
        ("t2", truncated(9, SIZE)),
        ("a", A),
        ("b-exif", with_exif(B)),
        ("c", C),
        ("d4", noise(4)),  # same size as the others, other pixels: in no group
        ("c-copy", C),
        ("d5", noise(5)),
        ("u", noise(6, (200, 150))),  # a size no other image has, with a byte copy in test
        ("v", noise(7, (77, 55))),  # a size no other image has, no copy
        ("t1", truncated(8, (128, 128))),  # corrupt, of a size no other image has
        ("t3", truncated(10, SIZE)),  # corrupt, of a size seen before: decoded (and failing) at once
    ],
    "test": [
        ("a-png", png_of(A)),  # re-encoded across splits
        ("b-stripped", B),  # EXIF stripped across splits
        ("u-copy", noise(6, (200, 150))),
        ("t2-copy", truncated(9, SIZE)),
    ],
}
EXPECTED = {
    frozenset({("train", "a"), ("test", "a-png")}),
    frozenset({("train", "b-exif"), ("test", "b-stripped")}),
    frozenset({("train", "c"), ("train", "c-copy")}),
    frozenset({("train", "u"), ("test", "u-copy")}),
}


def groups(result) -> set[frozenset]:
    return {frozenset(g.members) for g in result.leakage.exact}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    write_parquet(root, MIXED)
    return root


def scan_of(root, **kw):
    ds, fs = open_dataset(str(root))
    return scan(ds, fs, samples=0, **kw)


def test_two_pass_groups_equal_full_decode_and_skip_unique_sizes(mixed):
    two_pass = scan_of(mixed, phash=False)
    full = scan_of(mixed, phash=False, decode_unique_sizes=True)
    assert groups(two_pass) == groups(full) == EXPECTED
    assert {tuple(sorted(g.splits)) for g in two_pass.leakage.exact_cross} == {("test", "train")}
    # 12 distinct contents; v and t1 have sizes no other has and no copy: 10 decoded, against 12
    # (u's size is its own too, but it is decoded to prove that its byte copy is a duplicate image)
    assert (two_pass.num_distinct, two_pass.num_decoded) == (12, 10)
    assert (full.num_distinct, full.num_decoded) == (12, 12)
    # the corrupt images of a shared size are found, as by the full decode (t1 is never decoded)
    assert two_pass.num_undecodable == 3 and full.num_undecodable == 4
    assert {r for r, _ in two_pass.undecodable} == {"train/t2", "test/t2-copy", "train/t3"}
    assert two_pass.formats == {"JPEG": 11, "PNG": 1, "undecodable": 3}


def test_report_says_what_it_decoded(mixed):
    text = inspect_dataset(str(mixed), phash=False).text
    assert (
        "exact duplicates (by pixels; 10 of 12 distinct images decoded, the rest have a size no other "
        "image has, and no copy): 3 groups across splits, 1 within a split" in text
    )
    assert "by pixels; all 12 distinct images decoded" in inspect_dataset(str(mixed)).text
    assert "exact duplicates (by stored bytes)" in inspect_dataset(str(mixed), decode=False).text


def test_phash_decodes_each_distinct_content_once(mixed):
    result = scan_of(mixed)  # the default: the perceptual hash needs every image's pixels
    assert groups(result) == EXPECTED
    assert (result.num_distinct, result.num_decoded) == (12, 12)  # 15 rows, 12 distinct contents
    assert result.leakage.near is not None


def test_byte_hash_alone_misses_what_pixels_find(mixed):
    by_bytes = scan_of(mixed, decode=False)
    assert groups(by_bytes) == {
        frozenset({("train", "c"), ("train", "c-copy")}),
        frozenset({("train", "u"), ("test", "u-copy")}),
        frozenset({("train", "t2"), ("test", "t2-copy")}),
    }


def test_same_size_different_images_are_not_grouped(tmp_path):
    write_parquet(tmp_path, {"train": [("x", noise(11))], "test": [("y", noise(12))]})
    result = scan_of(tmp_path, phash=False)
    assert result.leakage.exact == [] and result.num_decoded == 2


def test_check_decodes_every_image_and_reports_the_corrupt_ones(mixed):
    result = check_dataset(str(mixed))
    line = next(p for p in result.problems if "images do not decode" in p)
    assert line.startswith("4 images do not decode") and "train/t1" in line and "test/t2-copy" in line
    assert any(
        p.startswith("3 images are in more than one split (identical pixels)") for p in result.problems
    )


@pytest.mark.parametrize("extra", [(), ("--images-as-paths",)], ids=["raw-image", "fs-image"])
def test_two_pass_on_packed_arrow_layout(tmp_path, extra):
    """The second pass reads an Arrow stream again (no row groups to skip), and fs-image files."""
    images = {f"img/{i}.jpg": noise(20 + i) for i in range(4)}
    images["img/big.jpg"] = noise(30, (160, 120))
    images["img/exif.jpg"] = with_exif(images["img/0.jpg"])  # id0, the first of its size: re-read
    rows = [row(f"id{i}", f"img/{i}.jpg") for i in range(4)]
    rows += [row("big", "img/big.jpg"), row("exif", "img/exif.jpg", split="test")]
    out = tmp_path / "out"
    assert convert(write_input(tmp_path / "in", rows, images), out, "--layout", "arrow", *extra) == 0
    two_pass = scan_of(out, phash=False)
    full = scan_of(out, phash=False, decode_unique_sizes=True)
    assert groups(two_pass) == groups(full)
    # id0 and its EXIF copy (no ids in the packed layout: rows are named by file and position)
    train, test = "train[data-00000-of-00001.arrow:0]", "test[data-00000-of-00001.arrow:0]"
    assert [set(g.members) for g in two_pass.leakage.exact_cross] == [{("train", train), ("test", test)}]
    assert two_pass.num_decoded == full.num_decoded - 1  # the one 160x120 image is not decoded


@pytest.mark.parametrize("seed", range(5))
def test_two_pass_equals_full_decode_on_shuffled_rows(tmp_path, seed):
    """Random orders of pixel twins (PNG, EXIF), byte copies, corrupt images and three sizes, in
    row groups of 3: the first image of a size may come in the same row group as its twin."""
    import random

    rng = random.Random(seed)
    pool = []
    for i, size in enumerate([SIZE, SIZE, SIZE, (96, 128), (96, 128), (64, 64)]):
        jpeg = noise(100 + i, size)
        pool += [jpeg, png_of(jpeg), with_exif(jpeg)]
    pool += [truncated(200, SIZE), truncated(201, (64, 64)), truncated(202, (50, 50))]
    picks = [rng.choice(pool) for _ in range(40)]
    write_parquet(
        tmp_path,
        {
            "train": [(f"r{i}", b) for i, b in enumerate(picks[:25])],
            "test": [(f"r{i}", b) for i, b in enumerate(picks[25:], 25)],
        },
    )
    two_pass = scan_of(tmp_path, phash=False)
    full = scan_of(tmp_path, phash=False, decode_unique_sizes=True)
    assert groups(two_pass) == groups(full) and groups(full)
    # only a corrupt image of a size no other has, and with no copy, is left undecoded
    missed = {r for r in full.undecodable if r not in two_pass.undecodable}
    assert set(two_pass.undecodable) <= set(full.undecodable)
    assert all(picks.count(picks[int(r.split("/r")[1])]) == 1 for r, _ in missed), missed

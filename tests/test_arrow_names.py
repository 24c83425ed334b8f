"""fs-image file names (`--images-as-paths`): every written sample must point at a file that
holds *its own* image. Names are derived from sample ids, so ids that map to the same name
(a multi-image sample's `<id>-<i>` suffix, repeated trainer `id`s, the generated `line-<n>`
ids) must not overwrite each other's files.

Each picture has its own size, so a file that holds another sample's image shows in the
decoded size."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import imagegen
import pytest
from conftest import run_main
from PIL import Image

TOKEN = "<|reserved_special_token_0|>"
SIZES = {"a.png": (64, 48), "b.png": (80, 40), "c.png": (96, 72), "d.png": (48, 64)}


def sample(n_images: int, images: list[str], **ids) -> dict:
    return {
        **ids,
        "conversations": [
            {"role": "user", "content": TOKEN * n_images},
            {"role": "assistant", "content": "."},
        ],
        "modalities": [{"type": "image", "value": v} for v in images],
    }


def convert_fs(tmp_path: Path, rows: list[dict], variant: str = "fs") -> Path:
    base = tmp_path / "in"
    base.mkdir()
    for name, size in SIZES.items():
        (base / name).write_bytes(imagegen.png(size=size))
    manifest = base / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "convert",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--layout",
        "arrow",
        "--runner",
        "local",
        "--quiet",
    ]
    if variant == "fs":
        argv.append("--images-as-paths")
    assert run_main(argv) == 0
    return out


def written_images(out: Path) -> list[list[tuple[int, int]]]:
    """The decoded image sizes of every written sample, in output (= input line) order."""
    ds = datasets.load_from_disk(str(out))
    got = []
    for s in ds:
        sizes = []
        for m in s["modalities"]:
            if isinstance(m["value"], str):
                with Image.open(out / m["value"]) as im:
                    sizes.append(im.size)
            else:  # raw-image: the trainer recipe's {"path": None, "bytes": ...}
                with Image.open(io.BytesIO(m["value"]["bytes"])) as im:
                    sizes.append(im.size)
        got.append(sizes)
    return got


def num_rejected(out: Path) -> int:
    p = out / "rejects.jsonl"
    return sum(1 for line in p.read_text().splitlines() if line.strip()) if p.exists() else 0


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_multi_image_suffix_does_not_collide_with_another_id(tmp_path, variant):
    # "two" has two images -> names like two-0 / two-1; "two-0" is another, single-image sample
    rows = [sample(2, ["a.png", "b.png"], id="two"), sample(1, ["c.png"], id="two-0")]
    out = convert_fs(tmp_path, rows, variant)
    assert num_rejected(out) == 0
    assert written_images(out) == [[SIZES["a.png"], SIZES["b.png"]], [SIZES["c.png"]]]
    if variant == "fs":
        ds = datasets.load_from_disk(str(out))
        values = [m["value"] for s in ds for m in s["modalities"]]
        assert len(set(values)) == 3, f"two samples share an image file: {values}"


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_generated_line_ids_do_not_collide_with_explicit_ids(tmp_path, variant):
    # line 1 is explicitly called "line-2"; line 2 has no id and gets the generated "line-2"
    rows = [sample(1, ["a.png"], id="line-2"), sample(1, ["c.png"])]
    out = convert_fs(tmp_path, rows, variant)
    got = written_images(out)
    # either both written, each with its own image, or one of them rejected (never silently swapped)
    assert len(got) + num_rejected(out) == 2
    if len(got) == 2:
        assert got == [[SIZES["a.png"]], [SIZES["c.png"]]]


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_repeated_trainer_ids_keep_their_own_images(tmp_path, variant):
    rows = [sample(1, ["a.png"], id="dup"), sample(1, ["c.png"], id="dup")]
    out = convert_fs(tmp_path, rows, variant)
    got = written_images(out)
    assert len(got) + num_rejected(out) == 2
    if len(got) == 2:
        assert got == [[SIZES["a.png"]], [SIZES["c.png"]]]
    else:  # rejected as a duplicate: the first one keeps its image
        assert got == [[SIZES["a.png"]]]


def test_ids_differing_only_in_unsafe_characters_get_distinct_files(tmp_path):
    ids = ["a b", "a_b", "a/b", "a\\b", "A_b"]
    images = ["a.png", "b.png", "c.png", "d.png", "a.png"]
    rows = [sample(1, [img], id=i) for i, img in zip(ids, images)]
    out = convert_fs(tmp_path, rows)
    assert num_rejected(out) == 0
    assert written_images(out) == [[SIZES[img]] for img in images]

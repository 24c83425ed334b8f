"""The SHA-256 of every data file each layout makes from one seeded corpus, recorded in
tests/data/digests.json: a refactoring must leave them as they are, and a change of format on
purpose updates the file in the same commit (``ENGINE_UPDATE_DIGESTS=1 pytest tests/test_digests.py``).

The digests belong to the build that scripts/install.sh makes (Pillow-SIMD over Debian's
libjpeg-turbo, zlib and libwebp): another encoder gives other bytes for the re-encoded images.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import imagegen
import pytest
from conftest import TESTS, convert, run_main, write_input

DIGESTS = TESTS / "data" / "digests.json"
UPDATE = os.environ.get("ENGINE_UPDATE_DIGESTS") == "1"
# Files whose bytes are the dataset; stats.json and the card carry timings and versions.
DATA_SUFFIXES = (".parquet", ".arrow", ".jpg", ".png", ".webp")
DATA_NAMES = ("state.json", "dataset_info.json", "dataset_dict.json", "config.json")


def _images() -> dict[str, bytes]:
    return {
        "small.jpg": imagegen.jpeg((320, 240)),
        "large.jpg": imagegen.noise_jpeg((1600, 1200), seed=3),
        "rotated.jpg": imagegen.oriented(6),
        "alpha.png": imagegen.png((200, 150), mode="RGBA"),
        "photo.webp": imagegen.webp((300, 200)),
        "palette.png": imagegen.palette_png_with_transparency((120, 90)),
        "broken.jpg": imagegen.truncated_jpeg(),
    }


def _rows(splits: bool) -> list[dict]:
    names = sorted(_images())
    rows = []
    for i in range(14):
        name = names[i % len(names)]
        r = {
            "image_id": f"id-{i:02d}",
            "image_path": name,
            "output": {"price": i + 0.5, "currency": "EUR"},
            "barcode": f"{i:013d}",
        }
        if splits:
            r["split"] = "validation" if i % 3 == 0 else "train"
        rows.append(r)
    rows.append({"image_id": "bad-output", "image_path": "small.jpg", "output": {"price": "free"}})
    return rows


def _trainer_rows() -> list[dict]:
    token = "<|reserved_special_token_0|>"
    rows = []
    for i, name in enumerate(["small.jpg", "large.jpg", "rotated.jpg", "alpha.png"]):
        images = [{"type": "image", "value": name}] + (
            [{"type": "image", "value": "photo.webp"}] if i == 3 else []
        )
        turns = [
            {"role": "user", "content": token * len(images) + f"\nWhat is in picture {i}?"},
            {"role": "assistant", "content": f"Picture {i}."},
        ]
        rows.append({"conversations": turns, "modalities": images, "id": f"t{i}"})
    return rows


CASES = {
    "parquet": (False, ["--row-group-rows", "3", "--shard-rows", "5"]),
    "parquet-splits": (True, ["--row-group-rows", "4"]),
    "arrow-raw": (False, ["--layout", "arrow", "--shard-rows", "6"]),
    "arrow-fs": (False, ["--layout", "arrow", "--images-as-paths"]),
    "arrow-splits": (True, ["--layout", "arrow"]),
    "parquet-reencode": (False, ["--no-passthrough", "--max-size", "256", "--image-format", "webp"]),
    "messages": (True, ["--layout", "messages", "--row-group-rows", "3", "--shard-rows", "4"]),
}


def _digests(out: Path) -> dict[str, str]:
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and (p.suffix in DATA_SUFFIXES or p.name in DATA_NAMES) and ".engine" not in p.parts:
            found[p.relative_to(out).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def _produce(tmp_path: Path, case: str) -> dict[str, str]:
    if case == "trainer-jsonl":
        inp = write_input(tmp_path / "in", _trainer_rows(), _images(), manifest_name="trainer.jsonl")
        out = tmp_path / "out"
        code = run_main(
            [
                "convert",
                "--manifest",
                str(inp.manifest),
                "--out",
                str(out),
                "--layout",
                "arrow",
                "--runner",
                "local",
                "--quiet",
            ]
        )
    else:
        splits, extra = CASES[case]
        inp = write_input(tmp_path / "in", _rows(splits), _images())
        out = tmp_path / "out"
        code = convert(inp, out, *extra)
    assert code == 0
    return _digests(out)


@pytest.mark.parametrize("case", [*CASES, "trainer-jsonl"])
def test_data_files_keep_their_digests(tmp_path, case):
    got = _produce(tmp_path, case)
    assert any(name.endswith((".parquet", ".arrow")) for name in got), got
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    if UPDATE:
        recorded[case] = got
        DIGESTS.parent.mkdir(parents=True, exist_ok=True)
        DIGESTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert case in recorded, f"no digests recorded for {case}: run with ENGINE_UPDATE_DIGESTS=1"
    assert got == recorded[case]


def test_digests_do_not_depend_on_the_runner(tmp_path):
    """The driver threads of the ray runner make the same bytes as the in-process runner."""
    inp = write_input(tmp_path / "in", _rows(True), _images())
    local, threads = tmp_path / "local", tmp_path / "threads"
    assert convert(inp, local, "--layout", "arrow") == 0
    assert convert(inp, threads, "--layout", "arrow", runner="ray") == 0
    assert _digests(local) == _digests(threads)

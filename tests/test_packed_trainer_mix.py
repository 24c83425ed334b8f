"""The packed layout mixes with the trainer's own datasets (issue 18).

The trainer's documented recipe (seed 003: `Dataset.from_generator` yielding PIL images in
`modalities`, then `save_to_disk`) is really run here with the installed `datasets`, and an
engine dataset must concatenate with what it builds. The trainer's loaders are read from
EPFLiGHT/MultiMeditron (`src/multimeditron/dataset/loader/image/bytes.py` and `fs.py`, Apache-2.0);
their behaviour is reimplemented below in a few lines rather than copied.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import imagegen
import pytest
from conftest import convert, row, write_input
from PIL import Image, ImageOps

TOKEN = "<|reserved_special_token_0|>"
RECIPE_VALUE = {"path": datasets.Value("null"), "bytes": datasets.Value("binary")}
IMAGE_MODALITIES = datasets.List({"type": datasets.Value("string"), "value": datasets.Image()})
# (source bytes, upright size): rotated and upright, JPEG and PNG
PICTURES = {
    "r6.jpg": (imagegen.oriented(6), (64, 48)),
    "r3.png": (imagegen.oriented(3, "PNG"), (64, 48)),
    "wide.jpg": (imagegen.jpeg((80, 40)), (80, 40)),
}


# --- the trainer's loaders, as their source reads -------------------------------------------


def old_raw_image_loader(sample: dict) -> Image.Image:
    """MultiMeditron's earlier `raw-image` loader: `sample["value"]` must be a dict with `bytes`."""
    return Image.open(io.BytesIO(sample["value"]["bytes"])).convert("RGB")


def current_raw_image_loader(sample: dict) -> Image.Image:
    """The current `raw-image` loader (as documented): a dict with `bytes`, or a PIL image."""
    value = sample["value"]
    image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value["bytes"]))
    return image.convert("RGB")


def fs_image_loader(base_path: str, sample: dict) -> Image.Image:
    """The `fs-image` loader: one `base_path` per modality, joined with `os.path.join`."""
    path = os.path.join(base_path, sample["value"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file {path} not found")
    return Image.open(path).convert("RGB")


# --- fixtures --------------------------------------------------------------------------------


def recipe_dataset(folder: Path, cache: Path) -> datasets.Dataset:
    """The seed's recipe, verbatim in spirit: PIL images in `modalities`, then save_to_disk."""

    def generate_sample(path: Path) -> dict:
        image = Image.open(path).convert("RGB")
        conversations = [
            {"role": "user", "content": f"Describe the image: {TOKEN}."},
            {"role": "assistant", "content": "This is an image of ..."},
        ]
        return {"conversations": conversations, "modalities": [{"type": "image", "value": image}]}

    paths = [folder / "wide.jpg", folder / "r6.jpg"]
    ds = datasets.Dataset.from_generator(lambda: (generate_sample(p) for p in paths), cache_dir=str(cache))
    out = folder.parent / "from_generator"
    ds.save_to_disk(str(out))
    return datasets.load_from_disk(str(out))


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    images = {name: data for name, (data, _) in PICTURES.items()}
    inp = write_input(root / "in", [row(f"id{i}", name) for i, name in enumerate(PICTURES)], images)
    outs = {}
    for name, extra in (("recipe", ()), ("image", ("--modality-feature", "image"))):
        outs[name] = root / f"engine-{name}"
        assert convert(inp, outs[name], "--layout", "arrow", *extra) == 0
    # the recipe's images are the (upright) sources themselves, decoded by PIL
    (root / "pics").mkdir()
    for name in ("wide.jpg", "r6.jpg"):
        im = Image.open(io.BytesIO(PICTURES[name][0]))
        ImageOps.exif_transpose(im).save(root / "pics" / name, quality=95)
    return {"outs": outs, "inp": inp, "root": root, "recipe": recipe_dataset(root / "pics", root / "cache")}


def engine_sizes() -> list[tuple[int, int]]:
    return [size for _, size in PICTURES.values()]


# --- raw-image: the recipe's features by default ---------------------------------------------


def test_the_recipe_really_gives_a_plain_struct(mix):
    """What FORMATS.md §4 says, measured with the installed `datasets`."""
    assert mix["recipe"].features["modalities"].feature["value"] == RECIPE_VALUE


def test_default_features_equal_the_recipes(mix):
    engine = datasets.load_from_disk(str(mix["outs"]["recipe"]))
    assert engine.features == mix["recipe"].features
    assert engine.data.schema.field("modalities").type == mix["recipe"].data.schema.field("modalities").type


def test_default_concatenates_with_a_recipe_dataset(mix):
    engine = datasets.load_from_disk(str(mix["outs"]["recipe"]))
    both = datasets.concatenate_datasets([engine, mix["recipe"]])
    assert both.num_rows == len(PICTURES) + 2
    sizes = [old_raw_image_loader(m).size for s in both for m in s["modalities"]]
    assert sizes == engine_sizes() + [(80, 40), (64, 48)]
    for sample in both:  # every row still has one token per image
        assert sum(t["content"].count(TOKEN) for t in sample["conversations"]) == len(sample["modalities"])


@pytest.mark.parametrize("loader", [old_raw_image_loader, current_raw_image_loader])
def test_trainer_raw_image_loaders_read_the_default(mix, loader):
    engine = datasets.load_from_disk(str(mix["outs"]["recipe"]))
    for sample, size in zip(engine, engine_sizes()):
        im = loader(sample["modalities"][0])
        assert im.mode == "RGB" and im.size == size
        imagegen.assert_quadrants(im)


# --- raw-image with --modality-feature image --------------------------------------------------


def test_image_feature_option_gives_an_image_feature(mix):
    engine = datasets.load_from_disk(str(mix["outs"]["image"]))
    assert isinstance(engine.features["modalities"].feature["value"], datasets.Image)
    assert isinstance(engine[0]["modalities"][0]["value"], Image.Image)


def test_image_feature_concatenates_with_a_recipe_dataset_cast_to_image(mix):
    engine = datasets.load_from_disk(str(mix["outs"]["image"]))
    recipe = mix["recipe"].cast_column("modalities", IMAGE_MODALITIES)
    both = datasets.concatenate_datasets([engine, recipe])
    assert both.features == engine.features
    sizes = [current_raw_image_loader(m).size for s in both for m in s["modalities"]]
    assert sizes == engine_sizes() + [(80, 40), (64, 48)]


def test_image_feature_does_not_mix_with_an_uncast_recipe_dataset(mix):
    """What the README says: Image() rows need the recipe dataset cast, and the older loader fails."""
    engine = datasets.load_from_disk(str(mix["outs"]["image"]))
    with pytest.raises(ValueError, match="aligned"):
        datasets.concatenate_datasets([engine, mix["recipe"]])
    with pytest.raises(TypeError):
        old_raw_image_loader(engine[0]["modalities"][0])
    im = current_raw_image_loader(engine[0]["modalities"][0])
    assert im.size == engine_sizes()[0]


# --- fs-image paths --------------------------------------------------------------------------


def test_two_fs_image_datasets_in_different_folders_share_one_base_path(mix, tmp_path, monkeypatch):
    base = tmp_path / "datasets"
    outs = [base / "a" / "prices", base / "b" / "deeper" / "labels"]
    for out in outs:
        assert (
            convert(
                mix["inp"], out, "--layout", "arrow", "--images-as-paths", "--paths-relative-to", str(base)
            )
            == 0
        )
    both = datasets.concatenate_datasets([datasets.load_from_disk(str(o)) for o in outs])
    assert both.num_rows == 2 * len(PICTURES)
    values = [s["modalities"][0]["value"] for s in both]
    assert all(not os.path.isabs(v) for v in values), values
    assert values[0].startswith("a/prices/images/") and values[-1].startswith("b/deeper/labels/images/"), (
        values
    )
    for sample, size in zip(both, engine_sizes() * 2):
        im = fs_image_loader(str(base), sample["modalities"][0])
        assert im.size == size
        imagegen.assert_quadrants(im)
    # the trainer runs from elsewhere: only base_path matters
    monkeypatch.chdir(tmp_path.anchor)
    assert fs_image_loader(str(base), both[0]["modalities"][0]).size == engine_sizes()[0]


def test_absolute_fs_image_paths_load_with_any_base_path(mix, tmp_path):
    out = tmp_path / "abs"
    assert convert(mix["inp"], out, "--layout", "arrow", "--images-as-paths", "--absolute-paths") == 0
    ds = datasets.load_from_disk(str(out))
    for sample, size in zip(ds, engine_sizes()):
        value = sample["modalities"][0]["value"]
        assert os.path.isabs(value) and Path(value).parent == out.resolve() / "images", value
        assert fs_image_loader(str(tmp_path / "unrelated"), sample["modalities"][0]).size == size


def test_default_fs_image_paths_are_relative_to_out(mix, tmp_path):
    out = tmp_path / "rel"
    assert convert(mix["inp"], out, "--layout", "arrow", "--images-as-paths") == 0
    ds = datasets.load_from_disk(str(out))
    for sample, size in zip(ds, engine_sizes()):
        assert sample["modalities"][0]["value"].startswith("images/")
        assert fs_image_loader(str(out), sample["modalities"][0]).size == size


@pytest.mark.parametrize("extra", [("--absolute-paths",), ("--paths-relative-to", "/tmp")])
def test_path_options_need_fs_image(mix, tmp_path, extra, capsys):
    assert convert(mix["inp"], tmp_path / "x", "--layout", "arrow", *extra) == 2
    assert "--images-as-paths" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [("--layout", "arrow", "--images-as-paths"), ("--layout", "parquet")])
def test_modality_feature_needs_raw_image(mix, tmp_path, extra, capsys):
    assert convert(mix["inp"], tmp_path / "x", "--modality-feature", "image", *extra) == 2
    assert "--modality-feature" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- several splits: which folder packed_path names ------------------------------------------


def test_stats_name_the_packed_path_of_each_split(mix, tmp_path):
    images = {name: data for name, (data, _) in PICTURES.items()}
    inp = write_input(
        tmp_path / "in",
        [
            row("a", "r6.jpg", split="train"),
            row("b", "wide.jpg", split="test"),
            row("c", "r3.png", split="train"),
        ],
        images,
    )
    out = tmp_path / "out"
    assert convert(inp, out, "--layout", "arrow") == 0
    paths = json.loads((out / "stats.json").read_text())["packed_paths"]
    assert paths == {"train": str(out / "train"), "test": str(out / "test")}
    rows = {split: datasets.load_from_disk(p).num_rows for split, p in paths.items()}
    assert rows == {"train": 2, "test": 1}
    # one split: OUT itself
    single = tmp_path / "single"
    assert convert(mix["inp"], single, "--layout", "arrow") == 0
    paths = json.loads((single / "stats.json").read_text())["packed_paths"]
    assert paths == {"train": str(single)}
    assert datasets.load_from_disk(paths["train"]).num_rows == len(PICTURES)

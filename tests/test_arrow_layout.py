"""The packed Arrow layout (FORMATS.md §4, issue 3): `datasets.save_to_disk` folders that a
trainer opens with `datasets.load_from_disk`, for the raw-image (embedded bytes) and fs-image
(`--images-as-paths`) loaders, from labelr manifests and from the trainer's own JSONL.

Every check reads the output back with the real readers (pyarrow IPC, `datasets`, Pillow) and
asserts rows, schemas, pixels and file locations."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import datasets
import imagegen
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from conftest import (
    GOOD_OUTPUT_COMPACT,
    SCHEMA,
    InputSet,
    convert,
    row,
    run_main,
    write_input,
)
from PIL import Image

TOKEN = "<|reserved_special_token_0|>"
INSTRUCTIONS = "Extract the price tag — prix en €, s'il vous plaît."  # what conftest's CONFIG_BYTES holds
SCHEMA_SENTENCE = "Response must be formatted as JSON, and follow this JSON schema:"
COMPACT_SCHEMA = json.dumps(SCHEMA, separators=(",", ":"), ensure_ascii=False)
ARROW_SHARD = re.compile(r"data-(?P<index>\d{5})-of-(?P<count>\d{5})\.arrow")
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# what the trainer's recipe (from_generator yielding PIL images, then save_to_disk) writes
RECIPE_STRUCT = pa.struct([("path", pa.null()), ("bytes", pa.binary())])
RECIPE_VALUE = {"path": datasets.Value("null"), "bytes": datasets.Value("binary")}
TURNS_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

# (orientation, format, stored size) of the labelr fixture, in manifest order, and the upright
# size each must come back with. The last one is larger than --max-size (1024) and rotated.
LABELR_IMAGES = [
    ("rot6.jpg", imagegen.oriented(6), (64, 48)),
    ("rot3.png", imagegen.oriented(3, "PNG"), (64, 48)),
    ("rot8.jpg", imagegen.oriented(8), (64, 48)),
    ("plain.jpg", imagegen.jpeg(), (64, 48)),
    ("big_rot6.jpg", imagegen.oriented(6, size=(1600, 1200)), (1024, 768)),
    (
        "rot5.webp",
        imagegen.encode(
            imagegen.stored_for_orientation(imagegen.quadrant_image(), 5),
            "WEBP",
            orientation=5,
            lossless=True,
        ),
        (64, 48),
    ),
]
LABELR_OUTPUTS = {3: '{"price": 2, "currency": "USD"}'}  # index -> output given as a JSON string
LABELR_ASSISTANT = {3: '{"price":2,"currency":"USD"}'}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def arrow(manifest: Path, out: Path, *extra: str, config: Path | None = None) -> int:
    """Run `convert --layout arrow` with the local runner."""
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
    if config is not None:
        argv += ["--config", str(config)]
    return run_main(argv + list(extra))


def convert_arrow(inp: InputSet, out: Path, *extra: str) -> int:
    return convert(inp, out, "--layout", "arrow", *extra)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("data-*.arrow"))


def read_stream(path: Path) -> pa.Table:
    with pa.OSFile(str(path), "rb") as f:
        return ipc.open_stream(f).read_all()


def is_dataset_folder(folder: str) -> bool:
    """The trainer's own check before `load_from_disk`."""
    return os.path.exists(os.path.join(folder, datasets.config.DATASET_INFO_FILENAME)) and os.path.exists(
        os.path.join(folder, datasets.config.DATASET_STATE_JSON_FILENAME)
    )


def raw_image_bytes_view(ds: datasets.Dataset) -> datasets.Dataset:
    """The dataset with `modalities.value` as undecoded `{"bytes", "path"}` dicts. Loaded in
    memory first, so the cast writes no cache file into the output folder."""
    return ds.cast_column(
        "modalities", datasets.List({"type": datasets.Value("string"), "value": datasets.Image(decode=False)})
    )


def open_image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def raw_value_image(value) -> Image.Image:
    """A raw-image `modalities.value` as the recipe stores it: `{"path": None, "bytes": ...}`."""
    assert isinstance(value, dict) and set(value) == {"path", "bytes"}, value
    assert value["path"] is None
    return open_image(value["bytes"])


def count_tokens(sample: dict, token: str = TOKEN) -> int:
    if "text" in sample and sample["text"] is not None:
        return sample["text"].count(token)
    return sum(t["content"].count(token) for t in sample["conversations"])


def rejects(out: Path) -> list[dict]:
    p = out / "rejects.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def all_files(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, fs in os.walk(root) for f in fs}


def assert_upright(im: Image.Image, size: tuple[int, int]) -> None:
    assert im.size == size, f"decoded size {im.size}, want {size}"
    assert im.getexif().get(imagegen.ORIENTATION_TAG) in (None, 1), (
        "a stored image still carries a rotation tag"
    )
    imagegen.assert_quadrants(im)


def assert_save_to_disk_folder(folder: Path, num_rows: int, *, raw: bool, text_column: str = "conversations"):
    """Shard names, state.json, dataset_info.json and the IPC stream schema of one split folder."""
    files = shards(folder)
    assert files, f"no data-*.arrow under {folder}"
    counts = set()
    for i, f in enumerate(files):
        m = ARROW_SHARD.fullmatch(f.name)
        assert m, f.name
        assert int(m["index"]) == i
        counts.add(int(m["count"]))
    assert counts == {len(files)}, [f.name for f in files]
    state = json.loads((folder / "state.json").read_text())
    assert [d["filename"] for d in state["_data_files"]] == [f.name for f in files]
    assert state["_format_type"] is None
    info = json.loads((folder / "dataset_info.json").read_text())
    features = datasets.Features.from_dict(info["features"])
    assert set(features) == {text_column, "modalities"}
    value = features["modalities"].feature["value"]
    if raw:
        assert value == RECIPE_VALUE, value
    else:
        assert value == datasets.Value("string"), value
    total = 0
    for f in files:
        head = f.read_bytes()[:6]
        assert head != b"ARROW1", f"{f.name} is an IPC *file*, not a stream"
        table = read_stream(f)
        total += table.num_rows
        assert table.schema.names == [text_column, "modalities"]
        if text_column == "conversations":
            assert table.schema.field("conversations").type == TURNS_TYPE
        else:
            assert table.schema.field("text").type == pa.string()
        item = table.schema.field("modalities").type.value_type
        assert item.field("type").type == pa.string()
        assert item.field("value").type == (RECIPE_STRUCT if raw else pa.string())
    assert total == num_rows
    splits = info["splits"]
    assert sum(s["num_examples"] for s in splits.values()) == num_rows


# ---------------------------------------------------------------------------------------------
# labelr manifest + config: raw-image and fs-image
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelr(tmp_path_factory):
    root = tmp_path_factory.mktemp("arrow_labelr")
    images = {f"img/{name}": data for name, data, _ in LABELR_IMAGES}
    rows = []
    for i, (name, _, _) in enumerate(LABELR_IMAGES):
        kwargs = {"output": LABELR_OUTPUTS[i]} if i in LABELR_OUTPUTS else {}
        rows.append(row(f"id_{i}", f"img/{name}", barcode=str(1000 + i), **kwargs))
    rows.insert(2, row("missing", "img/nope.jpg"))  # line 3: goes to rejects, shifts nothing
    inp = write_input(root / "in", rows, images)
    outs = {}
    for variant, extra in (("raw", ()), ("fs", ("--images-as-paths",))):
        out = root / variant
        assert convert_arrow(inp, out, "--shard-rows", "2", *extra) == 0
        outs[variant] = out
    return outs


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_labelr_folder_is_a_save_to_disk_folder(labelr, variant):
    out = labelr[variant]
    assert_save_to_disk_folder(out, len(LABELR_IMAGES), raw=variant == "raw")
    assert len(shards(out)) == 3  # 6 rows, --shard-rows 2
    assert not (out / "dataset_dict.json").exists()
    for name in ("stats.json", "rejects.jsonl", "config.json"):
        assert (out / name).is_file(), name
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_input_rows"] == len(LABELR_IMAGES) + 1
    assert stats["num_written"] == len(LABELR_IMAGES)
    assert stats["num_rejected"] == 1
    assert (out / "images").is_dir() == (variant == "fs")


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_labelr_missing_image_goes_to_rejects(labelr, variant):
    rej = rejects(labelr[variant])
    assert [(r["line"], r["image_id"], r["stage"]) for r in rej] == [(3, "missing", "fetch")]


def test_raw_image_round_trip(labelr):
    ds = datasets.load_from_disk(str(labelr["raw"]))
    assert isinstance(ds, datasets.Dataset)
    assert ds.num_rows == len(LABELR_IMAGES)
    assert ds.features["modalities"].feature["value"] == RECIPE_VALUE
    for i, sample in enumerate(ds):
        _, _, size = LABELR_IMAGES[i]
        assert len(sample["modalities"]) == 1
        m = sample["modalities"][0]
        assert m["type"] == "image"
        assert_upright(raw_value_image(m["value"]), size)
        turns = sample["conversations"]
        assert [t["role"] for t in turns] == ["user", "assistant"]
        assert turns[0]["content"] == INSTRUCTIONS + "\n" + TOKEN  # labelr: the text, then the image
        assert turns[1]["content"] == LABELR_ASSISTANT.get(i, GOOD_OUTPUT_COMPACT)
        assert count_tokens(sample) == len(sample["modalities"]) == 1


def test_fs_image_round_trip(labelr):
    out = labelr["fs"]
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == len(LABELR_IMAGES)
    assert ds.features["modalities"].feature["value"] == datasets.Value("string")
    seen = []
    for i, sample in enumerate(ds):
        _, _, size = LABELR_IMAGES[i]
        assert len(sample["modalities"]) == 1
        m = sample["modalities"][0]
        assert m["type"] == "image"
        value = m["value"]
        assert isinstance(value, str) and not os.path.isabs(value), value
        assert value.startswith("images/"), value
        path = (out / value).resolve()
        assert path.parent == (out / "images").resolve()
        with Image.open(path) as im:
            im.load()
            assert_upright(im, size)
        seen.append(path)
        turns = sample["conversations"]
        assert [t["role"] for t in turns] == ["user", "assistant"]
        assert turns[0]["content"] == INSTRUCTIONS + "\n" + TOKEN
        assert turns[1]["content"] == LABELR_ASSISTANT.get(i, GOOD_OUTPUT_COMPACT)
        assert count_tokens(sample) == len(sample["modalities"]) == 1
    assert len(set(seen)) == len(seen), "two samples share one image file"
    # exactly the referenced files, nothing else (no temporary or partial files)
    assert sorted(p.resolve() for p in (out / "images").iterdir()) == sorted(seen)


def test_raw_image_bytes_are_what_the_fs_files_hold(labelr):
    """Both loaders store the same upright, re-encoded image."""
    raw = raw_image_bytes_view(datasets.load_from_disk(str(labelr["raw"]), keep_in_memory=True))
    fs = datasets.load_from_disk(str(labelr["fs"]))
    for a, b in zip(raw, fs):
        assert (
            a["modalities"][0]["value"]["bytes"] == (labelr["fs"] / b["modalities"][0]["value"]).read_bytes()
        )


# --- reading like the trainer ----------------------------------------------------------------


def test_trainer_reads_raw_image(labelr):
    folder = str(labelr["raw"])
    assert is_dataset_folder(folder)
    listing = sorted(os.listdir(folder))
    ds = datasets.load_from_disk(folder, keep_in_memory=True)
    view = raw_image_bytes_view(ds)
    for i, sample in enumerate(view):
        value = sample["modalities"][0]["value"]
        assert set(value) == {"bytes", "path"}
        assert isinstance(value["bytes"], bytes) and value["bytes"]
        im = open_image(value["bytes"])
        assert_upright(im, LABELR_IMAGES[i][2])
    # the Arrow view (no `datasets` decoding at all) holds the same bytes
    table = ds.with_format("arrow")[:]
    first = table.column("modalities")[0].as_py()[0]["value"]
    assert first["bytes"] == view[0]["modalities"][0]["value"]["bytes"]
    assert sorted(os.listdir(folder)) == listing, "reading wrote into OUT"


def test_trainer_reads_fs_image(labelr):
    folder = str(labelr["fs"])
    assert is_dataset_folder(folder)
    ds = datasets.load_from_disk(folder)
    for i, sample in enumerate(ds):
        value = sample["modalities"][0]["value"]
        im = Image.open(os.path.join(folder, value))
        im.load()
        assert_upright(im, LABELR_IMAGES[i][2])


# --- prompts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_labelr(tmp_path_factory):
    root = tmp_path_factory.mktemp("arrow_prompt")
    return write_input(
        root / "in",
        [row("a", "a.jpg"), row("b", "b.png")],
        {"a.jpg": imagegen.oriented(6), "b.png": imagegen.png()},
    )


def test_system_prompt_and_json_schema_template(small_labelr, tmp_path):
    system = "You are a careful assistant. Réponds en JSON."
    out = tmp_path / "out"
    assert (
        convert_arrow(small_labelr, out, "--system-prompt", system, "--prompt-template", "json-schema") == 0
    )
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == 2
    want_user = INSTRUCTIONS + "\n\n" + SCHEMA_SENTENCE + "\n" + COMPACT_SCHEMA + "\n" + TOKEN
    for sample in ds:
        turns = sample["conversations"]
        assert [t["role"] for t in turns] == ["system", "user", "assistant"]
        assert turns[0]["content"] == system
        assert turns[1]["content"] == want_user
        assert json.loads(turns[1]["content"].rsplit("\n", 2)[1]) == SCHEMA
        assert turns[2]["content"] == GOOD_OUTPUT_COMPACT
        assert count_tokens(sample) == 1


def test_custom_token_and_template(small_labelr, tmp_path):
    out = tmp_path / "out"
    code = convert_arrow(
        small_labelr,
        out,
        "--attachment-token",
        "<image>",
        "--prompt-template",
        "Task: {instructions} | schema={json_schema}",
    )
    assert code == 0
    ds = datasets.load_from_disk(str(out))
    for sample in ds:
        user = sample["conversations"][0]
        assert user["role"] == "user"
        assert user["content"] == "Task: " + INSTRUCTIONS + " | schema=" + COMPACT_SCHEMA + "\n<image>"
        assert TOKEN not in user["content"]
        assert count_tokens(sample, "<image>") == len(sample["modalities"]) == 1


def test_attachment_position_before(small_labelr, tmp_path):
    out = tmp_path / "out"
    assert (
        convert_arrow(
            small_labelr, out, "--attachment-position", "before", "--prompt-template", "json-schema"
        )
        == 0
    )
    for sample in datasets.load_from_disk(str(out)):
        user = sample["conversations"][0]["content"]
        assert user == TOKEN + "\n" + INSTRUCTIONS + "\n\n" + SCHEMA_SENTENCE + "\n" + COMPACT_SCHEMA


# ---------------------------------------------------------------------------------------------
# the trainer's own JSONL: several images per sample, pretraining text, rejects
# ---------------------------------------------------------------------------------------------

# Each picture has its own size, so the order of the modalities shows in the decoded sizes.
MULTI_IMAGES = {
    "pics/a_rot6.jpg": (imagegen.oriented(6, size=(64, 48)), (64, 48)),
    "pics/b_rot8.png": (imagegen.oriented(8, "PNG", size=(80, 40)), (80, 40)),
    "pics/c_rot3.jpg": (imagegen.oriented(3, size=(48, 64)), (48, 64)),
    "pics/d_plain.png": (imagegen.png(size=(96, 72)), (96, 72)),
}


def trainer_rows() -> list:
    return [
        {  # line 1: two images, tokens in two turns, a system turn
            "id": "two",
            "conversations": [
                {"role": "system", "content": "Compare images."},
                {"role": "user", "content": f"First {TOKEN} then {TOKEN}: which is bigger?"},
                {"role": "assistant", "content": "The second."},
            ],
            "modalities": [
                {"type": "image", "value": "pics/a_rot6.jpg"},
                {"type": "image", "value": "pics/b_rot8.png"},
            ],
        },
        {  # line 2: three images, no id -> line-2
            "conversations": [
                {"role": "user", "content": f"{TOKEN}{TOKEN}{TOKEN}\nDescribe."},
                {"role": "assistant", "content": "Three quadrant pictures."},
            ],
            "modalities": [
                {"type": "image", "value": "pics/c_rot3.jpg"},
                {"type": "image", "value": "pics/d_plain.png"},
                {"type": "image", "value": "pics/a_rot6.jpg"},
            ],
        },
        {  # line 3: token count 1 != 2 images -> manifest
            "id": "mismatch",
            "conversations": [
                {"role": "user", "content": f"{TOKEN} only one"},
                {"role": "assistant", "content": "x"},
            ],
            "modalities": [
                {"type": "image", "value": "pics/a_rot6.jpg"},
                {"type": "image", "value": "pics/b_rot8.png"},
            ],
        },
        {  # line 4: second image missing -> fetch
            "image_id": "half-missing",
            "conversations": [
                {"role": "user", "content": f"{TOKEN}{TOKEN}"},
                {"role": "assistant", "content": "x"},
            ],
            "modalities": [
                {"type": "image", "value": "pics/a_rot6.jpg"},
                {"type": "image", "value": "pics/gone.jpg"},
            ],
        },
        {  # line 5: one image
            "id": "one",
            "conversations": [
                {"role": "user", "content": f"{TOKEN}\nWhat colour is top-left?"},
                {"role": "assistant", "content": "Red."},
            ],
            "modalities": [{"type": "image", "value": "pics/d_plain.png"}],
        },
        {  # line 6: two tokens, zero images -> manifest
            "id": "no-images",
            "conversations": [
                {"role": "user", "content": f"{TOKEN}{TOKEN}"},
                {"role": "assistant", "content": "x"},
            ],
            "modalities": [],
        },
    ]


# in output order: (sizes of the images, conversations of the input row)
TRAINER_EXPECTED = [
    ([(64, 48), (80, 40)], trainer_rows()[0]["conversations"]),
    ([(48, 64), (96, 72), (64, 48)], trainer_rows()[1]["conversations"]),
    ([(96, 72)], trainer_rows()[4]["conversations"]),
]
TRAINER_REJECTS = [(3, "mismatch", "manifest"), (4, "half-missing", "fetch"), (6, "no-images", "manifest")]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """The manifest lives in its own folder; the images resolve through --base-path."""
    root = tmp_path_factory.mktemp("arrow_trainer")
    base = root / "data"
    for rel, (data, _) in MULTI_IMAGES.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    manifest = write_jsonl(root / "manifests" / "train.jsonl", trainer_rows())
    outs = {}
    for variant, extra in (("raw", ()), ("fs", ("--images-as-paths",))):
        out = root / variant
        assert arrow(manifest, out, "--base-path", str(base), *extra) == 0
        outs[variant] = out
    return outs


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_trainer_jsonl_multi_image_round_trip(trainer, variant):
    out = trainer[variant]
    assert_save_to_disk_folder(out, len(TRAINER_EXPECTED), raw=variant == "raw")
    assert not (out / "config.json").exists()
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == len(TRAINER_EXPECTED)
    for sample, (sizes, turns) in zip(ds, TRAINER_EXPECTED):
        assert sample["conversations"] == turns, "trainer conversations must pass through unchanged"
        assert [m["type"] for m in sample["modalities"]] == ["image"] * len(sizes)
        assert count_tokens(sample) == len(sample["modalities"]) == len(sizes)
        for m, size in zip(sample["modalities"], sizes):
            if variant == "raw":
                im = raw_value_image(m["value"])
            else:
                assert m["value"].startswith("images/")
                im = Image.open(out / m["value"])
                im.load()
            assert_upright(im, size)
    if variant == "fs":
        referenced = {m["value"] for s in ds for m in s["modalities"]}
        assert len(referenced) == sum(len(s) for s, _ in TRAINER_EXPECTED), (
            "images of one sample share a file"
        )
        assert {f"images/{p.name}" for p in (out / "images").iterdir()} == referenced


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_trainer_jsonl_rejects(trainer, variant):
    out = trainer[variant]
    rej = rejects(out)
    assert [(r["line"], r["image_id"], r["stage"]) for r in rej] == TRAINER_REJECTS
    assert "pics/gone.jpg" in rej[1]["reason"] or "gone.jpg" in rej[1]["reason"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_input_rows"] == 6
    assert stats["num_written"] == 3
    assert stats["num_rejected"] == 3
    if variant == "fs":  # a rejected sample leaves no image file behind
        assert len(list((out / "images").iterdir())) == 6


def test_trainer_jsonl_base_path_defaults_to_the_manifest_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.jpg").write_bytes(imagegen.oriented(6))
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "id": "x",
                "conversations": [{"role": "user", "content": TOKEN}, {"role": "assistant", "content": "y"}],
                "modalities": [{"type": "image", "value": "sub/p.jpg"}],
            },
        ],
    )
    out = tmp_path / "out"
    assert arrow(manifest, out) == 0
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == 1
    assert_upright(raw_value_image(ds[0]["modalities"][0]["value"]), (64, 48))
    assert rejects(out) == []


def test_pretraining_text_rows(tmp_path):
    base = tmp_path / "in"
    (base / "p").mkdir(parents=True)
    (base / "p" / "r6.jpg").write_bytes(imagegen.oriented(6))
    (base / "p" / "wide.png").write_bytes(imagegen.png(size=(80, 40)))
    texts = [
        f"A caption {TOKEN} and another {TOKEN} — fin.",
        f"{TOKEN} one picture",
        "no picture at all",
    ]
    manifest = write_jsonl(
        base / "pre.jsonl",
        [
            {
                "text": texts[0],
                "modalities": [
                    {"type": "image", "value": "p/r6.jpg"},
                    {"type": "image", "value": "p/wide.png"},
                ],
            },
            {"text": texts[1], "modalities": [{"type": "image", "value": "p/wide.png"}]},
            {"text": texts[2], "modalities": []},
            {"text": f"{TOKEN}", "modalities": []},  # line 4: mismatch
        ],
    )
    for variant, extra in (("raw", ()), ("fs", ("--images-as-paths",))):
        out = tmp_path / variant
        assert arrow(manifest, out, *extra) == 0
        assert_save_to_disk_folder(out, 3, raw=variant == "raw", text_column="text")
        ds = datasets.load_from_disk(str(out))
        assert ds.column_names == ["text", "modalities"]
        assert ds["text"] == texts
        sizes = [[(64, 48), (80, 40)], [(80, 40)], []]
        for sample, want in zip(ds, sizes):
            assert count_tokens(sample) == len(sample["modalities"]) == len(want)
            for m, size in zip(sample["modalities"], want):
                im = raw_value_image(m["value"]) if variant == "raw" else Image.open(out / m["value"])
                assert_upright(im, size)
        assert [(r["line"], r["image_id"], r["stage"]) for r in rejects(out)] == [(4, "line-4", "manifest")]


# ---------------------------------------------------------------------------------------------
# unsafe ids stay inside OUT
# ---------------------------------------------------------------------------------------------

# Relative escapes, dot names, backslashes. Absolute ids are added per test as paths inside the
# test's own tmp dir: a broken engine then writes where the walk below sees it, never into /etc.
EVIL_IDS = ["../../x", "..", ".", "a/../../../b", "..\\..\\w", "images/../../y", "~/home", "ok.jpg"]


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_path_traversal_ids_stay_inside_out(tmp_path, variant):
    # like `/etc/passwd`, but a target that this test can watch
    absolute = [str(tmp_path / "etc" / "passwd"), str(tmp_path / "abs")]
    ids = EVIL_IDS + absolute
    images = {"pic.jpg": imagegen.oriented(6)}
    rows = [row(i, "pic.jpg") for i in ids]
    rows.append(row("nul\x00id", "pic.jpg"))  # rejected at manifest
    trainer_rows_ = [  # the same kind of ids through the trainer-style JSONL
        {
            "id": "../../t",
            "conversations": [{"role": "user", "content": TOKEN}, {"role": "assistant", "content": "."}],
            "modalities": [{"type": "image", "value": "pic.jpg"}],
        },
        {
            "image_id": str(tmp_path / "abs2" / "t"),
            "conversations": [{"role": "user", "content": TOKEN * 2}, {"role": "assistant", "content": "."}],
            "modalities": [{"type": "image", "value": "pic.jpg"}, {"type": "image", "value": "pic.jpg"}],
        },
    ]
    # OUT sits a few levels down, so that `../../x` from OUT/images lands inside tmp_path
    inp = write_input(tmp_path / "in", rows, images)
    tmanifest = write_jsonl(tmp_path / "in" / "trainer.jsonl", trainer_rows_)
    out = tmp_path / "deep" / "er" / "out"
    out2 = tmp_path / "deep" / "er" / "out2"
    extra = ("--images-as-paths",) if variant == "fs" else ()
    snapshot = all_files(tmp_path)
    assert convert_arrow(inp, out, *extra) == 0
    assert arrow(tmanifest, out2, *extra) == 0

    created = all_files(tmp_path) - snapshot
    outside = sorted(str(p) for p in created if not (p.is_relative_to(out) or p.is_relative_to(out2)))
    assert outside == [], f"files written outside OUT: {outside}"
    for d in (out, out2):
        for p in all_files(d):
            assert p.resolve().is_relative_to(d.resolve()), p
            if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"):
                assert p.parent == d / "images", f"image file outside OUT/images: {p}"

    rej = rejects(out)
    assert [(r["line"], r["stage"]) for r in rej] == [(len(ids) + 1, "manifest")]
    assert "\x00" not in (rej[0]["image_id"] or "")
    assert rejects(out2) == []

    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == len(ids)
    ds2 = datasets.load_from_disk(str(out2))
    assert ds2.num_rows == 2
    if variant == "fs":
        values = [m["value"] for s in ds for m in s["modalities"]]
        values2 = [m["value"] for s in ds2 for m in s["modalities"]]
        assert len(set(values)) == len(ids), f"distinct ids must get distinct files: {values}"
        assert len(set(values2)) == 3
        for d, vals in ((out, values), (out2, values2)):
            for v in vals:
                assert re.fullmatch(r"images/[^/\\]+", v), v
                assert not v.split("/", 1)[1].startswith("."), f"hidden or dot file name: {v}"
                p = (d / v).resolve()
                assert p.parent == (d / "images").resolve()
                with Image.open(p) as im:
                    im.load()
                    assert_upright(im, (64, 48))
            assert len(list((d / "images").iterdir())) == len(vals)
    else:
        assert not (out / "images").exists()
        for s in ds:
            assert_upright(raw_value_image(s["modalities"][0]["value"]), (64, 48))


# ---------------------------------------------------------------------------------------------
# several outputs, several splits
# ---------------------------------------------------------------------------------------------


def test_concatenate_two_outputs(labelr, trainer):
    a = datasets.load_from_disk(str(labelr["raw"]))
    b = datasets.load_from_disk(str(trainer["raw"]))
    both = datasets.concatenate_datasets([a, b])
    assert both.num_rows == a.num_rows + b.num_rows == len(LABELR_IMAGES) + len(TRAINER_EXPECTED)
    assert both.features == a.features == b.features
    sizes = [s for _, _, s in LABELR_IMAGES] + [s for sizes, _ in TRAINER_EXPECTED for s in sizes]
    got = [raw_value_image(m["value"]).size for sample in both for m in sample["modalities"]]
    assert got == sizes
    for sample in both:
        assert count_tokens(sample) == len(sample["modalities"])

    fa = datasets.load_from_disk(str(labelr["fs"]))
    fb = datasets.load_from_disk(str(trainer["fs"]))
    fboth = datasets.concatenate_datasets([fa, fb])
    assert fboth.num_rows == fa.num_rows + fb.num_rows
    assert fboth.features == fa.features


def test_dataset_dict_with_train_and_test(tmp_path):
    images = {"r6.jpg": imagegen.oriented(6), "r8.png": imagegen.oriented(8, "PNG"), "p.jpg": imagegen.jpeg()}
    rows = [
        row("tr0", "r6.jpg", split="train"),
        row("te0", "r8.png", split="test"),
        row("tr1", "p.jpg"),  # no split key: --split default train
        row("te1", "r6.jpg", split="test"),
        row("tr2", "r8.png", split="train"),
        row("te-missing", "nope.jpg", split="test"),
    ]
    inp = write_input(tmp_path / "in", rows, images)
    for variant, extra in (("raw", ()), ("fs", ("--images-as-paths",))):
        out = tmp_path / variant
        assert convert_arrow(inp, out, "--shard-rows", "2", *extra) == 0
        dd = json.loads((out / "dataset_dict.json").read_text())
        assert sorted(dd["splits"]) == ["test", "train"]
        assert not list(out.glob("data-*.arrow")), "a DatasetDict keeps its shards in the split folders"
        assert_save_to_disk_folder(out / "train", 3, raw=variant == "raw")
        assert_save_to_disk_folder(out / "test", 2, raw=variant == "raw")
        assert json.loads((out / "train" / "state.json").read_text())["_split"] == "train"
        assert json.loads((out / "test" / "state.json").read_text())["_split"] == "test"
        assert len(shards(out / "train")) == 2
        loaded = datasets.load_from_disk(str(out))
        assert isinstance(loaded, datasets.DatasetDict)
        assert sorted(loaded) == ["test", "train"]
        assert loaded["train"].num_rows == 3 and loaded["test"].num_rows == 2
        for split in ("train", "test"):
            for sample in loaded[split]:
                m = sample["modalities"][0]
                if variant == "raw":
                    im = raw_value_image(m["value"])
                else:
                    # relative to OUT (the documented contract); resolve it and insist it exists
                    im = Image.open(out / m["value"])
                assert_upright(im, (64, 48))
                assert count_tokens(sample) == 1
        assert [(r["image_id"], r["stage"]) for r in rejects(out)] == [("te-missing", "fetch")]


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def determinism_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("arrow_det")
    images = {
        "rot6.jpg": imagegen.oriented(6),
        "rot7.png": imagegen.oriented(7, "PNG"),
        "plain.jpg": imagegen.jpeg(),
        "noise.jpg": imagegen.noise_jpeg((96, 64), seed=3),
        "big.jpg": imagegen.jpeg((1500, 1000)),
    }
    names = sorted(images)
    rows = [row(f"id_{i:02d}", names[i % len(names)], barcode=str(1000 + i)) for i in range(13)]
    rows.insert(4, row("missing", "nope.jpg"))
    return write_input(root / "in", rows, images)


def folder_hashes(out: Path) -> dict[str, str]:
    files = [
        p
        for p in all_files(out)
        if p.suffix == ".arrow" or p.name in ("state.json", "dataset_info.json") or p.parent.name == "images"
    ]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_local_workers_give_identical_shards(determinism_input, tmp_path, variant):
    extra = ("--shard-rows", "3") + (("--images-as-paths",) if variant == "fs" else ())
    assert convert(determinism_input, tmp_path / "w1", "--layout", "arrow", "--workers", "1", *extra) == 0
    assert convert(determinism_input, tmp_path / "w2", "--layout", "arrow", "--workers", "2", *extra) == 0
    h1, h2 = folder_hashes(tmp_path / "w1"), folder_hashes(tmp_path / "w2")
    assert len([k for k in h1 if k.endswith(".arrow")]) == 5  # 13 rows, 3 per shard
    assert h1 == h2
    assert (tmp_path / "w1" / "rejects.jsonl").read_bytes() == (
        tmp_path / "w2" / "rejects.jsonl"
    ).read_bytes()


@pytest.mark.ray
@pytest.mark.parametrize("variant", ["raw", "fs"])
def test_ray_workers_give_identical_arrow_shards(determinism_input, tmp_path, ray_instance, variant):
    extra = ("--layout", "arrow", "--shard-rows", "3") + (("--images-as-paths",) if variant == "fs" else ())
    assert convert(determinism_input, tmp_path / "r1", *extra, "--workers", "1", runner="ray") == 0
    assert convert(determinism_input, tmp_path / "r2", *extra, "--workers", "2", runner="ray") == 0
    assert convert(determinism_input, tmp_path / "local", *extra) == 0
    h1, h2, hl = (folder_hashes(tmp_path / d) for d in ("r1", "r2", "local"))
    arrows = sorted(k for k in h1 if k.endswith(".arrow"))
    assert len(arrows) == 5
    assert h1 == h2 == hl
    for name in arrows:  # and every one of them is an IPC stream
        assert read_stream(tmp_path / "r2" / name).num_rows in (1, 2, 3)
    ds = datasets.load_from_disk(str(tmp_path / "r2"))
    assert ds.num_rows == 13
    assert (tmp_path / "r1" / "rejects.jsonl").read_bytes() == (
        tmp_path / "r2" / "rejects.jsonl"
    ).read_bytes()

"""``--layout messages`` (issue 22): Hub-ready Parquet in the shape of TRL's vision SFT datasets
(HuggingFaceH4/llava-instruct-mix-vsft): ``messages`` of text and image parts, and ``images``."""

from __future__ import annotations

import json

import imagegen
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import CONFIG_BYTES, GOOD_OUTPUT, run_main, write_input

TOKEN = "<|reserved_special_token_0|>"
# The features of HuggingFaceH4/llava-instruct-mix-vsft, as its dataset card on the Hub records them
# (the dataset TRL's vsft_llava / sft_vlm examples train on).
LLAVA_INSTRUCT_MIX_VSFT = """
- name: messages
  list:
  - name: content
    list:
    - name: index
      dtype: int64
    - name: text
      dtype: string
    - name: type
      dtype: string
  - name: role
    dtype: string
- name: images
  sequence: image
"""


def _convert(inp, out, *extra: str) -> int:
    return run_main(
        [
            "convert",
            "--manifest",
            str(inp.manifest),
            "--config",
            str(inp.config),
            "--out",
            str(out),
            "--layout",
            "messages",
            "--runner",
            "local",
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture
def labelr(tmp_path):
    images = {"a.jpg": imagegen.jpeg((64, 48)), "b.png": imagegen.png((40, 30), mode="RGBA")}
    rows = [
        {"image_id": f"r{i}", "image_path": ["a.jpg", "b.png"][i % 2], "output": GOOD_OUTPUT}
        for i in range(5)
    ]
    rows.append({"image_id": "bad", "image_path": "a.jpg", "output": {"price": "free"}})
    return write_input(tmp_path / "in", rows, images), images


def test_labelr_rows_load_with_datasets_in_the_llava_instruct_mix_shape(labelr, tmp_path):
    from datasets import Features, load_dataset

    inp, images = labelr
    out = tmp_path / "out"
    assert _convert(inp, out, "--image-format", "keep") == 0
    ds = load_dataset(str(out), split="train")
    assert ds.features == Features._from_yaml_list(yaml.safe_load(LLAVA_INSTRUCT_MIX_VSFT))
    assert ds.num_rows == 5
    instructions = json.loads(CONFIG_BYTES)["instructions"]
    row = ds[1]
    assert row["messages"] == [
        {
            "role": "user",
            "content": [
                {"index": None, "text": instructions, "type": "text"},
                {"index": 0, "text": None, "type": "image"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"index": None, "text": json.dumps(GOOD_OUTPUT, separators=(",", ":")), "type": "text"}
            ],
        },
    ]
    (image,) = row["images"]
    assert image.size == (40, 30) and image.mode == "RGBA"
    assert ds.with_format("arrow")[0]["images"][0][0]["bytes"].as_py() == images["a.jpg"]  # passed through
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["image_id"], r["stage"]) for r in rejects] == [("bad", "validate")]
    assert (out / "config.json").read_bytes() == CONFIG_BYTES


def test_system_prompt_and_prompt_template(labelr, tmp_path):
    from datasets import load_dataset

    inp, _ = labelr
    out = tmp_path / "out"
    assert (
        _convert(
            inp,
            out,
            "--system-prompt",
            "Be exact.",
            "--prompt-template",
            "Read: {instructions}",
            "--attachment-position",
            "before",
        )
        == 0
    )
    messages = load_dataset(str(out), split="train")[0]["messages"]
    instructions = json.loads(CONFIG_BYTES)["instructions"]
    assert messages[0] == {
        "role": "system",
        "content": [{"index": None, "text": "Be exact.", "type": "text"}],
    }
    assert messages[1]["content"] == [
        {"index": 0, "text": None, "type": "image"},
        {"index": None, "text": f"Read: {instructions}", "type": "text"},
    ]


def test_trainer_rows_keep_their_turns_with_each_image_where_its_token_stood(tmp_path):
    from datasets import load_dataset

    images = {"a.jpg": imagegen.jpeg((64, 48)), "b.png": imagegen.png((40, 30))}
    turns = [
        {"role": "user", "content": f"Compare {TOKEN}\nwith {TOKEN}, please."},
        {"role": "assistant", "content": "Same."},
    ]
    rows = [
        {
            "id": "t0",
            "conversations": turns,
            "modalities": [{"type": "image", "value": "a.jpg"}, {"type": "image", "value": "b.png"}],
        },
        # bad input: one token, two images; a pretraining text row has no turns
        {
            "id": "t1",
            "conversations": [{"role": "user", "content": f"{TOKEN} one"}],
            "modalities": [{"type": "image", "value": "a.jpg"}, {"type": "image", "value": "b.png"}],
        },
        {"id": "t2", "text": f"{TOKEN} caption", "modalities": [{"type": "image", "value": "a.jpg"}]},
    ]
    inp = write_input(tmp_path / "in", rows, images, manifest_name="trainer.jsonl")
    out = tmp_path / "out"
    assert (
        run_main(
            [
                "convert",
                "--manifest",
                str(inp.manifest),
                "--out",
                str(out),
                "--layout",
                "messages",
                "--runner",
                "local",
                "--quiet",
            ]
        )
        == 0
    )
    ds = load_dataset(str(out), split="train")
    assert ds.num_rows == 1
    assert ds[0]["messages"] == [
        {
            "role": "user",
            "content": [
                {"index": None, "text": "Compare", "type": "text"},
                {"index": 0, "text": None, "type": "image"},
                {"index": None, "text": "with", "type": "text"},
                {"index": 1, "text": None, "type": "image"},
                {"index": None, "text": ", please.", "type": "text"},
            ],
        },
        {"role": "assistant", "content": [{"index": None, "text": "Same.", "type": "text"}]},
    ]
    assert [im.size for im in ds[0]["images"]] == [(64, 48), (40, 30)]
    rejects = {r["image_id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects["t1"]["stage"] == "manifest"
    assert rejects["t1"]["reason"] == f"1 attachment token(s) {TOKEN!r} in the turns but 2 image(s)"
    assert "needs 'conversations'" in rejects["t2"]["reason"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_input_rows"] == 3 and stats["num_written"] == 1 and stats["num_rejected"] == 2


def test_parquet_care_row_groups_uncompressed_images_cdc_and_card(labelr, tmp_path):
    from datasets import Features

    inp, _ = labelr
    out = tmp_path / "out"
    assert _convert(inp, out, "--row-group-rows", "2", "--shard-rows", "4") == 0
    files = sorted((out / "data").glob("*.parquet"))
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    f = pq.ParquetFile(files[0])
    assert [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [2, 2]
    assert b"content_defined_chunking" in f.metadata.metadata
    columns = {
        f.metadata.row_group(0).column(i).path_in_schema: f.metadata.row_group(0).column(i)
        for i in range(f.metadata.num_columns)
    }
    image_bytes = columns["images.list.element.bytes"]
    assert image_bytes.compression == "UNCOMPRESSED"
    assert not any("DICTIONARY" in e for e in image_bytes.encodings)
    assert columns["messages.list.element.content.list.element.text"].compression == "ZSTD"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    assert Features._from_yaml_list(front["dataset_info"]["features"]) == Features._from_yaml_list(
        yaml.safe_load(LLAVA_INSTRUCT_MIX_VSFT)
    )
    assert "image-text-to-text" in front["tags"]


def test_rows_render_through_a_chat_template(labelr, tmp_path):
    """Each row goes through transformers' own chat-template code (a tiny tokenizer built here,
    no Hub), with a LLaVA-style template that writes <image> for an image part."""
    transformers = pytest.importorskip("transformers")
    from datasets import load_dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    inp, _ = labelr
    out = tmp_path / "out"
    assert _convert(inp, out) == 0
    template = (
        "{% for m in messages %}{{ m['role'] | upper }}: {% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
        "{{ '\\n' }}{% endfor %}"
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), chat_template=template
    )
    instructions = json.loads(CONFIG_BYTES)["instructions"]
    output = json.dumps(GOOD_OUTPUT, separators=(",", ":"))
    for row in load_dataset(str(out), split="train"):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert text == f"USER: {instructions}<image>\nASSISTANT: {output}\n"
        assert text.count("<image>") == len(row["images"])


def test_update_and_inspect_of_a_messages_dataset(labelr, tmp_path, capsys):
    """engine update cannot change this layout yet (a list of images per row): it says so in one
    line, exit 2, and nothing is changed. engine inspect reads it (tests/test_inspect_messages.py)."""
    inp, _ = labelr
    out = tmp_path / "out"
    assert _convert(inp, out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    delete = tmp_path / "delete.txt"
    delete.write_text("r1\n")
    capsys.readouterr()
    assert run_main(["update", str(out), "--delete", str(delete), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot change a --layout messages dataset" in err[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run_main(["inspect", str(out), "--quiet"]) == 0
    assert "Parquet (engine messages), 5 rows, 5 images" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

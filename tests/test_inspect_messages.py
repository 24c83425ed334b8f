"""``engine inspect`` and ``engine check`` on the messages layout (``--layout messages``): every
image of every row, outputs from the assistant turn, the conversation in the samples, leakage by
pixels and perceptual hash, and image parts against the images list."""

from __future__ import annotations

import contextlib
import io
import json

import imagegen
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import CHROMIUM, Browser
from conftest import convert, row, run_main, write_input

from engine.inspect.report import inspect_dataset, write_report


def noise(seed: int, quality: int = 90) -> bytes:
    return imagegen.noise_jpeg((128, 96), seed=seed, quality=quality)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def messages_out(tmp_path_factory):
    """A labelr manifest -> messages: train 6 rows, test 3, one test image the same file as a
    train one (exact leak), one a re-compressed copy of another (near leak), one row rejected."""
    root = tmp_path_factory.mktemp("msg")
    images = {f"img/{i}.jpg": noise(i) for i in range(8)}
    images["img/near.jpg"] = noise(3, quality=60)
    rows = [
        row(f"id{i}", f"img/{i}.jpg", output={"price": float(i), "currency": "EUR" if i % 2 else "USD"})
        for i in range(6)
    ]
    rows += [
        row("t7", "img/7.jpg", split="test"),
        row("copy-of-id1", "img/1.jpg", split="test"),
        row("near-id3", "img/near.jpg", split="test"),
        row("bad", "img/nope.jpg"),
    ]
    inp = write_input(root / "in", rows, images)
    out = root / "out"
    assert convert(inp, out, "--layout", "messages") == 0
    return out


def test_inspect_messages_counts_outputs_samples_and_leakage(messages_out):
    code, text, _ = cli("inspect", str(messages_out), "--quiet", "--samples", "4")
    assert code == 0, text
    assert "Parquet (engine messages)" in text and "image-part mismatches: 0" in text
    r = inspect_dataset(str(messages_out), samples=4).result
    assert {k: (v.num_rows, v.num_images) for k, v in r.splits.items()} == {"train": (6, 6), "test": (3, 3)}
    assert r.formats == {"JPEG": 9} and sorted(set(r.widths)) == [128]
    # the assistant turn is the output, checked against config.json's schema
    assert r.num_outputs == 9 and r.num_invalid_outputs == 0
    assert r.properties["price"].num_numbers == 9
    assert r.properties["currency"].values["EUR"] == 3 + 3  # the test rows: GOOD_OUTPUT
    sample = r.samples[0]
    assert sample.thumbnail and [t["role"] for t in sample.conversation] == ["user", "assistant"]
    assert sample.conversation[0]["content"].endswith("<image 0>")
    assert json.loads(sample.output) == json.loads(sample.conversation[1]["content"])
    leak = r.leakage
    assert len(leak.exact_cross) == 1 and not leak.has_ids  # no image_id column: rows by position
    assert {s for s, _ in leak.exact_cross[0].members} == {"train", "test"}
    assert leak.near_cross and r.num_token_mismatches == 0


def test_check_messages_names_the_leaking_rows(messages_out):
    code, out, _ = cli("check", str(messages_out), "--quiet")
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2, lines
    assert "identical pixels" in lines[0] and "train/train[train-00000-of-00001.parquet:1]" in lines[0]
    assert "test/test[test-00000-of-00001.parquet:1]" in lines[0]
    assert "near-duplicate" in lines[1]
    code, out, _ = cli("check", str(messages_out), "--quiet", "--allow-near-duplicates")
    assert code == 1 and len(out.splitlines()) == 1


def test_check_clean_multi_image_messages_dataset_passes(tmp_path):
    """A LLaVA file with a two-image row: every image is counted, and a clean dataset exits 0
    (no config.json needed: TRL-style trainers read the turns)."""
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(noise(20 + i))
    samples = [
        {"id": "one", "image": "0.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "Noise."}]},
        {"id": "two", "images": ["1.jpg", "2.jpg"],
         "conversations": [{"from": "human", "value": "<image> and <image>: same?"},
                           {"from": "gpt", "value": "No."}]},
    ]  # fmt: skip
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(samples))
    out = tmp_path / "out"
    argv = ["convert", "--manifest", str(path), "--out", str(out), "--base-path", str(tmp_path / "imgs")]
    assert run_main([*argv, "--layout", "messages", "--runner", "local", "--quiet"]) == 0
    r = inspect_dataset(str(out)).result
    assert r.splits["train"].num_rows == 2 and r.splits["train"].num_images == 3
    assert r.num_token_mismatches == 0
    convs = {s.conversation[-1]["content"]: s.conversation for s in r.samples}
    assert convs["No."][0]["content"] == "<image 0>\nand\n<image 1>\n: same?"
    assert cli("check", str(out), "--quiet") == (0, "", "")


def test_check_broken_messages_dataset_one_line_per_problem(messages_out, tmp_path):
    """Rewrite the train shard: row 0 gets a second image without a part, row 2's output breaks
    the schema, row 4's image does not decode."""
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(messages_out, out)
    shard = out / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[0]["images"].append(rows[1]["images"][0])
    rows[2]["messages"][1]["content"][0]["text"] = '{"price": "cheap", "currency": "EUR"}'
    rows[4]["images"][0]["bytes"] = rows[4]["images"][0]["bytes"][:200]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard, write_page_index=True)
    code, text, _ = cli("check", str(out), "--quiet", "--allow-near-duplicates")
    lines = text.splitlines()
    assert code == 1, text
    by_kind = {k: [line for line in lines if k in line] for k in ("validate", "decode", "image parts")}
    assert all(len(v) == 1 for v in by_kind.values()), lines
    assert by_kind["validate"][0].startswith("1 outputs do not validate")
    assert "train[train-00000-of-00001.parquet:2]" in by_kind["validate"][0]
    assert by_kind["decode"][0].startswith("1 images do not decode")
    assert "train[train-00000-of-00001.parquet:4]" in by_kind["decode"][0]
    assert by_kind["image parts"][0].startswith("1 rows' image parts do not match their images")
    assert (
        "train[train-00000-of-00001.parquet:0]: 1 image part(s) for 2 image(s)" in by_kind["image parts"][0]
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/install.sh installs it)")
def test_messages_report_in_a_browser(messages_out, tmp_path):
    page = tmp_path / "report.html"
    write_report(inspect_dataset(str(messages_out), samples=4), str(page))
    with Browser() as b:
        b.load(page.as_uri())
        images = b.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
        cards = b.evaluate("[...document.querySelectorAll('#samples .card pre')].map(e => e.textContent)")
        assert b.problems() == []
    assert len(images) >= 4 + 5 and all(done and width > 0 for done, width in images), images
    assert len(cards) == 4 and all("user:" in c and "<image 0>" in c and "assistant:" in c for c in cards)


def test_hub_messages_dataset_built_with_datasets_and_bad_image_indexes(tmp_path):
    """A messages dataset written by ``datasets`` (no engine sidecars), as on the Hub: inspected
    as such; an image part naming no image, or two parts naming one, fail the check."""
    import datasets

    from engine.layouts.messages import messages_features

    def sample(seed: int, indexes: list[int], num_images: int) -> dict:
        parts = [{"index": i, "text": None, "type": "image"} for i in indexes]
        parts.append({"index": None, "text": "What is it?", "type": "text"})
        answer = [{"index": None, "text": "Noise.", "type": "text"}]
        return {
            "messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}],
            "images": [{"bytes": noise(seed + k), "path": None} for k in range(num_images)],
        }

    rows = [sample(30, [0], 1), sample(40, [0, 1], 2), sample(50, [0, 2], 2), sample(60, [0, 0], 2)]
    rows.append({**sample(70, [0], 1), "images": [None]})  # a null image in the list
    (tmp_path / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=messages_features()).to_parquet(
        str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    )
    insp = inspect_dataset(str(tmp_path / "hub"))
    assert insp.summary.layout == "Parquet (Hugging Face, messages)"
    assert insp.result.splits["train"].num_images == 8 and insp.result.num_outputs == 5
    code, text, _ = cli("check", str(tmp_path / "hub"), "--quiet")
    missing, parts = text.splitlines()
    assert code == 1, text
    assert parts.startswith("2 rows' image parts do not match their images: ")
    assert ":2]: image part indexes [0, 2] do not each name one of the 2 image(s)" in parts
    assert ":3]: image part indexes [0, 0]" in parts and ":1]" not in parts
    assert missing.startswith("1 images do not decode: ") and ":4]: image bytes missing" in missing

"""``engine inspect`` and ``engine check`` on every layout the engine writes and on plain Hugging
Face Parquet datasets (local, memory://, S3): counts, outputs, samples, leakage, and each check."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import imagegen
import pyarrow.parquet as pq
import pytest
from conftest import CONFIG_BYTES, convert, moto_s3, row, run_main, write_input
from PIL import Image

from engine.check import check_dataset
from engine.inspect.report import inspect_dataset, write_report


def noise(seed: int, quality: int = 90) -> bytes:
    return imagegen.noise_jpeg((128, 96), seed=seed, quality=quality)


def lossless_copies(seed: int) -> tuple[bytes, bytes]:
    """The same pixels as PNG and as lossless WebP: different bytes, identical decoded pixels."""
    im = Image.open(io.BytesIO(noise(seed))).convert("RGB")
    png, webp = io.BytesIO(), io.BytesIO()
    im.save(png, "PNG")
    im.save(webp, "WEBP", lossless=True)
    return png.getvalue(), webp.getvalue()


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def leaky_input(tmp_path_factory):
    """train/test with: the same file in both splits (exact), a re-compressed copy in test (near),
    and otherwise distinct noise images."""
    root = tmp_path_factory.mktemp("leaky")
    images = {f"img/{i}.jpg": noise(i) for i in range(10)}
    images["img/near.jpg"] = noise(3, quality=60)
    rows = [
        row(f"id{i}", f"img/{i}.jpg", output={"price": float(i), "currency": "EUR" if i % 2 else "USD"})
        for i in range(8)
    ]
    rows += [
        row("t8", "img/8.jpg", split="test"),
        row("t9", "img/9.jpg", split="test"),
        row("copy-of-id1", "img/1.jpg", split="test"),
        row("near-id3", "img/near.jpg", split="test"),
        row("bad", "img/nope.jpg"),
    ]
    return write_input(root, rows, images)


@pytest.fixture(scope="module")
def leaky_parquet(leaky_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("leaky-out") / "out"
    assert convert(leaky_input, out) == 0
    return out


def test_inspect_engine_parquet_counts_outputs_and_leakage(leaky_parquet):
    insp = inspect_dataset(str(leaky_parquet), samples=5)
    r, s = insp.result, insp.summary
    assert [(x.name, x.num_rows, x.num_images) for x in s.splits] == [("train", 8, 8), ("test", 4, 4)]
    assert [f.name for f in s.splits[0].files] == ["data/train-00000-of-00001.parquet"]
    assert (
        s.splits[0].files[0].file_bytes
        == (leaky_parquet / "data/train-00000-of-00001.parquet").stat().st_size
    )
    assert r.formats == {"JPEG": 12}
    assert set(r.widths) == {128} and set(r.heights) == {96}
    assert r.num_outputs == 12 and r.num_invalid_outputs == 0
    assert r.properties["price"].present == 12 and sorted(r.properties["price"].numbers)[:2] == [0.0, 1.0]
    assert r.properties["currency"].values == {"EUR": 8, "USD": 4}  # the 4 test rows use GOOD_OUTPUT (EUR)
    assert s.reject_examples["fetch"][0].startswith("line 13 bad:")
    leak = r.leakage
    assert [g.members for g in leak.exact_cross] == [(("train", "id1"), ("test", "copy-of-id1"))]
    assert leak.exact_within == []
    assert [sorted(g.members) for g in leak.near_cross] == [[("test", "near-id3"), ("train", "id3")]]
    assert leak.shared_ids == {}
    assert len(r.samples) == 5 and all(x.thumbnail and x.thumbnail[:2] == b"\xff\xd8" for x in r.samples)
    assert "id1" in insp.text and "1 groups across splits" in insp.text


def test_samples_are_seeded(leaky_parquet):
    def keys(seed):
        return [
            x.key
            for x in inspect_dataset(str(leaky_parquet), samples=4, seed=seed, phash=False).result.samples
        ]

    assert keys(7) == keys(7)
    assert keys(7) != keys(8)


def test_check_fails_on_leakage_and_names_the_rows(leaky_parquet):
    code, out, err = cli("check", str(leaky_parquet), "--quiet")
    assert code == 1
    lines = out.strip().splitlines()
    assert any(
        "more than one split (identical pixels)" in x and "train/id1" in x and "test/copy-of-id1" in x
        for x in lines
    ), lines
    assert any("near-duplicate" in x and "train/id3" in x and "test/near-id3" in x for x in lines), lines
    assert len(lines) == 2, lines


def test_check_allow_near_duplicates_turns_them_into_warnings(leaky_input, tmp_path):
    rows = [json.loads(line) for line in leaky_input.lines if "copy-of-id1" not in line]
    inp = write_input(
        tmp_path / "in",
        rows,
        {
            p.relative_to(leaky_input.root).as_posix(): p.read_bytes()
            for p in (leaky_input.root / "img").iterdir()
        },
    )
    out = tmp_path / "out"
    assert convert(inp, out) == 0
    code, stdout, _ = cli("check", str(out), "--quiet")
    assert code == 1 and "near-duplicate" in stdout
    code, stdout, stderr = cli("check", str(out), "--allow-near-duplicates")
    assert (code, stdout) == (0, "")
    assert "warning: 1 groups of near-duplicate images" in stderr and "train/id3" in stderr


def test_check_clean_engine_dataset_passes(tmp_path):
    images = {f"img/{i}.jpg": noise(100 + i) for i in range(6)}
    inp = write_input(
        tmp_path / "in",
        [row(f"c{i}", f"img/{i}.jpg", split="test" if i > 3 else None) for i in range(6)],
        images,
    )
    out = tmp_path / "out"
    assert convert(inp, out) == 0
    assert cli("check", str(out), "--quiet") == (0, "", "")


@pytest.mark.parametrize("extra", [(), ("--images-as-paths",)], ids=["raw-image", "fs-image"])
def test_inspect_and_check_packed_layouts(leaky_input, tmp_path, extra):
    out = tmp_path / "packed"
    assert convert(leaky_input, out, "--layout", "arrow", *extra) == 0
    assert (out / "dataset_dict.json").exists()
    insp = inspect_dataset(str(out), samples=3)
    r = insp.result
    assert insp.summary.layout == f"packed Arrow (save_to_disk, {'fs-image' if extra else 'raw-image'})"
    assert {k: v.num_rows for k, v in r.splits.items()} == {"train": 8, "test": 4}
    assert r.formats == {"JPEG": 12} and r.num_token_mismatches == 0 and r.num_invalid_outputs == 0
    assert r.attachment_token == "<|reserved_special_token_0|>"
    from engine.inspect.source import open_dataset, row_count

    assert row_count(*open_dataset(str(out))) == 12  # the progress bar's total, from dataset_info.json
    assert r.samples[0].conversation[-1]["role"] == "assistant"
    assert len(r.leakage.exact_cross) == 1 and not r.leakage.has_ids
    result = check_dataset(str(out))
    assert len(result.problems) == 2 and "identical pixels" in result.problems[0], result.problems


def test_packed_token_mismatch_and_bad_output_fail_check(tmp_path):
    import datasets

    token = "<|reserved_special_token_0|>"
    turns = lambda text, answer: [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]  # noqa: E731
    ds = datasets.Dataset.from_dict(
        {
            "conversations": [
                turns(f"{token}\nprice?", '{"price":1}'),
                turns("no token", '{"price":2}'),
                turns(f"{token}\nprice?", '{"price":"x"}'),
            ],
            "modalities": [
                [{"type": "image", "value": {"bytes": noise(s), "path": None}}] for s in (1, 2, 3)
            ],
        }
    )
    ds.save_to_disk(str(tmp_path / "packed"))
    (tmp_path / "packed" / "config.json").write_bytes(CONFIG_BYTES)
    result = check_dataset(str(tmp_path / "packed"))
    assert any(
        p.startswith("1 rows' attachment tokens") and "[data-00000-of-00001.arrow:1]" in p
        for p in result.problems
    ), result.problems
    assert any(p.startswith("1 outputs do not validate") and ":2]" in p for p in result.problems), (
        result.problems
    )


def write_hf_parquet(root: Path, splits: dict[str, list[dict]], *, page_index: bool = True) -> None:
    """A plain Hugging Face Parquet dataset, written by ``datasets`` (no engine involved)."""
    import datasets

    features = datasets.Features(
        {"image_id": datasets.Value("string"), "image": datasets.Image(), "output": datasets.Value("string")}
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        ds = datasets.Dataset.from_list(rows, features=features)
        path = root / "data" / f"{split}-00000-of-00001.parquet"
        if page_index:
            ds.to_parquet(str(path))
        else:
            pq.write_table(ds.data.table, path, write_page_index=False)


def hf_row(image_id: str, data: bytes, output: str = '{"price":1.0}') -> dict:
    return {"image_id": image_id, "image": {"bytes": data, "path": None}, "output": output}


def test_hf_parquet_lossless_reencode_shared_ids_and_bad_rows(tmp_path):
    png, webp = lossless_copies(5)
    write_hf_parquet(
        tmp_path,
        {
            "train": [
                hf_row("a", png),
                hf_row("shared", noise(6)),
                hf_row("broken", b"not an image"),
                hf_row("wrong", noise(7), '{"price":"cheap"}'),
            ],
            "validation": [hf_row("b", webp), hf_row("shared", noise(8))],
        },
    )
    (tmp_path / "config.json").write_bytes(CONFIG_BYTES)
    insp = inspect_dataset(str(tmp_path))
    r = insp.result
    assert r.formats == {"PNG": 1, "JPEG": 3, "WEBP": 1, "undecodable": 1}
    assert [g.members for g in r.leakage.exact_cross] == [(("train", "a"), ("validation", "b"))]
    assert r.leakage.shared_ids == {"shared": ["train", "validation"]}
    # by stored bytes the re-encoded copy is invisible: that is why pixels are hashed
    assert inspect_dataset(str(tmp_path), decode=False).result.leakage.exact_cross == []
    code, out, _ = cli("check", str(tmp_path), "--quiet")
    assert code == 1
    lines = out.splitlines()
    assert not any(x.startswith("README.md") for x in lines)  # without a card the Hub guesses: a warning
    assert (
        "README.md: no dataset card; the Hub will guess the splits from the file names"
        in check_dataset(str(tmp_path)).warnings
    )
    assert any(
        x.startswith("1 outputs do not validate") and "wrong: schema violation at price" in x for x in lines
    )
    assert any(x.startswith("1 images do not decode") and "train/broken" in x for x in lines)
    assert any(x.startswith("1 images are in more than one split") and "validation/b" in x for x in lines)
    assert any(
        x.startswith("1 image_ids are in more than one split: shared (train+validation)") for x in lines
    )


def test_check_hub_rules(leaky_input, tmp_path, monkeypatch):
    rows = [json.loads(line) for line in leaky_input.lines if "test" not in line]
    inp = write_input(
        tmp_path / "in",
        rows,
        {
            p.relative_to(leaky_input.root).as_posix(): p.read_bytes()
            for p in (leaky_input.root / "img").iterdir()
        },
    )
    out = tmp_path / "out"
    assert convert(inp, out) == 0
    assert check_dataset(str(out)).problems == []
    shard = out / "data" / "train-00000-of-00001.parquet"
    # no page index
    table = pq.read_table(shard)
    pq.write_table(table, shard, write_page_index=False)
    problems = check_dataset(str(out)).problems
    assert len(problems) == 1 and problems[0].startswith(
        "data/train-00000-of-00001.parquet: row group 0 has no page index"
    ), problems
    pq.write_table(table, shard, write_page_index=True)
    # the viewer's row group limit (lowered here: a 300 MB row group is too big for a test)
    import engine.check

    monkeypatch.setattr(engine.check, "VIEWER_ROW_GROUP_BYTES", 1000)
    problems = check_dataset(str(out)).problems
    assert problems and re.match(
        r"data/train-00000-of-00001\.parquet: row group 0 is [\d,]+ bytes uncompressed", problems[0]
    )
    monkeypatch.undo()
    # a card whose configs name no file, and a file no config names
    card = (out / "README.md").read_text()
    (out / "README.md").write_text(card.replace("data/train-*", "data/training-*"))
    problems = check_dataset(str(out)).problems
    assert "README.md: config 'default' split 'train': 'data/training-*' matches no data file" in problems
    assert (
        "data/train-00000-of-00001.parquet: not named by any config in README.md, so the Hub ignores it"
        in problems
    )
    (out / "README.md").write_text("---\nconfigs: [unclosed\n---\n")
    assert any(
        p.startswith("README.md: the card's YAML does not parse") for p in check_dataset(str(out)).problems
    )
    (out / "README.md").write_text(card)
    # config.json
    (out / "config.json").write_text(json.dumps({"instructions": "x"}))
    assert check_dataset(str(out)).problems == ["config.json lacks the key(s) 'json_schema'"]
    (out / "config.json").write_text(json.dumps({"instructions": "x", "json_schema": {"type": "nope"}}))
    assert (
        check_dataset(str(out))
        .problems[0]
        .startswith("config.json: 'json_schema' is not a valid JSON Schema")
    )
    (out / "config.json").unlink()
    assert check_dataset(str(out)).problems == [
        "config.json: missing (trainers read the instructions and json_schema from it)"
    ]


def test_inspect_through_fsspec_memory(leaky_parquet):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in leaky_parquet.rglob("*"):
        if path.is_file():
            fs.pipe(f"/leaky/{path.relative_to(leaky_parquet).as_posix()}", path.read_bytes())
    insp = inspect_dataset("memory://leaky", samples=2)
    assert {k: v.num_rows for k, v in insp.result.splits.items()} == {"train": 8, "test": 4}
    assert len(insp.result.leakage.exact_cross) == 1
    write_report(insp, "memory://leaky/report.html")
    assert fs.cat("/leaky/report.html").startswith(b"<!doctype html>")
    assert check_dataset("memory://leaky").problems == check_dataset(str(leaky_parquet)).problems


def test_cli_inspect_html_and_usage_errors(leaky_parquet, tmp_path):
    html = tmp_path / "r.html"
    code, out, err = cli("inspect", str(leaky_parquet), "--html", str(html), "--quiet", "--samples", "3")
    assert code == 0 and err == ""
    assert out.splitlines()[0].startswith(f"{leaky_parquet}: Parquet (engine LLM image-extraction), 12 rows")
    assert out.splitlines()[-1] == f"report: {html}"
    page = html.read_text()
    assert (
        page.count('class="card"') == 3 and page.count('<figure class="plot">') == 6
    )  # 5 image plots + price
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for argv in (["inspect", str(tmp_path / "nope")], ["check"], ["inspect", str(html)]):
        code, out, err = cli(*argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (argv, err)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli("check", str(empty))
    assert code == 2 and "holds no dataset" in err


def test_convert_report_writes_report_html(leaky_input, tmp_path):
    out = tmp_path / "out"
    assert convert(leaky_input, out, "--report") == 0
    page = (out / "report.html").read_text()
    assert 'id="samples"' in page and page.count('class="card"') == 12
    assert check_dataset(str(out)).problems[0].startswith("1 images are in more than one split")


def test_progress_bar_only_without_quiet(leaky_parquet):
    assert cli("inspect", str(leaky_parquet), "--no-decode", "--quiet")[2] == ""
    assert "inspecting" in cli("inspect", str(leaky_parquet), "--no-decode")[2]


def test_inspect_on_s3(leaky_parquet, s3):
    for path in leaky_parquet.rglob("*"):
        if path.is_file():
            s3.put_file(str(path), f"inspect-bucket/leaky/{path.relative_to(leaky_parquet).as_posix()}")
    insp = inspect_dataset("s3://inspect-bucket/leaky", samples=2)
    assert {k: v.num_rows for k, v in insp.result.splits.items()} == {"train": 8, "test": 4}
    assert [g.members for g in insp.result.leakage.exact_cross] == [
        (("train", "id1"), ("test", "copy-of-id1"))
    ]


@pytest.fixture(scope="module")
def s3():
    yield from moto_s3("inspect-bucket")


def test_reference_copy_is_independent(tmp_path, leaky_parquet):
    """inspect reads, never writes: the dataset folder is byte-identical afterwards."""
    copy = tmp_path / "copy"
    shutil.copytree(leaky_parquet, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    inspect_dataset(str(copy))
    check_dataset(str(copy))
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_header_scan_agrees_with_decoding_and_sees_exif_orientation(tmp_path):
    rotated = imagegen.oriented(6, "JPEG", size=(64, 48))
    write_hf_parquet(
        tmp_path, {"train": [hf_row("r", rotated), hf_row("n", noise(1)), hf_row("p", lossless_copies(2)[0])]}
    )
    fast, full = (inspect_dataset(str(tmp_path), decode=d).result for d in (False, True))
    assert fast.formats == full.formats == {"JPEG": 2, "PNG": 1}
    assert list(fast.widths) == list(full.widths) == [48, 128, 128]  # as stored: orientation 6 turns it
    assert fast.num_rotated == full.num_rotated == 1 and fast.rotated == ["train/r"]
    result = check_dataset(str(tmp_path))
    assert any(
        w.startswith("1 images still carry an EXIF orientation") and "train/r" in w for w in result.warnings
    )


def test_unwritable_report_is_one_line(leaky_parquet, tmp_path):
    code, out, err = cli(
        "inspect",
        str(leaky_parquet),
        "--quiet",
        "--no-decode",
        "--html",
        str(tmp_path / "no" / "such" / "r.html"),
    )
    assert code == 1 and len(err.strip().splitlines()) == 1 and "No such file or directory" in err


def test_hub_parquet_conversion_layout_and_a_single_file(tmp_path):
    """The Hub's refs/convert/parquet layout (default/<split>/0000.parquet), and one file given directly."""
    write_hf_parquet(
        tmp_path / "src",
        {"train": [hf_row("a", noise(1)), hf_row("b", noise(2))], "test": [hf_row("c", noise(1))]},
    )
    for split, name in (("train", "0000.parquet"), ("test", "0000.parquet")):
        (tmp_path / "hub" / "default" / split).mkdir(parents=True)
        shutil.copy(
            tmp_path / "src" / "data" / f"{split}-00000-of-00001.parquet",
            tmp_path / "hub" / "default" / split / name,
        )
    r = inspect_dataset(str(tmp_path / "hub")).result
    assert {k: v.num_rows for k, v in r.splits.items()} == {"train": 2, "test": 1}
    assert [g.members for g in r.leakage.exact_cross] == [(("train", "a"), ("test", "c"))]
    single = inspect_dataset(str(tmp_path / "src" / "data" / "train-00000-of-00001.parquet")).result
    assert {k: v.num_rows for k, v in single.splits.items()} == {"train": 2}

"""WebDataset tars and LLaVA/ShareGPT JSON through ``engine convert`` to packed Arrow, loaded back
with ``datasets.load_from_disk``: pixels, counts, conversations and where the tokens stand."""

from __future__ import annotations

import io
import json
import tarfile

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CONFIG_BYTES, GOOD_OUTPUT, GOOD_OUTPUT_COMPACT, run_main
from PIL import Image

wds = pytest.importorskip("webdataset")

TOKEN = "<|reserved_special_token_0|>"
INSTRUCTIONS = json.loads(CONFIG_BYTES)["instructions"]


def jpeg(colour, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def colour_of(value: dict) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(value["bytes"])) as im:
        return im.convert("RGB").getpixel((10, 10))


def near(a, b, tol=6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def convert(input_path, out, *extra) -> int:
    return run_main(
        [
            "convert",
            "--manifest",
            str(input_path),
            "--out",
            str(out),
            "--runner",
            "local",
            "--quiet",
            "--layout",
            "arrow",
            *extra,
        ]
    )


def load(out):
    ds = datasets.load_from_disk(str(out))
    stats = json.loads((out / "stats.json").read_text())
    rejects_file = out / "rejects.jsonl"
    rejects = [json.loads(x) for x in rejects_file.read_text().splitlines()] if rejects_file.exists() else []
    assert (
        stats["num_input_rows"] == stats["num_written"] + stats["num_rejected"] == ds.num_rows + len(rejects)
    )
    return ds, stats, rejects


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def llava_turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def test_tars_to_packed_arrow(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(
        tars / "00000.tar",
        [
            {
                "__key__": f"s{i}",
                "jpg": jpeg(COLOURS[i]),
                "json": {"conversations": llava_turns("<image>\nWhat colour?", f"colour {i}")},
            }
            for i in range(3)
        ]
        + [{"__key__": "noimage", "json": {"conversations": llava_turns("<image>\nx", "y")}}],
    )
    write_tar(
        tars / "00001.tar",
        [
            {
                "__key__": f"s{i}",
                "png": jpeg(COLOURS[i]),
                "json": {"conversations": llava_turns("<image> Which?", str(i))},
            }
            for i in range(3, 6)
        ],
    )
    data = (tars / "00001.tar").read_bytes()
    cut = next(m for m in tarfile.open(tars / "00001.tar") if m.name == "s5.png")
    (tars / "00001.tar").write_bytes(data[: cut.offset_data + 50])  # the last sample is cut short

    out = tmp_path / "out"
    assert convert(tars, out) == 0
    ds, stats, rejects = load(out)
    assert stats["num_input_rows"] == 7 and ds.num_rows == 5
    assert {r["image_id"]: r["stage"] for r in rejects} == {"noimage": "manifest", "s5": "manifest"}
    assert [r["line"] for r in rejects] == [4, 7]
    assert "cut short" in rejects[1]["reason"]
    for i, sample in enumerate(ds):
        assert near(colour_of(sample["modalities"][0]["value"]), COLOURS[i])
        user, assistant = sample["conversations"]
        assert user["role"] == "user" and assistant == {
            "role": "assistant",
            "content": f"colour {i}" if i < 3 else str(i),
        }
        assert user["content"] == (TOKEN + "\nWhat colour?" if i < 3 else TOKEN + " Which?")


def test_tars_of_labelr_rows_with_a_config(tmp_path):
    """``key.json`` with an ``output`` is a labelr row: validated, and its user turn built from
    the config as for a manifest."""
    tar = tmp_path / "labelr.tar"
    write_tar(
        tar,
        [
            {"__key__": "ok", "jpg": jpeg(COLOURS[0]), "json": {"output": GOOD_OUTPUT, "barcode": "1"}},
            {"__key__": "bad", "jpg": jpeg(COLOURS[1]), "json": {"output": {"price": "free"}}},
            {"__key__": "array", "jpg": jpeg(COLOURS[2]), "json": b"[1]"},
        ],
    )
    (tmp_path / "config.json").write_bytes(CONFIG_BYTES)
    out = tmp_path / "out"
    assert convert(tar, out, "--config", str(tmp_path / "config.json")) == 0
    ds, _, rejects = load(out)
    assert ds.num_rows == 1
    assert ds[0]["conversations"] == [
        {"role": "user", "content": INSTRUCTIONS + "\n" + TOKEN},
        {"role": "assistant", "content": GOOD_OUTPUT_COMPACT},
    ]
    assert near(colour_of(ds[0]["modalities"][0]["value"]), COLOURS[0])
    assert {r["image_id"]: r["stage"] for r in rejects} == {"bad": "validate", "array": "manifest"}


def test_img2dataset_output_as_it_is(tmp_path):
    """img2dataset's folder (tars of successes, .parquet of every sample, _stats.json): captions
    become text rows, failed downloads rejects at stage fetch with img2dataset's message."""
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    ok, failed = ["000000000", "000000002"], ["000000001"]
    write_tar(
        folder / "00000.tar",
        [
            {
                "__key__": k,
                "jpg": jpeg(COLOURS[n]),
                "txt": f"a photo {k}",
                "json": {
                    "key": k,
                    "url": f"http://x/{k}",
                    "caption": f"a photo {k}",
                    "status": "success",
                    "error_message": None,
                },
            }
            for n, k in enumerate(ok)
        ],
    )
    keys = sorted(ok + failed)
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "url": [f"http://x/{k}" for k in keys],
                "status": ["success" if k in ok else "failed_to_download" for k in keys],
                "error_message": [None if k in ok else "timed out" for k in keys],
            }
        ),
        folder / "00000.parquet",
    )
    (folder / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2}))
    out = tmp_path / "out"
    assert convert(folder, out) == 0
    ds, stats, rejects = load(out)
    assert ds.column_names == ["text", "modalities"]
    assert ds["text"] == [f"a photo {k}\n{TOKEN}" for k in ok]
    assert rejects == [
        {
            "line": 3,
            "image_id": "000000001",
            "stage": "fetch",
            "reason": "img2dataset: failed_to_download: timed out",
        }
    ]
    assert near(colour_of(ds[1]["modalities"][0]["value"]), COLOURS[1])


def write_images(root, names_colours):
    for name, colour in names_colours.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(colour))


def test_llava_array_to_packed_arrow(tmp_path):
    write_images(tmp_path / "imgs", {"a.jpg": COLOURS[0], "b.jpg": COLOURS[1], "c.jpg": COLOURS[2]})
    samples = [
        {
            "id": "one",
            "image": "a.jpg",
            "conversations": llava_turns("<image>\nWhat is it?", "A red square."),
        },
        {
            "id": "two",
            "images": ["b.jpg", "c.jpg"],
            "system": "Be brief.",
            "conversations": llava_turns("First <image> then <image>: same?", "No."),
        },
        {"id": "mismatch", "image": "a.jpg", "conversations": llava_turns("<image> <image>", "x")},
        {"id": "text-only", "conversations": llava_turns("Hello?", "Hi.")},
        {"id": "missing", "image": "nope.jpg", "conversations": llava_turns("<image>", "x")},
    ]
    path = tmp_path / "data" / "llava.json"
    path.parent.mkdir()
    path.write_text(json.dumps(samples, indent=1))
    out = tmp_path / "out"
    assert convert(path, out, "--base-path", str(tmp_path / "imgs"), "--attachment-token", "<img>") == 0
    ds, stats, rejects = load(out)
    assert ds.num_rows == 3 and stats["num_input_rows"] == 5
    by_id = {r["image_id"]: r for r in rejects}
    assert by_id["mismatch"]["stage"] == "manifest" and "2 <image> token(s)" in by_id["mismatch"]["reason"]
    assert by_id["missing"]["stage"] == "fetch"
    one, two, text_only = ds
    assert one["conversations"] == [
        {"role": "user", "content": "<img>\nWhat is it?"},
        {"role": "assistant", "content": "A red square."},
    ]
    assert near(colour_of(one["modalities"][0]["value"]), COLOURS[0])
    assert two["conversations"][0] == {"role": "system", "content": "Be brief."}
    assert two["conversations"][1]["content"] == "First <img> then <img>: same?"
    assert [near(colour_of(m["value"]), c) for m, c in zip(two["modalities"], COLOURS[1:3])] == [True, True]
    assert text_only["modalities"] == [] and text_only["conversations"][1]["content"] == "Hi."


def test_llava_messages_jsonl_to_packed_arrow(tmp_path):
    write_images(tmp_path, {"img/x.png": COLOURS[3]})
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yellow."}]},
            ],
            "images": ["img/x.png"],
        },
        {"messages": [{"role": "robot", "content": "?"}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert convert(path, out) == 0
    ds, _, rejects = load(out)
    assert ds[0]["conversations"] == [
        {"role": "user", "content": "Describe\n" + TOKEN},
        {"role": "assistant", "content": "Yellow."},
    ]
    assert near(colour_of(ds[0]["modalities"][0]["value"]), COLOURS[3])
    assert rejects[0]["line"] == 2 and "unknown role 'robot'" in rejects[0]["reason"]


def test_unusable_inputs_are_one_line_usage_errors(tmp_path, capsys):
    assert convert(tmp_path / "shard-{0..1}.tar", tmp_path / "o1") == 2
    assert (
        capsys.readouterr().err.strip()
        == f"engine: error: tar not found: {tmp_path}/shard-0.tar (and 1 more)"
    )
    (tmp_path / "obj.json").write_text("[]")
    assert convert(tmp_path / "obj.json", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "holds no samples" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def s3():
    from conftest import moto_s3

    yield from moto_s3("tars-bucket")


def test_tars_on_object_storage(tmp_path, s3):
    """A brace pattern of tars on S3 (moto): planned and read through fsspec, member by member."""
    for t in range(2):
        local = tmp_path / f"{t}.tar"
        write_tar(
            local,
            [
                {
                    "__key__": f"t{t}-{i}",
                    "jpg": jpeg(COLOURS[t * 3 + i]),
                    "json": {"conversations": llava_turns("<image>\nColour?", f"{t}-{i}")},
                }
                for i in range(3)
            ],
        )
        s3.put(str(local), f"tars-bucket/shards/{t:05d}.tar")
    out = tmp_path / "out"
    assert convert("s3://tars-bucket/shards/{00000..00001}.tar", out) == 0
    ds, stats, rejects = load(out)
    assert ds.num_rows == 6 and rejects == []
    for k, sample in enumerate(ds):
        assert near(colour_of(sample["modalities"][0]["value"]), COLOURS[k])
        assert sample["conversations"][1]["content"] == f"{k // 3}-{k % 3}"


@pytest.mark.ray
def test_ray_workers_read_tars_and_llava_as_the_local_runner(tmp_path, ray_instance):
    """Sources and their units travel to Ray's worker processes; the shards come out the same."""
    tars = tmp_path / "tars"
    tars.mkdir()
    for t in range(3):
        write_tar(
            tars / f"{t}.tar",
            [
                {
                    "__key__": f"{t}-{i}",
                    "jpg": jpeg(COLOURS[(t + i) % 6]),
                    "json": {"conversations": llava_turns("<image>", str(i))},
                }
                for i in range(20)
            ],
        )
    write_images(tmp_path / "imgs", {f"{i}.jpg": COLOURS[i % 6] for i in range(6)})
    llava = tmp_path / "imgs" / "llava.json"
    llava.write_text(
        json.dumps(
            [
                {"id": str(i), "image": f"{i % 6}.jpg", "conversations": llava_turns("<image>", "x")}
                for i in range(60)
            ]
        )
    )
    for name, inp in (("tars", tars), ("llava", llava)):
        outs = {}
        for runner in ("local", "ray"):
            out = outs[runner] = tmp_path / f"{name}-{runner}"
            argv = [
                "convert",
                "--manifest",
                str(inp),
                "--out",
                str(out),
                "--runner",
                runner,
                "--quiet",
                "--layout",
                "arrow",
                "--workers",
                "2",
                "--unit-rows",
                "8",
            ]
            assert run_main(argv) == 0
        files = {r: sorted(p.name for p in o.glob("*.arrow")) for r, o in outs.items()}
        assert files["local"] == files["ray"] and files["local"]
        for f in files["local"]:
            assert (outs["local"] / f).read_bytes() == (outs["ray"] / f).read_bytes()
        assert json.loads((outs["ray"] / "stats.json").read_text())["num_written"] == 60

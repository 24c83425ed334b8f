"""engine.sources.webdataset read on its own: tars built with webdataset's own TarWriter."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

wds = pytest.importorskip("webdataset")

from engine.errors import UsageError  # noqa: E402
from engine.records import Reject  # noqa: E402
from engine.sources.base import InlineImage, Row  # noqa: E402
from engine.sources.webdataset import WebDatasetSource, expand  # noqa: E402

TOKEN = "<|reserved_special_token_0|>"


def jpeg(colour, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def read_all(src: WebDatasetSource, grain: int = 2, coalesce: int | None = None):
    plan = src.plan(grain)
    if coalesce:
        plan = plan.coalesce(coalesce)
    rows = [r for u in plan.units for r in src.read(u, base="", default_split="train")]
    assert len(rows) == plan.num_rows == sum(u.num_rows for u in plan.units)
    assert [r.line for r in rows] == list(range(1, plan.num_rows + 1))
    return plan, rows


def cut_inside(path, member: str, keep: int = 100) -> None:
    """Truncate the tar ``keep`` bytes into ``member``'s data, as an interrupted copy leaves it."""
    info = next(m for m in tarfile.open(path) if m.name == member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + keep])


def test_rows_across_tars_in_order(tmp_path):
    write_tar(
        tmp_path / "a-00000.tar",
        [
            {
                "__key__": f"k{i}",
                "jpg": jpeg((i * 50, 0, 0)),
                "json": {"output": {"price": i}, "barcode": "123", "split": "test"},
            }
            for i in range(3)
        ],
    )
    write_tar(
        tmp_path / "a-00001.tar",
        [{"__key__": f"k{i}", "png": jpeg((0, 0, 9)), "txt": f"caption {i}"} for i in range(3, 5)],
    )
    for where in (str(tmp_path), str(tmp_path / "a-{00000..00001}.tar")):
        assert WebDatasetSource.detect(where)
        assert len(expand(where)) == 2
        plan, rows = read_all(WebDatasetSource(where), grain=2, coalesce=3)
        assert [r.image_id for r in rows] == ["k0", "k1", "k2", "k3", "k4"]
    labelr = rows[0]
    assert isinstance(labelr, Row) and labelr.kind == "labelr" and labelr.output == {"price": 0}
    assert labelr.split == "test" and labelr.meta["barcode"] == "123"
    assert isinstance(labelr.locations[0], InlineImage) and labelr.locations[0].name == "k0.jpg"
    assert abs(Image.open(io.BytesIO(rows[1].locations[0].data)).getpixel((5, 5))[0] - 50) <= 3
    caption = rows[3]
    assert caption.kind == "trainer" and caption.text == "caption 3\n" + TOKEN and caption.split == "train"


def test_json_fields_make_the_row(tmp_path):
    write_tar(
        tmp_path / "s.tar",
        [
            {
                "__key__": "conv",
                "jpg": jpeg((1, 2, 3)),
                "json": {
                    "image_id": "my-id",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat?"},
                        {"from": "gpt", "value": "A square."},
                    ],
                },
            },
            {
                "__key__": "msgs",
                "webp": jpeg((1, 2, 3)),
                "json": {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "text", "text": "Describe"}, {"type": "image"}],
                        },
                        {"role": "assistant", "content": "Grey."},
                    ]
                },
            },
            {
                "__key__": "text",
                "jpg": jpeg((1, 2, 3)),
                "json": {"text": "<image> a caption"},
                "txt": "ignored",
            },
        ],
    )
    _, rows = read_all(WebDatasetSource(str(tmp_path / "s.tar")))
    conv, msgs, text = rows
    assert conv.image_id == "my-id" and conv.conversations[0] == {
        "role": "user",
        "content": TOKEN + "\nWhat?",
    }
    assert msgs.conversations[0]["content"] == "Describe\n" + TOKEN and msgs.locations[0].name == "msgs.webp"
    assert text.text == TOKEN + " a caption"


def test_bad_samples_are_rejected_and_the_rest_read(tmp_path):
    path = tmp_path / "bad.tar"
    write_tar(
        path,
        [
            {"__key__": "ok", "jpg": jpeg((0, 0, 0)), "json": {"output": "x"}},
            {"__key__": "noimage", "json": {"output": "x"}},
            {"__key__": "array", "jpg": jpeg((0, 0, 0)), "json": b"[1, 2]"},
            {"__key__": "badjson", "jpg": jpeg((0, 0, 0)), "json": b"{nope"},
            {"__key__": "nothing", "jpg": jpeg((0, 0, 0))},
            {"__key__": "ok2", "jpg": jpeg((0, 0, 0)), "json": {"output": "y"}},
        ],
    )
    _, rows = read_all(WebDatasetSource(str(path)), grain=4)
    kinds = [(r.image_id, type(r).__name__) for r in rows]
    assert kinds == [
        ("ok", "Row"),
        ("noimage", "Reject"),
        ("array", "Reject"),
        ("badjson", "Reject"),
        ("nothing", "Reject"),
        ("ok2", "Row"),
    ]
    reasons = {r.image_id: r.reason for r in rows if isinstance(r, Reject)}
    assert "has no image member" in reasons["noimage"]
    assert reasons["array"] == "array.json is an array, not a JSON object"
    assert "not valid JSON" in reasons["badjson"]
    assert "no output, conversations or text" in reasons["nothing"]


def test_truncated_member_is_rejected_after_the_samples_before_it(tmp_path):
    path = tmp_path / "00000.tar"
    write_tar(
        path,
        [
            {"__key__": f"{i:03d}", "jpg": jpeg((i, 0, 0), (64, 64)), "json": {"output": str(i)}}
            for i in range(6)
        ],
    )
    (tmp_path / "00000_stats.json").write_text(
        json.dumps({"count": 6, "successes": 6, "failed_to_download": 0})
    )
    cut_inside(path, "003.jpg")
    _, rows = read_all(WebDatasetSource(str(path)), grain=2)
    assert [type(r).__name__ for r in rows] == ["Row", "Row", "Row", "Reject"]
    assert rows[3].image_id == "003" and rows[3].stage == "manifest"
    assert "'003.jpg' is cut short" in rows[3].reason
    assert "2 later sample(s) lost (img2dataset's 00000_stats.json counts 6)" in rows[3].reason


def img2dataset_shard(folder, shard: str, keys_ok: list[str], keys_failed: list[str]):
    """A shard as img2dataset writes it: the tar holds successes only; the .parquet lists every
    sample (status, error_message) and _stats.json counts them."""
    write_tar(
        folder / f"{shard}.tar",
        [
            {
                "__key__": k,
                "jpg": jpeg((10, 20, 30)),
                "txt": f"cap {k}",
                "json": {
                    "key": k,
                    "url": f"http://x/{k}.jpg",
                    "caption": f"cap {k}",
                    "status": "success",
                    "error_message": None,
                    "width": 32,
                    "height": 24,
                },
            }
            for k in keys_ok
        ],
    )
    order = sorted(keys_ok + keys_failed)
    pq.write_table(
        pa.table(
            {
                "url": [f"http://x/{k}.jpg" for k in order],
                "caption": [f"cap {k}" for k in order],
                "key": order,
                "status": ["success" if k in keys_ok else "failed_to_download" for k in order],
                "error_message": [None if k in keys_ok else "HTTP Error 404: Not Found" for k in order],
            }
        ),
        folder / f"{shard}.parquet",
    )
    (folder / f"{shard}_stats.json").write_text(json.dumps({"count": len(order), "successes": len(keys_ok)}))


def test_img2dataset_output_reads_as_it_is(tmp_path):
    img2dataset_shard(tmp_path, "00000", ["000000000", "000000002"], ["000000001"])
    img2dataset_shard(tmp_path, "00001", ["000010000", "000010001", "000010002"], ["000010003", "000010004"])
    plan, rows = read_all(WebDatasetSource(str(tmp_path)), grain=2)
    assert plan.num_rows == 8
    ids = [(r.line, r.image_id, r.stage if isinstance(r, Reject) else "row") for r in rows]
    assert ids == [
        (1, "000000000", "row"),
        (2, "000000002", "row"),
        (3, "000000001", "fetch"),
        (4, "000010000", "row"),
        (5, "000010001", "row"),
        (6, "000010002", "row"),
        (7, "000010003", "fetch"),
        (8, "000010004", "fetch"),
    ]
    assert rows[2].reason == "img2dataset: failed_to_download: HTTP Error 404: Not Found"
    assert rows[0].text == "cap 000000000\n" + TOKEN


def test_img2dataset_truncated_tar_rejects_each_lost_sample(tmp_path):
    img2dataset_shard(tmp_path, "00000", [f"{i:09d}" for i in range(5)], ["000000009"])
    cut_inside(tmp_path / "00000.tar", "000000002.jpg")
    _, rows = read_all(WebDatasetSource(str(tmp_path)), grain=10)
    got = [(r.image_id, type(r).__name__) for r in rows]
    assert got == [
        ("000000000", "Row"),
        ("000000001", "Row"),
        ("000000002", "Reject"),
        ("000000003", "Reject"),
        ("000000004", "Reject"),
        ("000000009", "Reject"),
    ]
    assert "2 later sample(s) that img2dataset's .parquet lists are lost" in rows[2].reason
    assert "lists it as downloaded, but 00000.tar does not hold it" in rows[3].reason


def test_duplicate_ids_across_tars(tmp_path):
    write_tar(tmp_path / "0.tar", [{"__key__": "a", "jpg": jpeg((0, 0, 0)), "json": {"output": "1"}}])
    write_tar(tmp_path / "1.tar", [{"__key__": "a", "jpg": jpeg((0, 0, 0)), "json": {"output": "2"}}])
    plan = WebDatasetSource(str(tmp_path)).plan(10)
    assert plan.num_duplicates == 1 and plan.units[1].duplicate_lines == (2,)


def test_sha256_follows_the_input(tmp_path):
    write_tar(tmp_path / "0.tar", [{"__key__": "a", "jpg": jpeg((0, 0, 0)), "json": {"output": "1"}}])
    before = WebDatasetSource(str(tmp_path)).plan(10).sha256
    write_tar(tmp_path / "0.tar", [{"__key__": "a", "jpg": jpeg((0, 0, 0)), "json": {"output": "2"}}])
    assert WebDatasetSource(str(tmp_path)).plan(10).sha256 != before


def test_check_names_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match="no .tar files"):
        WebDatasetSource(str(tmp_path)).check()
    with pytest.raises(UsageError, match="tar not found"):
        WebDatasetSource(str(tmp_path / "x-{0..1}.tar")).check()


def test_tars_through_fsspec(tmp_path):
    """A folder of tars and a brace pattern on an fsspec file system (memory://), streamed."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for t in range(2):
        local = tmp_path / f"{t}.tar"
        write_tar(
            local,
            [{"__key__": f"t{t}-{i}", "jpg": jpeg((t, i, 0)), "json": {"output": str(i)}} for i in range(3)],
        )
        fs.pipe(f"/wds-test/{t:05d}.tar", local.read_bytes())
    try:
        for where in ("memory://wds-test", "memory://wds-test/{00000..00001}.tar"):
            assert WebDatasetSource.detect(where)
            _, rows = read_all(WebDatasetSource(where), grain=2)
            assert [r.image_id for r in rows] == [f"t{t}-{i}" for t in range(2) for i in range(3)]
            assert (
                rows[4].locations[0].data == tarfile.open(tmp_path / "1.tar").extractfile("t1-1.jpg").read()
            )
    finally:
        fs.rm("/wds-test", recursive=True)


def test_source_and_units_pickle(tmp_path):
    """They ride to Ray workers: a unpickled source reads an unpickled unit the same."""
    import pickle

    write_tar(
        tmp_path / "0.tar",
        [{"__key__": f"k{i}", "jpg": jpeg((i, 0, 0)), "json": {"output": "1"}} for i in range(3)],
    )
    src = WebDatasetSource(str(tmp_path))
    unit = src.plan(2).units[1]
    again = pickle.loads(pickle.dumps(src)).read(
        pickle.loads(pickle.dumps(unit)), base="", default_split="train"
    )
    assert [r.image_id for r in again] == ["k2"]


def test_quick_header_walk_agrees_with_tarfile(tmp_path):
    """The planner's header walk gives tarfile's members (long pax names, folders, links); a GNU
    format tar, which it leaves to tarfile, plans the same rows."""
    from engine.sources import webdataset as w

    path = tmp_path / "pax.tar"
    long_key = "d/" + "x" * 150
    write_tar(
        path,
        [
            {"__key__": long_key, "jpg": jpeg((1, 1, 1)), "json": {"output": "é"}},
            {"__key__": "short", "jpg": jpeg((2, 2, 2)), "txt": "t"},
        ],
    )
    with tarfile.open(path, "a") as tf:  # a folder and a symlink, which are no samples
        tf.addfile(tarfile.TarInfo("a-dir/"))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "short.jpg"
        tf.addfile(link)
    with open(path, "rb") as f:
        quick = list(w._quick_members(f, path.stat().st_size))
        f.seek(0)
        assert quick == list(w._tarfile_members(f))
    gnu = tmp_path / "gnu.tar"
    with tarfile.open(path) as src, tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    with open(gnu, "rb") as f, pytest.raises(w._Unsupported):
        list(w._quick_members(f, gnu.stat().st_size))
    rows = [read_all(WebDatasetSource(str(p)))[1] for p in (path, gnu)]
    assert [(r.image_id, r.locations[0].data) for r in rows[0]] == [
        (r.image_id, r.locations[0].data) for r in rows[1]
    ]
    assert [r.image_id for r in rows[0]] == [long_key, "short"]


def test_a_corrupt_header_ends_the_tar_with_a_warning(tmp_path, caplog):
    path = tmp_path / "c.tar"
    write_tar(path, [{"__key__": f"k{i}", "jpg": jpeg((i, 0, 0)), "json": {"output": "x"}} for i in range(3)])
    info = next(m for m in tarfile.open(path) if m.name == "k2.jpg")
    data = bytearray(path.read_bytes())
    data[info.offset : info.offset + 512] = b"\x7f" * 512  # the header block of k2's first member
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        _, rows = read_all(WebDatasetSource(str(path)))
    assert [r.image_id for r in rows] == ["k0", "k1"]
    assert "the rest of the tar is lost" in caplog.text


def test_coalesced_units_read_each_tar_in_one_walk(tmp_path):
    for t in range(2):
        write_tar(
            tmp_path / f"{t}.tar",
            [{"__key__": f"{t}-{i}", "jpg": jpeg((i, 0, 0)), "json": {"output": "1"}} for i in range(5)],
        )
    plan = WebDatasetSource(str(tmp_path)).plan(2).coalesce(100)
    assert [[(os.path.basename(p.tar), p.num_samples) for p in u.pieces] for u in plan.units] == [
        [("0.tar", 2)],
        [("0.tar", 3), ("1.tar", 5)],
    ]
    _, rows = read_all(WebDatasetSource(str(tmp_path)), grain=2, coalesce=100)
    assert [r.image_id for r in rows] == [f"{t}-{i}" for t in range(2) for i in range(5)]

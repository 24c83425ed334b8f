"""``engine update``'s splice of Parquet shards: unchanged column chunks copied from the old
shards, the changed ``output`` chunks from a file of that column alone. The footer's thrift
round trip, the column chunks of a thin file against the whole shard's, and each splice or
fallback against a fresh ``convert`` of the final manifest (byte for byte)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import imagegen
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Output, convert, row, write_input
from test_update import _data_files, _fresh, _images, _jsonl, _layout_opts, _rows, _rows_with_outputs, _update

from engine.layouts.parquet import extraction_features, parquet_writer
from engine.update import thrift


def _footer_bytes(path: Path) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<i", data[-8:-4])
    return data, data[-8 - length : -8]


def _shards(out: Path) -> list[Path]:
    return sorted((out / "data").glob("*.parquet"))


def _table(n: int, outputs: list[str], seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    schema = extraction_features(["barcode", "shelf"]).arrow_schema
    return pa.table(
        {
            "image_id": [f"id{i}" for i in range(n)],
            "image": pa.array(
                [
                    {"bytes": rng.bytes(int(rng.integers(1_000, 400_000))), "path": f"{i}.jpg"}
                    for i in range(n)
                ],
                schema.field("image").type,
            ),
            "output": outputs,
            "meta": pa.array(
                [{"barcode": f"{i:013d}", "shelf": "top" if i % 3 == 0 else None} for i in range(n)],
                schema.field("meta").type,
            ),
        },
        schema=schema,
    )


def _write(path: Path, table: pa.Table, groups: list[int]) -> None:
    with parquet_writer(str(path), table.schema) as writer:
        offset = 0
        for count in groups:
            writer.write_table(table.slice(offset, count), row_group_size=count)
            offset += count


def test_thrift_round_trip_of_a_pyarrow_footer_and_page_index(tmp_path):
    path = tmp_path / "shard.parquet"
    _write(path, _table(60, [json.dumps({"price": i}) for i in range(60)]), [25, 25, 10])
    data, footer = _footer_bytes(path)
    parsed, used = thrift.loads(footer)
    assert used == len(footer) and thrift.dumps(parsed) == footer  # byte for byte, every field kept
    md = pq.ParquetFile(path).metadata
    groups = parsed.get(4).values
    assert parsed.get(3) == md.num_rows == 60 and len(groups) == md.num_row_groups == 3
    indexes = 0
    for g, rg in enumerate(groups):
        for j, cc in enumerate(rg.get(1).values):
            assert cc.get(3).get(9) == md.row_group(g).column(j).data_page_offset
            for offset_field, length_field in ((4, 5), (6, 7)):
                if cc.has(offset_field):
                    raw = data[cc.get(offset_field) : cc.get(offset_field) + cc.get(length_field)]
                    index, used = thrift.loads(raw)
                    assert used == len(raw) and thrift.dumps(index) == raw
                    indexes += 1
    assert indexes > 3 * 8  # every column's offset index, and the column indexes of those with statistics


def test_a_thin_file_of_output_has_the_whole_shards_output_chunks(tmp_path):
    """The splice's premise: a column's chunk bytes do not depend on the other columns."""
    table = _table(50, [json.dumps({"price": i, "note": "x" * (i * 37 % 500)}) for i in range(50)])
    full, thin = tmp_path / "full.parquet", tmp_path / "thin.parquet"
    _write(full, table, [20, 20, 10])
    _write(thin, table.select(["output"]), [20, 20, 10])
    fmd, tmd = pq.ParquetFile(full).metadata, pq.ParquetFile(thin).metadata
    fdata, tdata = full.read_bytes(), thin.read_bytes()
    output = [c.path for c in pq.ParquetFile(full).schema].index("output")
    for g in range(3):
        a, b = fmd.row_group(g).column(output), tmd.row_group(g).column(0)
        assert a.total_compressed_size == b.total_compressed_size
        chunk_a = fdata[a.data_page_offset : a.data_page_offset + a.total_compressed_size]
        chunk_b = tdata[b.data_page_offset : b.data_page_offset + b.total_compressed_size]
        assert chunk_a == chunk_b


def _counts(out: Path) -> dict:
    return Output(out).stats["updates"][-1]["counts"]


@pytest.fixture
def made(tmp_path):
    inp = write_input(tmp_path / "in", _rows(), _images())
    out = tmp_path / "ds"
    assert convert(inp, out, *_layout_opts("parquet")) == 0
    return inp, out


def test_an_outputs_update_splices_every_shard(tmp_path, made):
    import datasets
    import polars as pl

    inp, out = made
    before = {p.name: p.read_bytes() for p in _shards(out)}
    inodes = {p.name: p.stat().st_ino for p in _shards(out)}
    updates = _jsonl(
        tmp_path / "u.jsonl",
        [
            {"image_id": "id1", "output": {"price": 123.25, "currency": "USD"}},
            {"image_id": "id8", "output": {"price": 0.0}},
        ],
    )
    assert _update(out, "--outputs", str(updates)) == 0
    counts = _counts(out)
    assert counts["shards_spliced"] == len(before) and counts.get("shards_rewritten", 0) == 0
    rows = _rows_with_outputs({"id1": {"price": 123.25, "currency": "USD"}, "id8": {"price": 0.0}})
    fresh = _fresh(tmp_path, inp, rows, "parquet")
    assert _data_files(out) == _data_files(fresh)
    # the card's front matter, made without datasets from the old card, is the one convert writes
    front = (out / "README.md").read_text().split("\n---\n", 1)[0]
    assert front == (fresh / "README.md").read_text().split("\n---\n", 1)[0]
    assert "num_examples: 8" in front and "num_examples: 3" in front
    changed = {p.name for p in _shards(out) if p.read_bytes() != before[p.name]}
    assert len(changed) == 2  # the shards of id1 and id8
    # the others did not change: the old files themselves, hard-linked into the new dataset
    assert counts["shards_linked"] == len(before) - 2
    assert {p.name for p in _shards(out) if p.stat().st_ino == inodes[p.name]} == set(before) - changed
    # readers of the spliced files
    got = {r["image_id"]: r for r in datasets.load_dataset(str(out), split="train")}
    assert got["id1"]["output"] == '{"price":123.25,"currency":"USD"}' and got["id1"]["image_id"] == "id1"
    assert got["id3"]["meta"]["shelf"] == "top" and got["id1"]["image"].size == (49, 40)
    frame = pl.read_parquet(out / "data" / "train-*.parquet")
    assert frame.filter(pl.col("image_id") == "id1")["output"].to_list() == [
        '{"price":123.25,"currency":"USD"}'
    ]
    for shard in _shards(out):
        pq.ParquetFile(shard).read()  # pyarrow reads every page, page index included
        table = pq.read_table(shard, filters=[("image_id", "!=", "")])
        assert table.num_rows == pq.ParquetFile(shard).metadata.num_rows


def test_an_output_that_moves_a_shard_boundary_falls_back_to_rewriting(tmp_path):
    """Shards cut by bytes: a much longer output moves the rows after it into other shards, which
    are rewritten; the shards before it are still spliced. Both match a fresh convert."""
    images = {f"img/{i}.jpg": imagegen.noise_jpeg((40, 40), seed=i) for i in range(12)}
    rows = [row(f"id{i:02d}", f"img/{i}.jpg", output={"price": i}) for i in range(12)]
    inp = write_input(tmp_path / "in", rows, images)
    sizes = sorted(len(v) for v in images.values())
    opts = ["--shard-rows", "4", "--max-shard-size", f"{4 * sizes[-1] + 400}B", "--row-group-rows", "2"]
    out = tmp_path / "ds"
    assert convert(inp, out, *opts) == 0
    assert len(_shards(out)) == 3
    long = {"price": 5, "currency": "n" * (3 * sizes[-1])}
    updates = _jsonl(tmp_path / "u.jsonl", [{"image_id": "id05", "output": long}])
    assert _update(out, "--outputs", str(updates)) == 0
    counts = _counts(out)
    # [0-3] spliced; [4] and [5] rewritten (half an old row group each); [6-9] spliced from two
    # old shards' row groups; [10, 11] spliced
    assert (counts["shards_spliced"], counts["shards_rewritten"]) == (3, 2)
    rows[5]["output"] = long
    manifest = _jsonl(inp.root / "final.jsonl", rows)
    fresh = tmp_path / "fresh"
    from conftest import run_main

    argv = ["convert", "--manifest", str(manifest), "--config", str(inp.config), "--out", str(fresh)]
    assert run_main([*argv, "--runner", "local", "--quiet", *opts]) == 0
    assert _data_files(out) == _data_files(fresh)


def test_a_shard_another_writer_made_is_rewritten(tmp_path, made):
    """An old shard whose footer is not the current writer's (here: written without the layout's
    settings) is not spliced: copying its chunks would not give what convert writes."""
    inp, out = made
    victim = _shards(out)[0]
    pq.write_table(pq.read_table(victim), victim, row_group_size=2)  # pyarrow's defaults
    updates = _jsonl(tmp_path / "u.jsonl", [{"image_id": "id1", "output": {"price": 1.0}}])
    assert _update(out, "--outputs", str(updates)) == 0
    counts = _counts(out)
    assert counts["shards_rewritten"] == 1 and counts["shards_spliced"] == len(_shards(out)) - 1
    rows = _rows_with_outputs({"id1": {"price": 1.0}})
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, rows, "parquet"))


def test_image_sizes_come_from_the_length_prefixes(tmp_path):
    """The scan's image sizes (the shard cut needs them) without reading the image bytes: equal to
    pyarrow's for the layout's chunks; None, so the values are read, where a page holds nulls."""
    import pyarrow.compute as pc

    from engine.update.splice import plain_lengths

    table = _table(40, ["{}"] * 40, seed=3)
    path = tmp_path / "s.parquet"
    _write(path, table, [15, 15, 10])
    f = pq.ParquetFile(path)
    column = [c.path for c in f.schema].index("image.bytes")
    for g in range(3):
        want = pc.binary_length(f.read_row_group(g).column("image").combine_chunks().field("bytes"))
        assert plain_lengths(str(path), f, column, g).tolist() == want.to_pylist()
    images = table.column("image").combine_chunks()
    holes = pa.StructArray.from_arrays(
        [
            pa.array([None if i % 7 == 3 else b for i, b in enumerate(images.field("bytes").to_pylist())]),
            images.field("path"),
        ],
        fields=list(images.type),
    )
    _write(path, table.set_column(1, "image", holes), [15, 15, 10])
    f = pq.ParquetFile(path)
    assert [plain_lengths(str(path), f, column, g) is None for g in range(3)] == [True, True, True]
    assert (
        plain_lengths(str(path), f, [c.path for c in f.schema].index("image.path"), 0) is None
    )  # compressed


def test_arrays_built_from_buffers_equal_pyarrows():
    """The update's own conversions (they keep pandas unimported) against pyarrow's."""
    import pyarrow.compute as pc

    from engine.update.core import _lengths
    from engine.update.splice import string_array

    values = ['{"price":1}', None, "", "prix: 3,50 €", "x" * 70_000, None]
    built = string_array(values)
    assert built.equals(pa.array(values, pa.string())) and built.null_count == 2
    column = pa.chunked_array([pa.array(values[:4]), pa.array(values[4:])])
    for array in (column, column.combine_chunks().slice(1, 4), pa.chunked_array([], pa.string())):
        want = pc.utf8_length(array).fill_null(0).to_numpy(zero_copy_only=False).tolist()
        assert _lengths(pc.utf8_length(array)).tolist() == want


def test_new_instructions_alone_leave_every_shard_as_it_was(tmp_path, made):
    """``--config`` with new instructions and the same schema: no output changes, so every shard
    is the old file, linked; the data files are a fresh convert's with the new config."""
    from conftest import SCHEMA

    inp, out = made
    config = tmp_path / "v2.json"
    config.write_text(json.dumps({"instructions": "Read the price and its currency.", "json_schema": SCHEMA}))
    assert _update(out, "--config", str(config)) == 0
    counts = _counts(out)
    assert counts["shards_spliced"] == counts["shards_linked"] == len(_shards(out))
    assert counts["shards_rewritten"] == 0
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, _rows(), "parquet", config=config))
    assert "Read the price and its currency." in (out / "README.md").read_text()

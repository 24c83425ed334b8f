"""Pass-through images of local files are referenced by the part files, not copied, and read
back from their sources when the shards are written. The output must not change, the parts
must stay small, and a source that changes in between must stop the run with one clear line."""

from __future__ import annotations

import hashlib
import io
import os

import datasets
import imagegen
import pyarrow.parquet as pq
import pytest
from conftest import Output, convert, decode, row, write_input
from PIL import Image

import engine.driver
import engine.layouts.packed
import engine.layouts.parquet
from engine.runners.local import LocalRunner

# Upright, small, storable: kept byte for byte. Noise makes them big enough to count.
KEPT = {f"keep{i}.jpg": imagegen.noise_jpeg((400, 300), seed=i) for i in range(6)}
KEPT["keep.png"] = imagegen.png()
RESIZED = {"large.jpg": imagegen.jpeg((3000, 2000)), "rot6.jpg": imagegen.oriented(6)}


@pytest.fixture
def inp(tmp_path):
    images = {**KEPT, **RESIZED}
    names = sorted(images)
    rows = [row(f"id_{i:02d}", names[i % len(names)]) for i in range(20)]
    return write_input(tmp_path / "in", rows, images)


def shard_hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.parquet"))}


def test_parts_reference_kept_images_and_the_output_keeps_their_bytes(inp, tmp_path, part_bytes):
    assert convert(inp, tmp_path / "out", "--image-format", "keep", "--unit-rows", "4") == 0
    out = Output(tmp_path / "out")
    rows = out.by_id()
    assert len(rows) == 20 and out.rejects == []
    names = sorted({**KEPT, **RESIZED})
    kept_total = 0
    for i in range(20):
        name = names[i % len(names)]
        stored = rows[f"id_{i:02d}"]["image"]["bytes"]
        if name in KEPT:
            assert stored == KEPT[name], name  # read back from the source, byte for byte
            kept_total += len(stored)
        else:
            assert max(decode(rows[f"id_{i:02d}"]["image"]).size) <= 1024, (
                name
            )  # resized, so embedded in its part
    resized_total = sum(
        len(rows[f"id_{i:02d}"]["image"]["bytes"]) for i in range(20) if names[i % len(names)] in RESIZED
    )
    # the parts hold the resized images, and only references to the kept ones
    assert part_bytes[0] < resized_total + kept_total / 10, (part_bytes, resized_total, kept_total)


def test_referenced_and_embedded_parts_give_identical_shards(inp, tmp_path, monkeypatch, part_bytes):
    assert (
        convert(inp, tmp_path / "ref", "--image-format", "keep", "--unit-rows", "3", "--shard-rows", "7") == 0
    )
    monkeypatch.setattr(LocalRunner, "embedded", False)  # as on a cluster: parts embed every image
    assert (
        convert(inp, tmp_path / "emb", "--image-format", "keep", "--unit-rows", "3", "--shard-rows", "7") == 0
    )
    referenced, embedded = part_bytes
    assert embedded > referenced + sum(len(v) for v in KEPT.values())  # every kept image was copied
    a, b = shard_hashes(tmp_path / "ref"), shard_hashes(tmp_path / "emb")
    assert len(a) == 3
    assert a == b


def test_packed_arrow_reads_kept_images_back(inp, tmp_path):
    assert convert(inp, tmp_path / "out", "--layout", "arrow", "--image-format", "keep") == 0
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert ds.num_rows == 20
    names = sorted({**KEPT, **RESIZED})
    table = ds.data.table
    for i, modalities in enumerate(table.column("modalities").to_pylist()):
        name = names[i % len(names)]
        if name in KEPT:
            assert modalities[0]["value"]["bytes"] == KEPT[name]


@pytest.mark.parametrize("change", ["rewritten", "touched", "removed"])
def test_a_source_changed_before_the_shards_stops_the_run(inp, tmp_path, monkeypatch, capsys, change):
    source = next(inp.root.rglob("keep0.jpg"))
    plan = engine.driver.plan_shards

    def then_change(results, opts, store):
        if change == "rewritten":  # same size, other bytes
            data = source.read_bytes()
            source.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        elif change == "touched":
            st = source.stat()
            os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        else:
            source.unlink()
        return plan(results, opts, store)

    monkeypatch.setattr(engine.driver, "plan_shards", then_change)
    code = convert(inp, tmp_path / "out", "--image-format", "keep")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert str(source) in err[0]
    assert (
        "cannot be read back" if change == "removed" else "changed while the dataset was being written"
    ) in err[0]
    assert not list((tmp_path / "out").rglob("*.parquet")), "no shard may appear under its final name"
    assert not (tmp_path / "out" / "stats.json").exists()


def test_a_source_rewritten_right_after_its_read_stops_the_run(inp, tmp_path, monkeypatch, capsys):
    """The reference records the status of the open file the bytes were read from, not a later
    one: a file rewritten (same size, other bytes) just after its read must not have its new,
    unchecked bytes written into the dataset."""
    from engine.sources import fetch

    source = next(inp.root.rglob("keep0.jpg"))
    real_read = fetch.Fetcher._read_local
    rewritten: list[str] = []

    def read_then_rewrite(self, path):
        result = real_read(self, path)
        if path == str(source) and not rewritten:
            rewritten.append(path)
            data = source.read_bytes()
            source.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
            st = source.stat()
            os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return result

    monkeypatch.setattr(fetch.Fetcher, "_read_local", read_then_rewrite)
    code = convert(inp, tmp_path / "out", "--image-format", "keep", "--workers", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert rewritten
    assert code == 1
    assert (
        len(err) == 1 and str(source) in err[0] and "changed while the dataset was being written" in err[0]
    ), err
    assert not (tmp_path / "out" / "stats.json").exists()


def test_the_shards_load_in_datasets(inp, tmp_path):
    assert convert(inp, tmp_path / "out", "--image-format", "keep") == 0
    files = [str(p) for p in Output(tmp_path / "out").shard_files]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == 20
    first = ds[0]["image"]  # decoded by the Image feature from the referenced bytes
    assert first.size[0] > 0
    assert pq.ParquetFile(files[0]).schema_arrow.field("image").type.field("bytes").type == "binary"


@pytest.mark.parametrize("layout", ["parquet", "arrow"])
def test_a_shard_writer_holds_at_most_two_row_groups(tmp_path, monkeypatch, layout):
    """A shard writer holds the row group being written and the next one being read, never
    more: memory per writer does not depend on the shard size. Measured in pyarrow's pool,
    which holds every image buffer, after each part batch is read back; one shard at a time,
    so nothing else allocates meanwhile. A slow ``write`` lets the reader run ahead as far as
    it can."""
    import time

    import pyarrow as pa

    import engine.sinks.shards

    images = {f"n{i}.jpg": imagegen.noise_jpeg((400, 300), seed=i) for i in range(4)}  # about 110 KB
    rows = [row(f"id_{i:02d}", f"n{i % 4}.jpg") for i in range(128)]
    inp = write_input(tmp_path / "in", rows, images)
    allocated: list[int] = []  # pool bytes after each batch (16 rows) is read
    batch_bytes: list[int] = []
    iter_part_rows = engine.sinks.shards.iter_part_rows

    def spy(*args):
        for table in iter_part_rows(*args):
            batch_bytes.append(table.nbytes)
            allocated.append(pa.total_allocated_bytes())
            yield table

    write_row_groups = engine.sinks.shards.write_row_groups

    def slow(spec, write):
        def slow_write(group):
            time.sleep(0.05)
            write(group)

        return write_row_groups(spec, slow_write)

    monkeypatch.setattr(engine.sinks.shards, "iter_part_rows", spy)
    module = {"parquet": engine.layouts.parquet, "arrow": engine.layouts.packed}[layout]
    monkeypatch.setattr(module, "write_row_groups", slow)
    code = convert(
        inp,
        tmp_path / "out",
        "--layout",
        layout,
        "--image-format",
        "keep",
        "--workers",
        "1",
        "--unit-rows",
        "16",
        "--row-group-rows",
        "32",
    )
    assert code == 0
    assert len(batch_bytes) == 8, batch_bytes  # 128 rows in part batches of 16, two per group
    group = 2 * min(batch_bytes)
    assert group > 32 * 100_000  # the images themselves
    assert max(allocated) < 2.5 * group, (allocated, group)  # a third group would be 3x
    assert Output(tmp_path / "out").stats["num_written"] == 128


@pytest.mark.parametrize("batch_bytes", [2**20, 2**40], ids=["batches-of-1MB", "one-batch-per-group"])
def test_arrow_record_batches_bound_the_copy_of_a_group(tmp_path, monkeypatch, batch_bytes):
    """A packed Arrow record batch is one block per column, so its rows are copied out of the
    parts' chunks while the group and the next one (read ahead) are still held. Batches of at
    most BATCH_BYTES keep that copy small: the pool never holds much more than two groups. With
    one batch per group (the contrast case) the same measurement sees three."""
    import time

    import pyarrow as pa
    import pyarrow.ipc as ipc

    images = {f"n{i}.jpg": imagegen.noise_jpeg((400, 300), seed=i) for i in range(4)}  # about 110 KB
    rows = [row(f"id_{i:03d}", f"n{i % 4}.jpg") for i in range(128)]
    inp = write_input(tmp_path / "in", rows, images)
    group = 32 * min(len(b) for b in images.values())
    peaks: list[int] = []  # pool bytes once each record batch is built (its copy made)
    packed_batch, write_row_groups = (
        engine.layouts.packed.packed_batch,
        engine.layouts.packed.write_row_groups,
    )

    def measured(*args):
        batch = packed_batch(*args)
        peaks.append(pa.total_allocated_bytes())
        return batch

    def slow(spec, write):  # the reader runs ahead and holds the next group meanwhile
        def slow_write(g):
            time.sleep(0.05)
            write(g)

        return write_row_groups(spec, slow_write)

    monkeypatch.setattr(engine.layouts.packed, "BATCH_BYTES", batch_bytes)
    monkeypatch.setattr(engine.layouts.packed, "packed_batch", measured)
    monkeypatch.setattr(engine.layouts.packed, "write_row_groups", slow)
    code = convert(
        inp,
        tmp_path / "out",
        "--layout",
        "arrow",
        "--image-format",
        "keep",
        "--workers",
        "1",
        "--unit-rows",
        "16",
        "--row-group-rows",
        "32",
    )
    assert code == 0
    (shard,) = sorted((tmp_path / "out").glob("*.arrow"))
    with pa.OSFile(str(shard), "rb") as f:
        batch_rows = [b.num_rows for b in ipc.open_stream(f)]
    assert sum(batch_rows) == 128 and len(batch_rows) == len(peaks)
    if batch_bytes == 2**20:  # 32 rows of about 110 KB: 3.5 MB groups, in batches of 1 MB (9 rows)
        assert max(batch_rows) <= 9 and len(batch_rows) >= 4 * 4, batch_rows
        assert max(peaks) < 2.5 * group, (peaks, group)
    else:
        assert batch_rows == [32] * 4
        assert max(peaks) > 2.7 * group, (peaks, group)  # the measurement does see the third group
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(ds) == 128
    last = ds.with_format("arrow")[-1:]["modalities"].to_pylist()[0]
    assert [m["value"]["bytes"] for m in last] == [images["n3.jpg"]]
    assert Image.open(io.BytesIO(ds[-1]["modalities"][0]["value"]["bytes"])).size == (400, 300)


# ---------------------------------------------------------------------------------------------
# Members of local tars: referenced at their offset in the tar, like files
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tars(tmp_path):
    """Two WebDataset tars of labelr rows: kept JPEGs and a PNG, and a large JPEG to resize."""
    wds = pytest.importorskip("webdataset")
    from conftest import CONFIG_BYTES, GOOD_OUTPUT, InputSet

    folder = tmp_path / "tars"
    folder.mkdir()
    images = list({**KEPT, **RESIZED}.items())
    for t in range(2):
        with wds.TarWriter(str(folder / f"{t:05d}.tar")) as w:
            for i in range(10):
                name, data = images[(t * 10 + i) % len(images)]
                w.write(
                    {
                        "__key__": f"t{t}_{i:02d}",
                        name.rsplit(".", 1)[1]: data,
                        "json": {"output": GOOD_OUTPUT},
                    }
                )
    (tmp_path / "config.json").write_bytes(CONFIG_BYTES)
    return InputSet(root=folder, manifest=folder, config=tmp_path / "config.json", lines=[])


def output_hashes(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.suffix in (".parquet", ".arrow")
    }


@pytest.mark.parametrize("layout", ["parquet", "arrow", "messages"])
def test_tar_members_are_referenced_and_the_shards_match_embedded_ones(
    tars, tmp_path, monkeypatch, part_bytes, layout
):
    args = ("--layout", layout, "--image-format", "keep", "--unit-rows", "3", "--shard-rows", "7")
    assert convert(tars, tmp_path / "ref", *args) == 0
    monkeypatch.setattr(LocalRunner, "embedded", False)  # as on a cluster: parts embed every image
    assert convert(tars, tmp_path / "emb", *args) == 0
    referenced, embedded = part_bytes
    images = list({**KEPT, **RESIZED}.items())
    kept_total = sum(len(images[k % len(images)][1]) for k in range(20) if images[k % len(images)][0] in KEPT)
    assert embedded > referenced + 0.9 * kept_total  # every kept member was copied into the parts
    a, b = output_hashes(tmp_path / "ref"), output_hashes(tmp_path / "emb")
    assert len(a) >= 3 and a == b  # three shards (and the packed layout's row_ids.parquet)
    if layout == "parquet":
        rows = Output(tmp_path / "ref").by_id()
        assert len(rows) == 20
        for k in range(20):
            name, data = images[k % len(images)]
            stored = rows[f"t{k // 10}_{k % 10:02d}"]["image"]["bytes"]
            assert stored == data if name in KEPT else max(decode({"bytes": stored}).size) <= 1024, name
        resized = sum(
            len(rows[f"t{k // 10}_{k % 10:02d}"]["image"]["bytes"])
            for k in range(20)
            if images[k % len(images)][0] in RESIZED
        )
        assert referenced < resized + kept_total / 10, (referenced, resized, kept_total)  # references only


@pytest.mark.parametrize("change", ["rewritten", "touched", "removed"])
def test_a_tar_changed_before_the_shards_stops_the_run(tars, tmp_path, monkeypatch, capsys, change):
    tar = tars.root / "00001.tar"
    plan = engine.driver.plan_shards

    def then_change(results, opts, store):
        if change == "rewritten":  # same size, one byte of a member's image changed
            import tarfile

            with tarfile.open(tar) as t:
                where = [m for m in t.getmembers() if m.name.endswith(".jpg")][-1].offset_data + 100
            data = bytearray(tar.read_bytes())
            data[where] ^= 1
            tar.write_bytes(bytes(data))
        elif change == "touched":
            st = tar.stat()
            os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        else:
            tar.unlink()
        return plan(results, opts, store)

    monkeypatch.setattr(engine.driver, "plan_shards", then_change)
    code = convert(tars, tmp_path / "out", "--image-format", "keep")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert str(tar) in err[0]
    assert (
        "cannot be read back" if change == "removed" else "changed while the dataset was being written"
    ) in err[0]
    assert not list((tmp_path / "out").rglob("*.parquet")), "no shard may appear under its final name"
    assert not (tmp_path / "out" / "stats.json").exists()


def test_only_local_tars_name_where_their_members_lie(tars, request):
    """A local tar's images carry their range in the tar (the bytes read are exactly those);
    a tar read through fsspec carries none, so its parts embed the bytes."""
    import fsspec

    from engine.sources.base import InlineImage
    from engine.sources.webdataset import WebDatasetSource

    local = str(tars.root / "00000.tar")
    memory = fsspec.filesystem("memory")
    memory.pipe("/tars-refs/00000.tar", (tars.root / "00000.tar").read_bytes())
    request.addfinalizer(lambda: memory.rm("/tars-refs", recursive=True))
    for where, has_origin in ((local, True), ("memory://tars-refs/00000.tar", False)):
        source = WebDatasetSource(where)
        plan = source.plan(4)
        images = [
            im
            for unit in plan.units
            for r in source.read(unit, base="", default_split="train")
            for im in r.locations
        ]
        assert len(images) == 10 and all(isinstance(im, InlineImage) for im in images)
        if not has_origin:
            assert all(im.origin is None for im in images)
            continue
        blob = (tars.root / "00000.tar").read_bytes()
        st = os.stat(local)
        for im in images:
            ref = im.origin
            assert (ref.path, ref.mtime_ns) == (os.path.abspath(local), st.st_mtime_ns)
            assert blob[ref.offset : ref.offset + ref.size] == im.data

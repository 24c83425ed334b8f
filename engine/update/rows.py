"""The rows of a finished dataset, read back as part-file rows, so ``engine update`` writes its
shards through the same writers (and the same cut) as ``convert``.

Each old shard gets an *edit file* in the update's scratch folder: one row per row of the shard,
saying whether it stays, its new text (``output``, or the packed conversation's JSON) when it
changes, and its byte size. A shard piece that names an edit file is read from the old shard,
one row group (Parquet) or record batch (packed Arrow) at a time; image bytes are copied as
they are, never decoded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from engine.layouts.packed import IMAGES_DIR, LINE_DIGITS
from engine.records import IMAGE_STRUCT, META_TYPE, PART_SCHEMA, SOURCE_STRUCT, TURNS_TYPE
from engine.sinks.parts import iter_part_rows
from engine.sinks.store import Store
from engine.sources.location import local_path

EDIT_SUFFIX = ".edit.arrow"
OFFSET_MARK = "::"  # "PIECE::N": the piece's rows from its N-th on (a retry splices rows between them)
LINES_MARK = "#lines+"  # "PART#lines+N": an --add part whose fs-image names take N more manifest lines
EDIT_SCHEMA = pa.schema(
    [("keep", pa.bool_()), ("text", pa.string()), ("num_bytes", pa.int64()), ("line", pa.int64())]
)
IMAGES_PREFIX = IMAGES_DIR + "/"


def write_edit_file(
    store: Store,
    rel: str,
    source: str,
    layout: str,
    keep: np.ndarray,
    texts: dict[int, str],
    num_bytes: np.ndarray,
    lines: np.ndarray | None = None,
    prefix: str | None = None,
) -> None:
    """``texts``: row index -> the row's new output (Parquet) or conversation JSON (packed).
    fs-image: ``lines`` are the rows' new manifest lines and ``prefix`` what the old paths start with."""
    text = [texts.get(i) for i in range(len(keep))] if texts else pa.nulls(len(keep), pa.string())
    line = pa.array(lines, pa.int64()) if lines is not None else pa.nulls(len(keep), pa.int64())
    table = pa.table(
        {
            "keep": pa.array(keep, pa.bool_()),
            "text": pa.array(text, pa.string()),
            "num_bytes": pa.array(num_bytes, pa.int64()),
            "line": line,
        },
        schema=EDIT_SCHEMA,
    )
    table = table.replace_schema_metadata(
        {"source": source, "layout": layout, **({"prefix": prefix} if prefix is not None else {})}
    )
    with (
        store.writing(rel, durable=False) as tmp,
        pa.OSFile(tmp, "wb") as sink,
        ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)


def read_rows(store: Store, rel: str, split: str, start: int, stop: int) -> Iterator[pa.Table]:
    """Rows ``[start, stop)`` of a piece as part-schema tables (a ShardSpec ``reader``)."""
    if OFFSET_MARK in rel:
        rel, offset = rel.rsplit(OFFSET_MARK, 1)
        start, stop = start + int(offset), stop + int(offset)
    if LINES_MARK in rel:
        rel, shift = rel.rsplit(LINES_MARK, 1)
        for rows in iter_part_rows(store, rel, split, start, stop):
            lines = pc.add(rows.column("line"), int(shift)).to_pylist()
            yield rows.set_column(
                rows.schema.get_field_index("images"),
                "images",
                _renamed(rows.column("images").to_pylist(), lines, 0),
            )
        return
    if not rel.endswith(EDIT_SUFFIX):
        yield from iter_part_rows(store, rel, split, start, stop)
        return
    with store.open_arrow(rel) as f:
        edits = ipc.open_file(f).read_all()
    meta = {k.decode(): v.decode() for k, v in edits.schema.metadata.items()}
    kept = np.flatnonzero(edits.column("keep").to_numpy(zero_copy_only=False))
    wanted = kept[start:stop]  # rows of the old shard, in order
    if meta["layout"] == "parquet":
        groups = _parquet_groups(meta["source"])
    else:
        groups = _arrow_batches(meta["source"])
    if len(wanted) == 0:
        return
    offset = 0
    for batch in groups:
        lo, hi = offset, offset + batch.num_rows
        offset = hi
        take = wanted[(wanted >= lo) & (wanted < hi)]
        if len(take) == 0:
            continue
        local = take - lo
        if len(local) == batch.num_rows:
            rows = batch
        elif local[-1] - local[0] + 1 == len(local):  # consecutive: a zero-copy slice
            rows = batch.slice(int(local[0]), len(local))
        else:
            rows = batch.take(pa.array(local))
        yield _to_part(rows, meta["layout"], split, edits.take(pa.array(take)), meta.get("prefix"))
        if hi > wanted[-1]:
            break


def _parquet_groups(source: str) -> Iterator[pa.Table]:
    path = local_path(source)
    if path is not None:
        f = pq.ParquetFile(path)
    else:
        import fsspec

        f = pq.ParquetFile(fsspec.open(source, "rb").open())
    with f:
        for i in range(f.num_row_groups):
            yield f.read_row_group(i)


def _arrow_batches(source: str) -> Iterator[pa.RecordBatch]:
    path = local_path(source)
    if path is not None:
        stream = pa.OSFile(path, "rb")
    else:
        import fsspec

        stream = pa.PythonFile(fsspec.open(source, "rb").open(), mode="r")
    with stream:
        yield from ipc.open_stream(stream)


def new_name(name: str, line: int) -> str:
    """An fs-image file name (``{line:08d}-{stem}...``) with another manifest line number."""
    return f"{line:0{LINE_DIGITS}d}{name[LINE_DIGITS:]}"


def _renamed(images: list, lines: list[int], cut: int) -> pa.Array:
    """fs-image rows' paths (``cut`` characters of prefix dropped) renamed to their new lines."""
    skip = cut + len(IMAGES_PREFIX)
    return pa.array(
        [
            [
                {
                    "bytes": None,
                    "path": IMAGES_PREFIX
                    + new_name((im["path"] if isinstance(im, dict) else im)[skip:], line),
                }
                for im in row
            ]
            for row, line in zip(images, lines)
        ],
        pa.list_(IMAGE_STRUCT),
    )


def _to_part(rows, layout: str, split: str, edits: pa.Table, prefix: str | None = None) -> pa.Table:
    n = rows.num_rows
    new_text = edits.column("text")
    if layout == "parquet":
        image_id = rows.column("image_id")
        images = _one_image_lists(rows.column("image"))
        output = pc.coalesce(new_text, rows.column("output"))
        meta = _meta_map(rows.column("meta"))
        conversations = pa.nulls(n, TURNS_TYPE)
        text = pa.nulls(n, pa.string())
    else:
        image_id = pa.nulls(n, pa.string())
        if prefix is not None:  # fs-image: the paths, renamed to the rows' new manifest lines
            values = [[m["value"] for m in mods] for mods in rows.column("modalities").to_pylist()]
            images = _renamed(values, edits.column("line").to_pylist(), len(prefix))
        else:
            images = images_from_modalities(rows.column("modalities"))
        output = pa.nulls(n, pa.string())
        meta = pa.array([[]] * n, META_TYPE)
        if "conversations" in rows.schema.names:
            conversations = _conversations(rows.column("conversations"), new_text)
            text = pa.nulls(n, pa.string())
        else:
            conversations = pa.nulls(n, TURNS_TYPE)
            text = rows.column("text")
    columns = {
        "line": pa.nulls(n, pa.int64()),
        "split": pa.array([split] * n, pa.string()),
        "image_id": image_id,
        "images": images,
        "image_sources": pa.nulls(n, pa.list_(SOURCE_STRUCT)),
        "output": output,
        "conversations": conversations,
        "text": text,
        "meta": meta,
        "num_bytes": edits.column("num_bytes"),
        "text_chars": pa.nulls(n, pa.int64()),
    }
    return pa.table(
        {name: _chunked(columns[name], PART_SCHEMA.field(name).type) for name in PART_SCHEMA.names},
        schema=PART_SCHEMA,
    )


def _conversations(old, new_text: pa.ChunkedArray) -> pa.Array:
    """The old rows' turns, where the edit file holds none of its own (its conversation JSON)."""
    old = old.combine_chunks() if isinstance(old, pa.ChunkedArray) else old
    if new_text.null_count == len(new_text):  # no conversation changed: the turns as they are
        return old if old.type == TURNS_TYPE else old.cast(TURNS_TYPE)
    turns = [orjson.loads(t) if t is not None else o for t, o in zip(new_text.to_pylist(), old.to_pylist())]
    return pa.array(turns, TURNS_TYPE)


def _meta_map(meta) -> pa.MapArray:
    """The extraction layout's meta struct as the parts' map (every key, a missing value null)."""
    meta = meta.combine_chunks() if isinstance(meta, pa.ChunkedArray) else meta
    names = [f.name for f in meta.type]
    n, k = len(meta), len(names)
    if k == 0:
        return pa.array([[]] * n, META_TYPE)
    # row-major items: row i's key j is the j-th field's i-th value
    order = (np.arange(k)[None, :] * n + np.arange(n)[:, None]).ravel()
    items = pa.concat_arrays([meta.field(j).cast(pa.string()) for j in range(k)]).take(pa.array(order))
    keys = pa.array(names * n, pa.string())
    return pa.MapArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * k), keys, items, type=META_TYPE
    )


def _chunked(column, type: pa.DataType) -> pa.ChunkedArray:
    column = column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column], type=column.type)
    return column if column.type == type else column.cast(type)


def _one_image_lists(image: pa.ChunkedArray) -> pa.ChunkedArray:
    """The Parquet layout's one image per row, as the parts' list of images (no bytes copied)."""
    chunks = []
    for chunk in image.chunks:
        offsets = pa.array(np.arange(len(chunk) + 1, dtype=np.int32))
        struct = pa.StructArray.from_arrays(
            [chunk.field("bytes"), chunk.field("path")], fields=list(IMAGE_STRUCT)
        )
        chunks.append(pa.ListArray.from_arrays(offsets, struct, type=pa.list_(IMAGE_STRUCT)))
    return pa.chunked_array(chunks, type=pa.list_(IMAGE_STRUCT))


def images_from_modalities(modalities) -> pa.ChunkedArray:
    """The raw-image modalities' values (whatever struct holds their ``bytes`` and ``path``) as
    the parts' list of images; the bytes are not copied."""
    chunks = []
    column = modalities if isinstance(modalities, pa.ChunkedArray) else pa.chunked_array([modalities])
    for chunk in column.chunks:
        offsets = pc.subtract(chunk.offsets, chunk.offsets[0])
        value = chunk.flatten().field("value")
        data = value.field("bytes").cast(pa.binary())
        names = value.type.get_field_index("path")
        path = value.field("path").cast(pa.string()) if names >= 0 else pa.nulls(len(value), pa.string())
        struct = pa.StructArray.from_arrays([data, path], fields=list(IMAGE_STRUCT))
        chunks.append(pa.ListArray.from_arrays(offsets, struct, type=pa.list_(IMAGE_STRUCT)))
    return pa.chunked_array(chunks, type=pa.list_(IMAGE_STRUCT))

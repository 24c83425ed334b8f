"""Per-unit part files: the processed rows of one work unit as an Arrow IPC stream.

Every layout's final shards are assembled from parts, cut by row sizes alone, so the final
files are the same whatever the number of workers or units.

An image kept exactly as its local source file is stored as a reference to that file (see
``SourceRef``), not as a copy, and read back from the source when the shard is written; so
is a kept member of a local tar (its offset and size in the tar). A pass-through job otherwise
wrote every image twice, into its part and into its shard: at 50k rows of 150 KB that was
13.8 GB, more than the page cache absorbs, so the disk set the pace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from engine.errors import EngineError
from engine.records import IMAGE_STRUCT, PART_SCHEMA, Sample, samples_to_part_batch
from engine.sinks.store import Store

BATCH_ROWS = 16


class PartWriter:
    """Streams samples into ``path`` in small batches; the file appears only on ``close``."""

    def __init__(self, store: Store, rel: str):
        self._pending: list[Sample] = []
        self._sizes: list[tuple[int, int]] = []
        self._ctx = store.writing(rel, durable=False)  # scratch: a resumed run checks its size
        self._tmp = self._ctx.__enter__()
        self._sink = pa.OSFile(self._tmp, "wb")
        self._writer = ipc.new_stream(self._sink, PART_SCHEMA)

    def write(self, sample: Sample) -> int:
        """Queue one row; returns its size as the part records it (``Sample.num_bytes``)."""
        sizes = sample.sizes()
        self._pending.append(sample)
        self._sizes.append(sizes)
        if len(self._pending) >= BATCH_ROWS:
            self._flush()
        return sizes[0]

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(samples_to_part_batch(self._pending, self._sizes))
            self._pending, self._sizes = [], []

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        self._flush()
        self._writer.close()
        self._sink.close()
        size = os.path.getsize(self._tmp)
        self._ctx.__exit__(None, None, None)
        return size

    def abort(self, exc: BaseException) -> None:
        try:
            self._writer.close()
            self._sink.close()
        finally:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)


def iter_part_rows(store: Store, rel: str, split: str, start: int, stop: int) -> Iterator[pa.Table]:
    """Rows ``[start, stop)`` of ``split`` in a part file, one record batch (16 rows) at a time,
    so reading never holds more of the part than that."""
    seen = 0
    with store.open_arrow(rel) as source:
        reader = ipc.open_stream(source)
        if not reader.schema.equals(PART_SCHEMA):  # e.g. a run interrupted under an older engine, resumed
            raise EngineError(
                f"{store.path(rel)} is a part file of another engine version; "
                "run the conversion again with --overwrite"
            )
        for batch in reader:
            mask = pc.equal(batch.column("split"), split)
            if not pc.all(mask).as_py():  # a part usually holds one split: then no filtering copy
                batch = batch.filter(mask)
            lo, hi = max(start - seen, 0), min(stop - seen, batch.num_rows)
            seen += batch.num_rows
            if hi > lo:
                yield pa.Table.from_batches([with_source_bytes(batch.slice(lo, hi - lo))])
            if seen >= stop:
                return


class SourceChanged(EngineError):
    """A source image referenced by a part file changed after its row was converted."""


def with_source_bytes(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with every referenced source image read back into ``images.bytes``.

    The bytes go straight from each file into one Arrow buffer (no intermediate copy). A
    file whose size or modification time differs from the reference raises SourceChanged:
    writing other bytes than were checked would break the dataset's guarantees."""
    sources = batch.column("image_sources")
    if sources.null_count == len(sources):
        return batch
    images = batch.column("images")
    flat = images.flatten()  # one struct per image, in row order
    data, names = flat.flatten()
    refs = _aligned_refs(images, sources)
    embedded = pc.binary_length(data).fill_null(0).to_pylist()  # 0 where a reference stands
    sizes = [ref["size"] if ref else n for ref, n in zip(refs, embedded)]
    offsets = np.zeros(len(sizes) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    buffer = pa.allocate_buffer(int(offsets[-1]))
    view = memoryview(buffer)
    opened: dict[str, Any] = {}  # one open per file and batch: a tar's members share it
    try:
        for i, ref in enumerate(refs):
            start, stop = int(offsets[i]), int(offsets[i + 1])
            if ref:
                _read_source(ref, view[start:stop], opened)
            elif stop > start:
                view[start:stop] = memoryview(data[i].as_buffer())
    finally:
        for f in opened.values():
            f.close()
    valid = [bool(ref) or ok for ref, ok in zip(refs, data.is_valid().to_pylist())]
    validity = None if all(valid) else pa.array(valid).buffers()[1]
    new_data = pa.Array.from_buffers(pa.binary(), len(refs), [validity, pa.py_buffer(offsets), buffer])
    struct = pa.StructArray.from_arrays([new_data, names], fields=list(IMAGE_STRUCT))
    new_images = pa.ListArray.from_arrays(
        pc.subtract(images.offsets, images.offsets[0]), struct, type=images.type
    )
    return batch.set_column(batch.schema.get_field_index("images"), "images", new_images)


def _aligned_refs(images: pa.ListArray, sources: pa.ListArray) -> list[dict | None]:
    """One reference (or None) per image, rows without references padded with None."""
    refs: list[dict | None] = []
    for row_images, row_sources in zip(images.value_lengths().to_pylist(), sources.to_pylist()):
        refs.extend(row_sources if row_sources is not None else [None] * row_images)
    return refs


def _read_source(ref: dict, into: memoryview, opened: dict[str, Any]) -> None:
    """Read one reference's bytes into ``into``: the whole file, or (``offset`` set) the range
    of a tar member, after checking the file is as it was when its row was converted."""
    path, offset = ref["path"], ref["offset"]
    try:
        f = opened.get(path)
        if f is None:
            f = opened[path] = open(path, "rb", buffering=0)
        st = os.fstat(f.fileno())
        fits = st.st_size == ref["size"] if offset is None else st.st_size >= offset + ref["size"]
        if fits and st.st_mtime_ns == ref["mtime_ns"]:
            f.seek(offset or 0)
            got = 0
            while got < len(into):
                n = f.readinto(into[got:])
                if not n:
                    break
                got += n
            if got == ref["size"]:
                return
    except OSError as exc:
        raise SourceChanged(
            f"source {_what(offset)} {path} cannot be read back ({exc.strerror or exc}); it was "
            "converted earlier in this run and must stay in place until the run ends"
        ) from None
    raise SourceChanged(
        f"source {_what(offset)} {path} changed while the dataset was being written (its size or "
        "modification time differs); run the conversion again with --overwrite"
    )


def _what(offset: int | None) -> str:
    return "image" if offset is None else "file"  # a file holding images at offsets: a tar

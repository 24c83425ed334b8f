"""Per-unit part files: the processed rows of one work unit as an Arrow IPC stream.

Every layout's final shards are assembled from parts, cut by row sizes alone, so the final
files are the same whatever the number of workers or units.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from engine.records import PART_SCHEMA, Sample, samples_to_part_batch
from engine.sinks.store import Store

BATCH_ROWS = 16


class PartWriter:
    """Streams samples into ``path`` in small batches; the file appears only on ``close``."""

    def __init__(self, store: Store, rel: str):
        self._pending: list[Sample] = []
        self._ctx = store.writing(rel, durable=False)  # scratch: a resumed run checks its size
        self._tmp = self._ctx.__enter__()
        self._sink = pa.OSFile(self._tmp, "wb")
        self._writer = ipc.new_stream(self._sink, PART_SCHEMA)

    def write(self, sample: Sample) -> None:
        self._pending.append(sample)
        if len(self._pending) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(samples_to_part_batch(self._pending))
            self._pending = []

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
        for batch in ipc.open_stream(source):
            mask = pc.equal(batch.column("split"), split)
            if not pc.all(mask).as_py():  # a part usually holds one split: then no filtering copy
                batch = batch.filter(mask)
            lo, hi = max(start - seen, 0), min(stop - seen, batch.num_rows)
            seen += batch.num_rows
            if hi > lo:
                yield pa.Table.from_batches([batch.slice(lo, hi - lo)])
            if seen >= stop:
                return

"""Final shards: the descriptor the driver builds, and their rows read back from the parts one
row group at a time. Each layout (``engine.layouts``) writes the groups; this module knows none."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import EngineError
from engine.sinks.parts import iter_part_rows
from engine.sinks.store import Store
from engine.workdir import WORK_DIR


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows ``[start, stop)`` of one split inside one part file (path relative to OUT)."""

    part: str
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """A small, picklable description of one final shard, built by the driver."""

    layout: Any  # the run's engine.layouts.Layout, which writes the shard
    split: str
    relpath: str  # final path relative to OUT
    pieces: tuple[Piece, ...]
    schema: pa.Schema  # final schema with the huggingface metadata, built once on the driver
    row_groups: tuple[int, ...]  # rows per row group, cut by the driver from row sizes
    store: Store
    path_prefix: str = ""  # fs-image: prepended to the "images/..." paths (absolute or relative to a folder)
    # reads a piece's rows (store, part, split, start, stop) as part-schema tables; None: a part file
    reader: Callable | None = None


@dataclass(slots=True)
class ShardResult:
    path: str  # relative to OUT
    split: str
    num_rows: int
    num_bytes: int  # file size
    node: str | None = None  # Ray node that wrote it (set by the runner); None: the driver


GROUPS_IN_MEMORY = 2  # row groups a shard writer holds: the one being written, the next being read


def write_row_groups(spec: ShardSpec, write: Callable[[pa.Table], None]) -> int:
    """Hand the shard's rows, in line order and in the part schema, to ``write`` one row group
    at a time; returns the number of rows.

    Pipelined and bounded: a reader thread assembles the next group (parts, and the source files
    they reference) while ``write`` runs, and at most GROUPS_IN_MEMORY groups exist at once.
    - Parts are read a record batch (16 rows) at a time, only as their rows are needed.
    - No frame keeps a group once it is written (a generator's local once held one more).
    - Both threads hand mimalloc's freed pages back after every group (it keeps them per thread).
    - A group's columns keep the parts' record batches as chunks, uncopied: the Parquet writer
      cuts pages by content and the Arrow writer re-cuts by row sizes, so bytes do not depend on
      the chunks. (Figures: bench/GAP.md, "Shard writer".)
    """
    pool = pa.default_memory_pool()
    slots = threading.Semaphore(GROUPS_IN_MEMORY)
    handoff: queue.SimpleQueue = queue.SimpleQueue()
    stopping = threading.Event()

    def before_group() -> bool:
        slots.acquire()
        pool.release_unused()  # the pages of groups written since, freed by the other thread
        return not stopping.is_set()

    def read() -> None:
        try:
            _assemble_groups(spec, before_group, handoff.put)
            handoff.put(None)
        except BaseException as exc:  # noqa: BLE001 - raised again in the writing thread
            handoff.put(exc)

    reader = threading.Thread(target=read, name="engine-row-groups", daemon=True)
    reader.start()
    try:
        while (item := handoff.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            write(item)
            del item
            slots.release()
            pool.release_unused()
    finally:
        stopping.set()
        slots.release()  # a reader waiting for a slot sees ``stopping`` and ends
        reader.join()
    return sum(spec.row_groups)


def _assemble_groups(
    spec: ShardSpec, before_group: Callable[[], bool], emit: Callable[[pa.Table], None]
) -> None:
    """Build the shard's row groups from its pieces of part files and ``emit`` each one; stops
    early when ``before_group`` says so."""
    read = spec.reader or iter_part_rows
    batches = (
        table
        for piece in spec.pieces
        for table in read(spec.store, piece.part, spec.split, piece.start, piece.stop)
    )
    pending: list[pa.Table] = []
    have = 0
    for count in spec.row_groups:
        if not before_group():
            return
        while have < count:
            table = next(batches, None)
            if table is None:
                raise EngineError(
                    f"the part files in {spec.store.path(WORK_DIR)} hold fewer rows than "
                    f"{spec.relpath} needs; run the conversion again with --overwrite"
                )
            pending.append(table)
            have += table.num_rows
            del table
        leftover = have - count  # rows beyond this group all come from the last batch read
        taken, pending = pending, ([pending[-1].slice(pending[-1].num_rows - leftover)] if leftover else [])
        have = leftover
        emit(pa.concat_tables(taken).slice(0, count))
        del taken


def map_list_chunks(column: pa.ChunkedArray, build, type: pa.DataType) -> pa.ChunkedArray:
    """Rebuild a list column chunk by chunk: ``build(values)`` maps the flattened values of a
    chunk to the new list items; offsets are kept. No image bytes are copied."""
    chunks = []
    for chunk in column.chunks:
        offsets = pc.subtract(chunk.offsets, chunk.offsets[0])
        chunks.append(pa.ListArray.from_arrays(offsets, build(chunk.flatten()), type=type))
    return pa.chunked_array(chunks, type=type)

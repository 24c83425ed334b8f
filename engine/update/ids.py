"""The row ids of a packed dataset: ``OUT/row_ids.parquet``, one row per dataset row in dataset
order (splits in order, then line order), which ``datasets.load_from_disk`` ignores.

The packed layout stores no ``image_id`` column, and a row's byte size (which cuts shards and
record batches) also counts fields it does not store (``meta``), so ``engine update`` reads both
from here: ``num_bytes`` is the row's size, ``text_chars`` the part of it its text column makes
(the conversation's JSON, or the pretraining text).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from engine.sinks.store import Store

ROW_IDS = "row_ids.parquet"
ROW_IDS_SCHEMA = pa.schema(
    [("split", pa.string()), ("image_id", pa.string()), ("num_bytes", pa.int64()), ("text_chars", pa.int64())]
)


def text_chars(batch: pa.RecordBatch | pa.Table) -> pa.Array:
    """Characters of each part row's text column (conversations JSON, or text), as its part records them."""
    return batch.column("text_chars")


def part_row_ids(store: Store, part: str, split: str, with_line: bool = False) -> pa.Table:
    """The ids, sizes and text sizes of one split's rows in a part file (and their manifest lines,
    ``with_line``). Locally the file is memory-mapped, so only these columns' pages are read, not the
    images."""
    schema = pa.schema([("line", pa.int64()), *ROW_IDS_SCHEMA]) if with_line else ROW_IDS_SCHEMA
    source = store.open_arrow(part) if store.remote else pa.memory_map(store.path(part), "r")
    tables = []
    with source:
        for batch in ipc.open_stream(source):
            batch = batch.filter(pc.equal(batch.column("split"), split))
            columns = {
                "split": batch.column("split"),
                "image_id": batch.column("image_id"),
                "num_bytes": batch.column("num_bytes"),
                "text_chars": text_chars(batch),
            }
            if with_line:
                columns = {"line": batch.column("line"), **columns}
            tables.append(pa.table(columns, schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def row_ids_from_parts(store: Store, results: Sequence, splits: Sequence[str]) -> pa.Table:
    """The row ids of a conversion, from its units' part files (unit order is line order)."""
    tables = [part_row_ids(store, r.part, split) for split in splits for r in results if split in r.sizes]
    return pa.concat_tables(tables) if tables else ROW_IDS_SCHEMA.empty_table()


def write_row_ids(store: Store, table: pa.Table) -> None:
    with store.writing(ROW_IDS) as tmp:
        pq.write_table(table.cast(ROW_IDS_SCHEMA), tmp, compression="zstd")


def read_row_ids(store: Store) -> pa.Table | None:
    if not store.is_file(ROW_IDS):
        return None
    if store.remote:
        with store.fs.open(store.path(ROW_IDS), "rb") as f:
            return pq.read_table(f)
    return pq.read_table(store.path(ROW_IDS))

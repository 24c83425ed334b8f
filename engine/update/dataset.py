"""A finished dataset as ``engine update`` reads it: its stats, options, config and shards."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.ipc as ipc

from engine.config import ConvertOptions, FetchOptions, ImageOptions, TaskConfig, parse_task_config
from engine.errors import ConfigError, UsageError
from engine.layouts import layout_for
from engine.layouts.base import Layout
from engine.sinks.store import Store
from engine.update.ids import read_row_ids
from engine.workdir import WORK_DIR, in_progress


@dataclass
class Dataset:
    store: Store
    stats: dict[str, Any]
    layout: str  # parquet | arrow
    task: TaskConfig | None
    files: dict[str, list[str]]  # split -> its shards, in order
    row_ids: pa.Table | None  # packed layout
    text_column: str  # packed layout: conversations | text

    @property
    def options(self) -> dict[str, Any]:
        return self.stats["options"]

    @property
    def fs_image(self) -> bool:
        return bool(self.options.get("images_as_paths"))

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.stats.get("updates", [])


def open_dataset(store: Store) -> Dataset:
    """The finished dataset in ``store``, or a UsageError saying why it is not one."""
    root = store.root
    if in_progress(store):
        raise UsageError(
            f"{root} holds an unfinished conversion ({WORK_DIR}/); finish it with "
            "'engine convert --resume' first"
        )
    if not store.is_file("stats.json"):
        raise UsageError(f"{root} is not a finished dataset (no stats.json)")
    try:
        stats = orjson.loads(store.read_bytes("stats.json"))
        options, splits = stats["options"], stats["splits"]
        layout = options["layout"]
        files = {name: list(s["files"]) for name, s in splits.items()}
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{root}/stats.json is not the stats of an engine dataset") from None
    from engine.layouts import LAYOUTS

    if layout not in LAYOUTS or not LAYOUTS[layout].updatable:
        raise UsageError(
            f"engine update cannot change a --layout {layout} dataset yet (it updates "
            f"{', '.join(n for n, c in LAYOUTS.items() if c.updatable)}); convert it again"
        )
    if options.get("images_as_paths") and store.remote:
        raise UsageError("engine update handles fs-image datasets (--images-as-paths) in local folders only")
    for shards in files.values():
        for rel in shards:
            if not store.is_file(rel):
                raise UsageError(f"{root} lacks its shard {rel}; it is not a complete dataset")
    task = None
    if store.is_file("config.json"):
        try:
            task = parse_task_config(store.read_bytes("config.json"), f"{root}/config.json")
        except ConfigError as exc:
            raise UsageError(f"the dataset's own config.json is not usable: {exc}") from None
    row_ids, text_column = None, "conversations"
    if layout == "arrow":
        row_ids = read_row_ids(store)
        if row_ids is None:
            raise UsageError(
                f"{root} has no row_ids.parquet (it was made before 'engine update' existed); "
                "convert it again to update it"
            )
        if row_ids.num_rows != sum(s["num_rows"] for s in splits.values()):
            raise UsageError(f"{root}/row_ids.parquet does not match the dataset's row count")
        first = next((rel for shards in files.values() for rel in shards), None)
        if first is not None:
            with store.open_arrow(first) as f:
                names = ipc.open_stream(f).schema.names
            text_column = "text" if "text" in names else "conversations"
    return Dataset(
        store=store,
        stats=stats,
        layout=layout,
        task=task,
        files=files,
        row_ids=row_ids,
        text_column=text_column,
    )


def dataset_layout(ds: Dataset) -> Layout:
    """The Layout the dataset was written with (from its recorded options)."""
    return layout_for(convert_options(ds, out=ds.store.root))


def convert_options(ds: Dataset, **override: Any) -> ConvertOptions:
    """The options the dataset was made with (from stats.json), with ``override`` applied."""
    known = {f.name for f in dataclasses.fields(ConvertOptions)}
    doc = {k: v for k, v in ds.options.items() if k in known}
    image = {
        k: v for k, v in doc.pop("image").items() if k in {f.name for f in dataclasses.fields(ImageOptions)}
    }
    fetch = {
        k: v for k, v in doc.pop("fetch").items() if k in {f.name for f in dataclasses.fields(FetchOptions)}
    }
    doc.update(override)
    return ConvertOptions(image=ImageOptions(**image), fetch=FetchOptions(**fetch), **doc)

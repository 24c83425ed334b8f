"""Find a dataset's files and read them batch by batch: the engine's Parquet extraction layout,
its packed Arrow layouts (raw-image, fs-image; one split or a DatasetDict), and any Hugging Face
Parquet dataset with an image column, on a local disk or any fsspec URL."""

from __future__ import annotations

import contextlib
import posixpath
import re
from bisect import bisect_right
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.errors import UsageError

# datasets' shard names ("train-00000-of-00003.parquet", "test.parquet") and split folders
_SHARD_SPLIT = re.compile(r"^(?P<split>[\w.]+?)(-\d{5}-of-\d{5})?\.(parquet|arrow)$")
_KNOWN_SPLITS = ("train", "validation", "valid", "val", "dev", "test")


@dataclass(frozen=True)
class DataFile:
    split: str
    location: str  # a local path or an fsspec URL
    kind: str  # "parquet" or "arrow"
    base: str  # the folder fs-image paths resolve against (the dataset's root)


@dataclass
class Dataset:
    root: str
    layout: str  # "parquet" or "arrow"
    files: list[DataFile]
    config: dict[str, Any] | None = None
    config_error: str | None = None
    stats: dict[str, Any] | None = None
    card: str | None = None
    variant: str = ""  # packed layouts: "raw-image" or "fs-image"; Parquet: "messages" or ""

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(f.split for f in self.files))


@dataclass
class Rows:
    """One batch of rows, reduced to what inspect and check need."""

    split: str
    file: str
    start: int  # index of the first row within its file
    image_ids: list[str | None]
    images: list[list[tuple[bytes | None, str | None]]]  # per row: (bytes, path) per image
    outputs: list[str | None]  # the expected output (the assistant turn in the packed layouts)
    conversations: list[list[dict[str, Any]] | None] | None  # packed and messages layouts only
    image_parts: list[list[int | None]] | None = None  # messages layout: each row's image parts' index


class FS:
    """A thin view of a local folder or an fsspec URL."""

    def __init__(self, root: str):
        import fsspec

        self.fs, self.path = fsspec.core.url_to_fs(root)
        self.path = self.path.rstrip("/") or "/"
        self.remote = "://" in root and not root.startswith("file://")
        self.root = root.rstrip("/")

    def url(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.exists(posixpath.join(self.path, rel))

    def read(self, rel: str) -> bytes | None:
        try:
            with self.fs.open(posixpath.join(self.path, rel), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def find(self, suffix: str) -> list[str]:
        """Relative paths of every file under the root whose name ends with ``suffix``, sorted."""
        found = self.fs.find(self.path)
        cut = len(self.path.rstrip("/")) + 1
        return sorted(p[cut:] for p in found if p.endswith(suffix))

    def open(self, location: str):
        return self.fs.open(_strip(location, self), "rb")

    def size(self, location: str) -> int:
        return int(self.fs.size(_strip(location, self)))


def _strip(location: str, fs: FS) -> str:
    return (
        posixpath.join(fs.path, location[len(fs.root) + 1 :])
        if location.startswith(fs.root + "/")
        else location
    )


def open_dataset(root: str) -> tuple[Dataset, FS]:
    """Discover the layout and files of ``root``. A usage error when it holds no dataset."""
    fs = FS(root)
    if not fs.fs.exists(fs.path):
        raise UsageError(f"no such dataset folder: {root}")
    if fs.fs.isfile(fs.path):  # one Parquet file
        if not root.endswith(".parquet"):
            raise UsageError(f"{root} is a file, not a dataset folder or a .parquet file")
        parent = FS(root.rsplit("/", 1)[0] if "/" in root else ".")
        name = root.rsplit("/", 1)[-1]
        return Dataset(
            root=parent.root,
            layout="parquet",
            files=[DataFile(_split_of(name), root, "parquet", parent.root)],
        ), parent
    ds = Dataset(root=fs.root, layout="parquet", files=[])
    _read_sidecars(ds, fs)
    dataset_dict = fs.read("dataset_dict.json")
    if fs.exists("state.json") or dataset_dict is not None:
        ds.layout = "arrow"
        splits = orjson.loads(dataset_dict)["splits"] if dataset_dict is not None else [""]
        for split in splits:
            folder = f"{split}/" if split else ""
            raw = fs.read(f"{folder}state.json")
            if raw is None:
                raise UsageError(f"{fs.url(folder + 'state.json')} is missing: not a save_to_disk folder")
            state = orjson.loads(raw)
            name = state.get("_split") or split or "train"
            for entry in state.get("_data_files", []):
                ds.files.append(DataFile(name, fs.url(folder + entry["filename"]), "arrow", fs.root))
        ds.variant = _packed_variant(ds, fs)
        return ds, fs
    parquet = [p for p in fs.find(".parquet") if not p.split("/")[0].startswith(".")]
    if not parquet:
        raise UsageError(f"{root} holds no dataset: no .parquet files, no state.json or dataset_dict.json")
    for rel in parquet:
        ds.files.append(DataFile(_split_of(rel), fs.url(rel), "parquet", fs.root))
    ds.files.sort(key=lambda f: (_split_rank(f.split), f.split, f.location))
    with fs.open(ds.files[0].location) as fh:
        ds.variant = "messages" if is_messages_schema(pq.ParquetFile(fh).schema_arrow) else ""
    return ds, fs


def _packed_variant(ds: Dataset, fs: FS) -> str:
    import pyarrow.ipc as ipc

    if not ds.files:
        return ""
    with fs.open(ds.files[0].location) as fh:
        schema = ipc.open_stream(fh).schema
    if "modalities" not in schema.names:
        return ""
    value = schema.field("modalities").type.value_type.field("value").type
    return "fs-image" if pa.types.is_string(value) or pa.types.is_large_string(value) else "raw-image"


def _read_sidecars(ds: Dataset, fs: FS) -> None:
    raw = fs.read("config.json")
    if raw is not None:
        try:
            ds.config = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            ds.config_error = f"config.json is not valid JSON: {exc}"
    raw = fs.read("stats.json")
    if raw is not None:
        try:
            ds.stats = orjson.loads(raw)
        except orjson.JSONDecodeError:
            ds.stats = None
    raw = fs.read("README.md")
    if raw is not None:
        ds.card = raw.decode("utf-8", "replace")


def _split_of(rel: str) -> str:
    parts = rel.split("/")
    for folder in parts[:-1][::-1]:
        if folder in _KNOWN_SPLITS:
            return folder
    m = _SHARD_SPLIT.match(parts[-1])
    name = m.group("split") if m else parts[-1].rsplit(".", 1)[0]
    return name if name and not name.startswith("data") else "train"


def _split_rank(name: str) -> int:
    return {"train": 0, "validation": 1, "test": 2}.get(name, 9)


def image_column(schema: pa.Schema) -> str | None:
    """The image column of a Parquet schema: an ``Image`` feature in the ``huggingface``
    metadata, else the first ``struct<bytes, path>`` column."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            features = orjson.loads(meta).get("info", {}).get("features", {})
        except orjson.JSONDecodeError:
            features = {}
        for name, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") == "Image" and name in schema.names:
                return name
    for f in schema:
        if pa.types.is_struct(f.type) and {"bytes", "path"} <= {c.name for c in f.type}:
            return f.name
    return None


def is_messages_schema(schema: pa.Schema) -> bool:
    """The messages layout's shape (TRL's, llava-instruct-mix-vsft's): ``messages``, a list of
    ``{role, content: list<struct>}``, and ``images``, a list of ``struct<bytes, path>``."""
    if "messages" not in schema.names or "images" not in schema.names:
        return False
    messages, images = schema.field("messages").type, schema.field("images").type
    if not (pa.types.is_list(messages) or pa.types.is_large_list(messages)):
        return False
    if not (pa.types.is_list(images) or pa.types.is_large_list(images)):
        return False
    turn, image = messages.value_type, images.value_type
    return (
        pa.types.is_struct(turn)
        and {"role", "content"} <= {c.name for c in turn}
        and pa.types.is_struct(image)
        and {"bytes", "path"} <= {c.name for c in image}
    )


def row_count(ds: Dataset, fs: FS) -> int | None:
    """Rows in the whole dataset, from the Parquet footers or the save_to_disk metadata."""
    total = 0
    folders: set[str] = set()
    for f in ds.files:
        if f.kind == "parquet":
            with fs.open(f.location) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        else:
            folders.add(posixpath.dirname(f.location))
    for folder in folders:
        raw = fs.read(posixpath.join(folder[len(fs.root) :].lstrip("/"), "dataset_info.json"))
        try:
            total += sum(
                s.get("num_examples", 0) for s in (orjson.loads(raw or b"{}").get("splits") or {}).values()
            )
        except (orjson.JSONDecodeError, AttributeError):
            return None
    return total


def iter_rows(ds: Dataset, fs: FS, *, with_images: bool = True) -> Iterator[Rows]:
    """Every row of every file, one Parquet row group or Arrow record batch at a time."""
    for f in ds.files:
        yield from iter_file_rows(f, fs, with_images=with_images)


def iter_file_rows(
    f: DataFile, fs: FS, rows_needed: Collection[int] | None = None, *, with_images: bool = True
) -> Iterator[Rows]:
    """One file's rows; with ``rows_needed`` (row numbers within the file), only the Parquet row
    groups holding them (an Arrow stream has no index: it is read whole)."""
    if f.kind == "parquet":
        yield from _parquet_rows(f, fs, with_images, rows_needed)
    else:
        yield from _arrow_rows(f, fs, with_images)


def _row_groups(pf: pq.ParquetFile, rows_needed: Collection[int] | None) -> list[tuple[int, int]]:
    """(row group, its first row) for the row groups to read."""
    starts = list(
        accumulate((pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)), initial=0)
    )
    groups = (
        range(pf.num_row_groups)
        if rows_needed is None
        else sorted({bisect_right(starts, r) - 1 for r in rows_needed})
    )
    return [(i, starts[i]) for i in groups]


def _parquet_rows(
    f: DataFile, fs: FS, with_images: bool, rows_needed: Collection[int] | None = None
) -> Iterator[Rows]:
    local = None if fs.remote else _local_path(f.location)
    with contextlib.nullcontext(local) if local else fs.open(f.location) as source:
        pf = pq.ParquetFile(source)  # not memory-mapped: mapped pages would count as resident memory
        schema = pf.schema_arrow
        image = image_column(schema)
        groups = _row_groups(pf, rows_needed)
        if image is None and is_messages_schema(schema):
            yield from _messages_rows(f, pf, with_images, groups)
            return
        if image is None:
            raise UsageError(f"{f.location} has no image column (an Image feature or a struct<bytes, path>)")
        columns = [c for c in ("image_id", "output") if c in schema.names]
        if with_images:
            columns.append(image)
        # the reader first: it ends (and shuts its thread) when the row groups do
        for table, (_, start) in zip(
            _prefetched(pf.read_row_group(i, columns=columns) for i, _ in groups), groups
        ):
            n = table.num_rows
            ids = table["image_id"].to_pylist() if "image_id" in table.column_names else [None] * n
            ids = [None if v is None else str(v) for v in ids]
            outputs = table["output"].to_pylist() if "output" in table.column_names else [None] * n
            images: list[list[tuple[bytes | memoryview | None, str | None]]]
            if with_images:
                data, paths = [], []
                for chunk in table[image].chunks:  # not combine_chunks: that copies every image
                    blobs = pc.struct_field(chunk, "bytes")
                    data += binary_views(blobs)
                    # a path matters only where there are no bytes (and reading them costs 8 us a row)
                    paths += (
                        pc.struct_field(chunk, "path").to_pylist()
                        if blobs.null_count
                        else [None] * len(chunk)
                    )
                images = [[(b, p)] if (b is not None or p is not None) else [] for b, p in zip(data, paths)]
            else:
                images = [[] for _ in range(n)]
            yield Rows(f.split, f.location, start, ids, images, outputs, None)


def _messages_rows(
    f: DataFile, pf: pq.ParquetFile, with_images: bool, groups: list[tuple[int, int]]
) -> Iterator[Rows]:
    """The messages layout: every image of the ``images`` list, the conversation with its image
    parts shown where they stand, and the last assistant turn's text as the output. No id column:
    rows are named by file and position, as in the packed layouts."""
    columns = ["messages", "images"] if with_images else ["messages"]
    for table, (_, start) in zip(
        _prefetched(pf.read_row_group(i, columns=columns) for i, _ in groups), groups
    ):
        n = table.num_rows
        conversations, outputs, parts = [], [], []
        for turns in table["messages"].to_pylist():
            conversation, found = _conversation(turns)
            conversations.append(conversation)
            parts.append(found)
            outputs.append(
                next((t["content"] for t in reversed(conversation or []) if t["role"] == "assistant"), None)
            )
        images: list[list[tuple[bytes | memoryview | None, str | None]]] = []
        if with_images:
            for chunk in table["images"].chunks:  # the list's elements as zero-copy views, as above
                offsets = chunk.offsets.to_pylist()
                values = chunk.values
                blobs = pc.struct_field(values, "bytes")
                data = binary_views(blobs)
                paths = pc.struct_field(values, "path").to_pylist() if blobs.null_count else None
                for r in range(len(chunk)):
                    lo, hi = offsets[r], offsets[r + 1]
                    images.append([(data[k], paths[k] if paths else None) for k in range(lo, hi)])
        else:
            images = [[] for _ in range(n)]
        yield Rows(f.split, f.location, start, [None] * n, images, outputs, conversations, parts)


def _conversation(
    turns: list[dict[str, Any]] | None,
) -> tuple[list[dict[str, Any]] | None, list[int | None]]:
    """Messages turns -> ``{role, content}`` turns of text (an image part shows as ``<image i>``)
    and the index of each image part."""
    if turns is None:
        return None, []
    out, found = [], []
    for turn in turns:
        content = turn.get("content")
        pieces = [content] if isinstance(content, str) else []  # some datasets keep plain-text turns
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image":
                found.append(part.get("index"))
                pieces.append("<image>" if part.get("index") is None else f"<image {part['index']}>")
            elif part.get("text") is not None:
                pieces.append(part["text"])
        out.append({"role": turn.get("role"), "content": "\n".join(pieces)})
    return out, found


def _local_path(location: str) -> str | None:
    from engine.sources.location import local_path

    return local_path(location)


def _prefetched(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Read the next row group in a thread while the caller works on this one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inspect-read") as pool:
        pending = pool.submit(next, tables, None)
        while True:
            table = pending.result()
            if table is None:
                return
            pending = pool.submit(next, tables, None)
            yield table


def binary_views(array: pa.Array) -> list[memoryview | None]:
    """Each value of a binary array as a zero-copy view of the array's data buffer."""
    import numpy as np

    if len(array) == 0:
        return []
    if pa.types.is_large_binary(array.type):
        array = array.cast(pa.binary()) if array.nbytes < 2**31 else array
    _, offsets_buf, data_buf = array.buffers()[:3]
    dtype = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=dtype)[array.offset : array.offset + len(array) + 1].tolist()
    data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
    valid = array.is_valid().to_pylist() if array.null_count else None
    return [
        data[offsets[i] : offsets[i + 1]] if valid is None or valid[i] else None for i in range(len(array))
    ]


def _arrow_rows(f: DataFile, fs: FS, with_images: bool) -> Iterator[Rows]:
    import pyarrow.ipc as ipc

    with fs.open(f.location) as fh:
        reader = ipc.open_stream(fh)
        names = reader.schema.names
        text_column = "conversations" if "conversations" in names else "text" if "text" in names else None
        start = 0
        for batch in reader:
            n = batch.num_rows
            convs = batch.column(text_column).to_pylist() if text_column else [None] * n
            outputs: list[str | None] = []
            conversations: list[list[dict[str, Any]] | None] = []
            for c in convs:
                if isinstance(c, list):
                    conversations.append(c)
                    outputs.append(
                        next((t.get("content") for t in reversed(c) if t.get("role") == "assistant"), None)
                    )
                else:
                    conversations.append([{"role": "text", "content": c}] if c is not None else None)
                    outputs.append(None)
            images: list[list[tuple[bytes | None, str | None]]] = [[] for _ in range(n)]
            if with_images and "modalities" in names:
                for r, items in enumerate(batch.column("modalities").to_pylist()):
                    for item in items or []:
                        if item.get("type") != "image":
                            continue
                        value = item.get("value")
                        if isinstance(value, dict):
                            images[r].append((value.get("bytes"), value.get("path")))
                        else:
                            images[r].append((None, value))
            elif "modalities" in names:
                counts = batch.column("modalities").to_pylist()
                images = [[(None, None)] * len(m or []) for m in counts]
            ids = [None] * n
            yield Rows(f.split, f.location, start, ids, images, outputs, conversations)
            start += n


def load_image_bytes(
    data: bytes | None, path: str | None, f_base: str, split_dir: str | None, fs: FS
) -> bytes | None:
    """The encoded bytes of an image: embedded, or an fs-image path resolved against the split's
    folder, then the dataset's root."""
    if data is not None:
        return data
    if not path:
        return None
    for base in filter(None, (split_dir, f_base)):
        rel = path if not base.startswith(fs.root) else posixpath.join(base[len(fs.root) :].lstrip("/"), path)
        got = fs.read(rel)
        if got is not None:
            return got
    return None

"""An existing dataset as the input: a folder (local or fsspec) of Hugging Face Parquet (the LLM
image-extraction schema, or any Parquet with an ``Image`` column), a ``save_to_disk`` folder
(Arrow stream shards + state.json, or a DatasetDict), or one ``.parquet``/``.arrow`` file.

The driver finds the data files and their splits as ``datasets.load_dataset`` would (the card's
``configs``, then ``data/{split}-*`` and split-named files or folders) and plans row-group ranges;
a worker reads its row groups (Parquet) or record batches (Arrow) one at a time, so memory does
not grow with the dataset. An image cell becomes an ``InlineImage`` (or a path where the cell
holds only a path); the ``meta`` struct's fields and any other column become the row's meta.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa

from engine.errors import UsageError
from engine.records import META_FIXED, Reject
from engine.sources import location, register, splits
from engine.sources.base import InlineImage, Row, Source, SourcePlan
from engine.sources.identity import duplicate_lines

if TYPE_CHECKING:
    from engine.config import ConvertOptions

PARQUET, ARROW = "parquet", "arrow"
HASH_TAIL = 64 * 1024  # bytes of each file's end hashed into the plan's digest (a Parquet footer)
TRAINER_TEXT = ("conversations", "text")  # the packed trainer's text columns (FORMATS.md §4)
ID_COLUMNS = ("image_id", "id")  # tried in this order when --id-column is not given
READ_BATCH_ROWS = 64  # rows turned into Python objects at a time
UNIT_BYTES = 16 * 2**20  # units are merged up to about this much data (a row group may be more)


@dataclass(frozen=True, slots=True)
class DataFile:
    location: str  # a local path or an fsspec URL
    split: str | None  # None: the input names no split (then --split applies)
    kind: str  # parquet | arrow


@dataclass(frozen=True, slots=True)
class Piece:
    """Row groups (Parquet) or record batches (Arrow) ``[start, stop)`` of one data file."""

    file: DataFile
    start: int
    stop: int
    first_line: int  # the 1-based number of its first row in the whole input
    num_rows: int


@dataclass(frozen=True, slots=True)
class DatasetUnit:
    index: int
    num_rows: int
    duplicate_lines: tuple[int, ...]
    pieces: tuple[Piece, ...]
    num_bytes: int = 0  # uncompressed, from the row groups' metadata (or the batches' buffers)


@dataclass(frozen=True)
class DatasetPlan(SourcePlan):
    def coalesce(self, rows_per_unit: int) -> DatasetPlan:
        """As SourcePlan's, and at most about UNIT_BYTES a unit: a unit's rows hold their image
        bytes from the moment they are read, so memory follows the unit's bytes, not its rows."""
        biggest = max((u.num_bytes for u in self.units), default=0)
        if biggest:
            grain = max(u.num_rows for u in self.units)
            rows_per_unit = min(rows_per_unit, max(1, UNIT_BYTES // biggest) * grain)
        return super().coalesce(rows_per_unit)

    def merge(self, index: int, group: Sequence[DatasetUnit]) -> DatasetUnit:
        pieces: list[Piece] = []
        for p in (p for u in group for p in u.pieces):
            last = pieces[-1] if pieces else None
            if last is not None and last.file == p.file and last.stop == p.start:
                pieces[-1] = Piece(p.file, last.start, p.stop, last.first_line, last.num_rows + p.num_rows)
            else:
                pieces.append(p)
        return DatasetUnit(
            index=index,
            num_rows=sum(u.num_rows for u in group),
            duplicate_lines=tuple(d for u in group for d in u.duplicate_lines),
            pieces=tuple(pieces),
            num_bytes=sum(u.num_bytes for u in group),
        )


@dataclass(frozen=True, slots=True)
class Columns:
    """What each column of a data file is to the engine."""

    kind: str  # labelr (an image + output) | trainer (conversations/text + modalities)
    image: str | None  # the image column (labelr); None: the file has none (its rows are rejected)
    id: str | None
    output: str | None
    text: str | None  # trainer: conversations | text
    extra: tuple[str, ...]  # other columns but bytes: copied into meta (the ``meta`` struct's fields too)
    names: tuple[str, ...]  # every column, for the error naming them


def hf_image_columns(schema: pa.Schema) -> list[str]:
    """Columns declared as an ``Image`` feature in the schema's ``huggingface`` metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return []
    try:
        features = orjson.loads(raw).get("info", {}).get("features", {})
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return [
        name
        for name, f in features.items()
        if isinstance(f, dict) and f.get("_type") == "Image" and name in schema.names
    ]


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and {"bytes", "path"} <= {t.field(i).name for i in range(t.num_fields)}


def _is_binary(t: pa.DataType) -> bool:
    """Bytes (another image column, say): never text in meta."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _is_binary(t.value_type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_image_struct(t)


def columns_of(
    schema: pa.Schema,
    image_column: str | None = None,
    id_column: str | None = None,
    output_column: str | None = None,
) -> Columns:
    names = tuple(schema.names)
    text = next((c for c in TRAINER_TEXT if c in names), None)
    ident = (
        id_column
        if id_column in names
        else None
        if id_column
        else next((c for c in ID_COLUMNS if c in names), None)
    )
    if image_column is None and text is not None and "modalities" in names:
        return Columns("trainer", None, ident, None, text, (), names)
    image = image_column if image_column in names else None
    if image_column is None:
        found = hf_image_columns(schema) or [f.name for f in schema if _is_image_struct(f.type)]
        image = found[0] if found else None
    output = output_column or "output"
    output = output if output in names else None
    extra = tuple(f.name for f in schema if f.name not in (image, ident, output) and not _is_binary(f.type))
    return Columns("labelr", image, ident, output, None, extra, names)


def no_image_reason(where: str, cols: Columns, image_column: str | None) -> str:
    wanted = (
        f"no column {image_column!r} (--image-column)"
        if image_column
        else "no image column (an Image feature or a struct<bytes, path>; name another with --image-column)"
    )
    return f"{where} has {wanted}; its columns: {', '.join(cols.names) or '(none)'}"


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return orjson.dumps(value, default=str).decode()


# --- finding the data files ---------------------------------------------------------------


def _fs(where: str):
    import fsspec

    return fsspec.core.url_to_fs(where)


def _join(where: str, rel: str) -> str:
    return posixpath.join(where.rstrip("/"), rel) if location.is_url(where) else location.resolve(rel, where)


def _read(where: str, rel: str) -> bytes | None:
    try:
        with location.open_binary(_join(where, rel)) as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def is_dataset(where: str) -> bool:
    """A .parquet/.arrow file, a save_to_disk folder, or a folder holding Parquet files near its top."""
    if where.startswith(("http://", "https://")):  # no folders over HTTP: only the suffix, no request
        return where.split("?", 1)[0].endswith((".parquet", ".arrow"))
    try:
        fs, path = _fs(where)
        if fs.isfile(path):
            return path.endswith((".parquet", ".arrow"))
        if not fs.isdir(path):
            return False
        if fs.exists(posixpath.join(path, "state.json")) or fs.exists(
            posixpath.join(path, "dataset_dict.json")
        ):
            return True
        return any(
            fs.glob(posixpath.join(path, pattern))
            for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet")
        )
    except Exception:  # noqa: BLE001 - detection never raises: check() reports a missing input
        return False


def discover(where: str) -> tuple[list[DataFile], bytes]:
    """The data files of ``where`` in split order, and the bytes that say how they were found
    (the card, state.json files) for the plan's digest."""
    try:
        fs, path = _fs(where)
        exists = fs.exists(path)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"--input {where}: {exc}") from None
    if not exists:
        raise UsageError(f"input not found: {where}")
    if fs.isfile(path):
        kind = PARQUET if path.endswith(".parquet") else ARROW if path.endswith(".arrow") else None
        if kind is None:
            raise UsageError(f"{where} is a file, not a .parquet or .arrow file or a dataset folder")
        return [DataFile(where, None, kind)], b""
    dataset_dict = _read(where, "dataset_dict.json")
    state = _read(where, "state.json")
    if dataset_dict is not None or state is not None:
        return _save_to_disk_files(where, dataset_dict, state)
    return _parquet_files(where)


def _save_to_disk_files(
    where: str, dataset_dict: bytes | None, state: bytes | None
) -> tuple[list[DataFile], bytes]:
    files: list[DataFile] = []
    seen = b""
    try:
        splits = orjson.loads(dataset_dict)["splits"] if dataset_dict is not None else [None]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"{_join(where, 'dataset_dict.json')} is not a datasets DatasetDict file") from None
    for split in splits:
        folder = _join(where, split) if split else where
        raw = state if split is None else _read(folder, "state.json")
        if raw is None:
            raise UsageError(f"{_join(folder, 'state.json')} is missing: not a save_to_disk folder")
        try:
            doc = orjson.loads(raw)
            names = [entry["filename"] for entry in doc["_data_files"]]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{_join(folder, 'state.json')} is not a save_to_disk state.json") from None
        seen += raw
        name = split or doc.get("_split")
        files += [DataFile(_join(folder, n), name, ARROW) for n in names]
    return files, seen


def _parquet_files(where: str) -> tuple[list[DataFile], bytes]:
    """As ``datasets.load_dataset(where)`` resolves a folder: the default config of the card's
    ``configs``, else its default split patterns."""
    card = _read(where, "README.md") or b""
    base = where if location.is_url(where) else location.resolve(where, ".")
    patterns = _card_patterns(card)
    if patterns is not None:  # every labelr and engine dataset
        files = [
            DataFile(f, split, PARQUET) for split, found in _resolve(base, patterns).items() for f in found
        ]
    else:  # the folder's layout, as datasets' default split patterns read it
        fs, root = _fs(base)
        root = root.rstrip("/") or "/"
        try:
            tree = splits.Tree(fs, root)
            patterns = splits.data_patterns(tree)
            resolved = splits.data_files(tree, patterns)
        except FileNotFoundError:
            raise UsageError(
                f"{where} holds no dataset: no .parquet files, no state.json or dataset_dict.json"
            ) from None
        unsplit = patterns == splits.UNSPLIT  # no split in any name: the run's --split names it
        files = [
            DataFile(_with_protocol(f, where), None if unsplit else split, PARQUET)
            for split, found in resolved.items()
            for f in found
            if ".parquet" in ["." + x for x in posixpath.basename(f).split(".")[1:]]
        ]
    if not files:
        raise UsageError(f"{where} holds no .parquet files (and no state.json or dataset_dict.json)")
    return files, card


def card_front_matter(card: bytes) -> dict[str, Any] | None:
    """A dataset card's YAML front matter, or None when it has none (or it does not parse)."""
    import yaml

    text = card.decode("utf-8", "replace")
    end = text.find("\n---", 3)
    if not text.startswith("---") or end < 0:
        return None
    try:
        doc = yaml.load(text[3:end], Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    return doc if isinstance(doc, dict) else None


def _card_patterns(card: bytes) -> dict[str, list[str]] | None:
    """The ``data_files`` of the card's default config (``default: true``, else the one named
    ``default``, else the first) as split -> patterns, the way ``datasets`` normalises them; None
    when the card has no ``configs``."""
    doc = card_front_matter(card)
    configs = [
        c for c in (doc.get("configs") if isinstance(doc, dict) else None) or [] if isinstance(c, dict)
    ]
    if not configs:
        return None
    chosen = next((c for c in configs if c.get("default")), None) or next(
        (c for c in configs if c.get("config_name", "default") == "default"), configs[0]
    )
    files = chosen.get("data_files")
    if isinstance(files, str):
        return {"train": [files]}
    if isinstance(files, dict):
        return {str(k): v if isinstance(v, list) else [v] for k, v in files.items()}
    if isinstance(files, list) and files and all(isinstance(f, dict) for f in files):
        out: dict[str, list[str]] = {}
        for f in files:
            paths = f.get("path")
            out.setdefault(str(f.get("split", "train")), []).extend(
                paths if isinstance(paths, list) else [paths]
            )
        return out
    return {"train": files} if isinstance(files, list) and files else None


def _resolve(base: str, patterns: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each split's .parquet files, as ``datasets.data_files.resolve_pattern`` finds them: a
    glob under ``base``, files only, no hidden or ``__special__`` folder the pattern does not name."""
    fs, root = _fs(base)
    root = root.rstrip("/")
    protocol = base.split("://", 1)[0] + "://" if location.is_url(base) else ""
    out: dict[str, list[str]] = {}
    for split, split_patterns in patterns.items():
        found: list[str] = []
        for pattern in split_patterns:
            if not isinstance(pattern, str):
                continue
            asked = {p for p in pattern.split("/") if p.startswith((".", "__"))}
            matched = [
                p
                for p, info in sorted(fs.glob(posixpath.join(root, pattern), detail=True).items())
                if info.get("type") == "file"
                and p.endswith(".parquet")
                and not {q for q in p[len(root) + 1 :].split("/")[:-1] if q.startswith((".", "__"))} - asked
            ]
            if not matched:
                raise UsageError(
                    f"{base}: the card's data_files pattern {pattern!r} ({split}) matches no .parquet file"
                )
            found += [protocol + p if protocol and "://" not in p else p for p in matched]
        out[split] = found
    return out


def _with_protocol(found: str, where: str) -> str:
    """datasets drops the protocol of some fsspec file systems (memory://): put it back."""
    if "://" in where and "://" not in found:
        return where.split("://", 1)[0] + "://" + found
    return found


# --- reading row groups and record batches ------------------------------------------------


@contextlib.contextmanager
def _open(f: DataFile):
    path = location.local_path(f.location)
    if f.kind == ARROW:
        with (
            pa.memory_map(path) if path else location.open_binary(f.location)
        ) as src:  # mapped: batches are views
            yield pa.ipc.open_stream(src)
        return
    import pyarrow.parquet as pq

    with (
        contextlib.nullcontext(path) if path else location.open_binary(f.location) as src,
        pq.ParquetFile(src) as pf,
    ):
        yield pf


def _schema(reader) -> pa.Schema:
    return reader.schema_arrow if hasattr(reader, "schema_arrow") else reader.schema


def _group_sizes(reader) -> Iterator[tuple[int, int, pa.RecordBatch | None]]:
    """(rows, bytes, batch) of each row group (batch None: Parquet, read later) or record batch."""
    if hasattr(reader, "num_row_groups"):
        for i in range(reader.num_row_groups):
            group = reader.metadata.row_group(i)
            yield group.num_rows, group.total_byte_size, None
    else:
        for batch in reader:
            yield batch.num_rows, batch.nbytes, batch


def _tables(reader, start: int, stop: int, columns: list[str]) -> Iterator[pa.Table | pa.RecordBatch]:
    if hasattr(reader, "num_row_groups"):  # batches within the row groups: a huge row group is not held whole
        yield from reader.iter_batches(
            batch_size=READ_BATCH_ROWS, row_groups=range(start, stop), columns=columns, use_threads=False
        )
        return
    for i, batch in enumerate(reader):
        if i >= stop:
            return
        if i >= start:
            yield batch


def _digest_file(digest, f: DataFile) -> None:
    """Name, size and the last 64 KiB (a Parquet footer: every row group's statistics)."""
    with location.open_binary(f.location) as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - HASH_TAIL))
        tail = fh.read()
    digest.update(orjson.dumps([f.location.rsplit("/", 1)[-1], f.split, size]))
    digest.update(tail)


@register
@dataclass(frozen=True)
class DatasetSource(Source):
    """An existing dataset (HF Parquet or save_to_disk Arrow); see the module docstring."""

    where: str
    image_column: str | None = None
    id_column: str | None = None
    output_column: str | None = None

    kind = PARQUET
    expects = "a dataset folder (HF Parquet, save_to_disk) or a .parquet file"

    @classmethod
    def detect(cls, where: str) -> bool:
        return is_dataset(where)

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> DatasetSource:
        return cls(
            opts.manifest,
            image_column=getattr(opts, "image_column", None),
            id_column=getattr(opts, "id_column", None),
            output_column=getattr(opts, "output_column", None),
        )

    def default_base(self) -> str:
        """Paths in image cells resolve against the dataset's folder (a file's own folder)."""
        try:
            fs, path = _fs(self.where)
            if fs.isdir(path):
                return self.where if location.is_url(self.where) else location.resolve(self.where, ".")
        except Exception:  # noqa: BLE001
            pass
        return location.parent(self.where)

    def columns(self, schema: pa.Schema) -> Columns:
        return columns_of(schema, self.image_column, self.id_column, self.output_column)

    def check(self) -> None:
        files, _ = discover(self.where)
        usable, num_rows, first = False, 0, None
        for f in files:
            try:
                with _open(f) as reader:
                    cols = self.columns(_schema(reader))
                    rows = reader.metadata.num_rows if f.kind == PARQUET else None
            except (OSError, pa.ArrowInvalid) as exc:
                raise UsageError(f"cannot read {f.location}: {exc}") from None
            first = first or (f, cols)
            for option, wanted, found in (
                ("--id-column", self.id_column, cols.id),
                ("--output-column", self.output_column, cols.output),
            ):
                if wanted and found is None and (cols.kind == "labelr" or option == "--id-column"):
                    raise UsageError(
                        f"{f.location} has no column {wanted!r} ({option}); "
                        f"its columns: {', '.join(cols.names)}"
                    )
            usable = usable or cols.kind == "trainer" or cols.image is not None
            num_rows += 1 if rows is None else rows
        if not usable:
            raise UsageError(
                no_image_reason(
                    first[0].location if len(files) == 1 else self.where, first[1], self.image_column
                )
            )
        if not num_rows:
            raise UsageError(f"{self.where} holds no rows")

    def plan(self, grain: int) -> DatasetPlan:
        import polars as pl  # the driver's planner only

        files, seen = discover(self.where)
        digest = hashlib.sha256(seen)
        units: list[DatasetUnit] = []
        frames: list[pl.DataFrame] = []
        line = 1
        for f in files:
            _digest_file(digest, f)
            with _open(f) as reader:
                cols = self.columns(_schema(reader))
                start = rows = num_groups = nbytes = 0
                first = line
                for i, (n, size, batch) in enumerate(_group_sizes(reader)):
                    if cols.id is not None and n:
                        ids = (
                            batch.column(cols.id)
                            if batch is not None
                            else reader.read_row_group(i, columns=[cols.id]).column(0)
                        )
                        frames.append(
                            pl.DataFrame(
                                {
                                    "line": range(line, line + n),
                                    "id": pl.Series(ids.cast(pa.string()).to_pylist(), dtype=pl.String),
                                }
                            )
                        )
                    line += n
                    rows += n
                    nbytes += size
                    num_groups = i + 1
                    if rows >= grain or nbytes >= UNIT_BYTES:
                        units.append(
                            DatasetUnit(
                                len(units), rows, (), (Piece(f, start, num_groups, first, rows),), nbytes
                            )
                        )
                        start, rows, first, nbytes = num_groups, 0, line, 0
                if rows:
                    units.append(
                        DatasetUnit(len(units), rows, (), (Piece(f, start, num_groups, first, rows),), nbytes)
                    )
        duplicates = _duplicate_lines(frames)
        import numpy as np

        out = []
        for u in units:
            p = u.pieces[0]
            lo, hi = np.searchsorted(duplicates, [p.first_line, p.first_line + p.num_rows])
            out.append(
                DatasetUnit(
                    u.index, u.num_rows, tuple(int(x) for x in duplicates[lo:hi]), u.pieces, u.num_bytes
                )
            )
        if not out:
            raise UsageError(f"{self.where} holds no rows")
        return DatasetPlan(
            units=out, num_rows=line - 1, num_duplicates=len(duplicates), sha256=digest.hexdigest()
        )

    def read(self, unit: DatasetUnit, *, base: str, default_split: str) -> Iterator[Row | Reject]:
        for piece in unit.pieces:
            yield from self._read_piece(piece, base, piece.file.split or default_split)

    def _read_piece(self, piece: Piece, base: str, split: str) -> Iterator[Row | Reject]:
        with _open(piece.file) as reader:
            cols = self.columns(_schema(reader))
            if cols.kind == "labelr" and cols.image is None:
                reason = no_image_reason(piece.file.location, cols, self.image_column)
                for line in range(piece.first_line, piece.first_line + piece.num_rows):
                    yield Reject(line, None, "manifest", reason)
                return
            wanted = None if cols.kind == "labelr" else [c for c in (cols.id, cols.text, "modalities") if c]
            line = piece.first_line
            for table in _tables(reader, piece.start, piece.stop, wanted):
                if cols.kind == "trainer":
                    yield from _trainer_rows(table, cols, line, split, base)
                else:
                    yield from _labelr_rows(table, cols, line, split, base)
                line += table.num_rows


def _ids(table, cols: Columns, line: int) -> list[str | None]:
    """Each row's id: the id column's value (as a string), else ``line-N`` where there is no id column."""
    if cols.id is None:
        return [f"line-{line + i}" for i in range(table.num_rows)]
    return [None if v is None else str(v) for v in table.column(cols.id).to_pylist()]


def _cells(column: pa.Array) -> list[Any]:
    """An image column's cells; a struct<bytes, path> one as ``{bytes, path}`` dicts built from its
    two fields (three times faster than ``to_pylist`` of the structs)."""
    if not _is_image_struct(column.type):
        return column.to_pylist()
    import pyarrow.compute as pc

    data, paths = pc.struct_field(column, "bytes").to_pylist(), pc.struct_field(column, "path").to_pylist()
    valid = column.is_valid().to_pylist() if column.null_count else None
    return [
        None if valid is not None and not valid[i] else {"bytes": d, "path": p}
        for i, (d, p) in enumerate(zip(data, paths))
    ]


def _image_input(cell: Any, base: str) -> InlineImage | str | None:
    """An image cell: struct<bytes, path>, bytes, or a path string."""
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data is not None:
            return InlineImage(data, posixpath.basename(path) if isinstance(path, str) else "")
        return location.resolve(path, base) if isinstance(path, str) and path else None
    if isinstance(cell, bytes):
        return InlineImage(cell)
    return location.resolve(cell, base) if isinstance(cell, str) and cell else None


def _bad_id(image_id: str | None, line: int, column: str | None) -> Reject | None:
    if image_id is None or not image_id:
        return Reject(line, None, "manifest", f"the id column {column!r} is null or empty")
    if "\x00" in image_id:
        return Reject(line, image_id.replace("\x00", "\\0"), "manifest", "the id contains a NUL byte")
    return None


def _labelr_rows(table, cols: Columns, line: int, split: str, base: str) -> Iterator[Row | Reject]:
    ids = _ids(table, cols, line)
    images = _cells(table.column(cols.image))
    outputs = table.column(cols.output).to_pylist() if cols.output else [None] * table.num_rows
    extras = {c: table.column(c).to_pylist() for c in cols.extra}
    for i, (image_id, cell, output) in enumerate(zip(ids, images, outputs)):
        n = line + i
        bad = _bad_id(image_id, n, cols.id)
        if bad is not None:
            yield bad
            continue
        where = _image_input(cell, base)
        if where is None:
            yield Reject(n, image_id, "manifest", f"the image cell ({cols.image!r}) is null")
            continue
        meta: dict[str, str | None] = dict.fromkeys(META_FIXED)
        for c, values in extras.items():
            value = values[i]
            if c == "meta" and isinstance(value, dict):
                meta.update((k, _text(v)) for k, v in value.items())
            else:
                meta[c] = _text(value)
        yield Row(
            line=n,
            kind="labelr",
            image_id=image_id,
            split=split,
            locations=(where,),
            meta=meta,
            output=output,
        )


def _trainer_rows(table, cols: Columns, line: int, split: str, base: str) -> Iterator[Row | Reject]:
    ids = _ids(table, cols, line)
    texts = table.column(cols.text).to_pylist()
    modalities = table.column("modalities").to_pylist()
    for i, (image_id, text, items) in enumerate(zip(ids, texts, modalities)):
        n = line + i
        bad = _bad_id(image_id, n, cols.id)
        if bad is not None:
            yield bad
            continue
        locations = []
        for k, item in enumerate(items or []):
            where = _image_input(item.get("value") if isinstance(item, dict) else None, base)
            if where is None or item.get("type") != "image":
                locations = f"modality {k + 1} is not an image with a value"
                break
            locations.append(where)
        if isinstance(locations, str):
            yield Reject(n, image_id, "manifest", locations)
            continue
        if cols.text == "text":
            if not isinstance(text, str):
                yield Reject(n, image_id, "manifest", "'text' is null")
                continue
            yield Row(
                line=n,
                kind="trainer",
                image_id=image_id,
                split=split,
                locations=tuple(locations),
                meta={},
                text=text,
            )
            continue
        if not text or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in text
        ):
            yield Reject(
                n, image_id, "manifest", "'conversations' must be a non-empty list of {role, content} strings"
            )
            continue
        yield Row(
            line=n,
            kind="trainer",
            image_id=image_id,
            split=split,
            locations=tuple(locations),
            meta={},
            conversations=tuple({"role": t["role"], "content": t["content"]} for t in text),
        )


def _duplicate_lines(frames: list):
    """Lines whose id an earlier line already has (first occurrence wins; an empty id claims nothing)."""
    import numpy as np
    import polars as pl

    if not frames:
        return np.zeros(0, dtype=np.int64)
    ids = pl.concat(frames)
    return duplicate_lines(ids.get_column("line").to_numpy(), ids.get_column("id").replace("", None))

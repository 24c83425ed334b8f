"""A folder of images as the input, as ``datasets.load_dataset("imagefolder", data_dir=...)``
reads it: split folders or file names (train/, validation/, test/, ...) found by datasets' own
patterns, and a ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` plus any columns) per
folder. With metadata, its rows are the dataset's rows; without, every image file is a row,
with no output (and a ``label`` from its folder when the images sit in several class folders at
one depth, as datasets infers it).

A row's id is its ``--id-column`` (default ``image_id``) when the metadata has it, else the image
file's path relative to the folder (``train/cat/001.jpg``), unique by construction. The output is
the ``--output-column`` (default ``output``); every other column goes into meta, as text.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from engine.errors import UsageError
from engine.records import Reject
from engine.sources import location, register, splits
from engine.sources.base import Row, Source, SourcePlan
from engine.sources.identity import duplicate_lines

if TYPE_CHECKING:
    from engine.config import ConvertOptions

KIND = "imagefolder"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILES, JSONL, CSV = "files", "jsonl", "csv"
BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True, slots=True)
class FolderPiece:
    """Rows of one split: image files (``files``), lines ``[start, stop)`` bytes of a
    metadata.jsonl, or rows ``[start, stop)`` of a metadata.csv."""

    split: str | None  # None: the folder names no split (then --split applies)
    kind: str  # files | jsonl | csv
    location: str  # the metadata file ("" for files)
    start: int
    stop: int
    first_line: int
    num_rows: int
    files: tuple[str, ...] = ()  # kind files: the images' locations
    labels: bool = False  # kind files: a label from each image's folder


@dataclass(frozen=True, slots=True)
class FolderUnit:
    index: int
    num_rows: int
    duplicate_lines: tuple[int, ...]
    pieces: tuple[FolderPiece, ...]


@dataclass(frozen=True)
class FolderPlan(SourcePlan):
    def merge(self, index: int, group: Sequence[FolderUnit]) -> FolderUnit:
        return FolderUnit(
            index=index,
            num_rows=sum(u.num_rows for u in group),
            duplicate_lines=tuple(d for u in group for d in u.duplicate_lines),
            pieces=tuple(p for u in group for p in u.pieces),
        )


# datasets' ImageFolder.EXTENSIONS (a test checks they are still equal), kept here so that
# detecting and planning a folder need not import datasets
IMAGE_EXTENSIONS = frozenset(
    ".blp .bmp .dib .bufr .cur .pcx .dcx .dds .ps .eps .fit .fits .fli .flc .ftc .ftu .gbr .gif .grib "
    ".png .apng .jp2 .j2k .jpc .jpf .jpx .j2c .icns .ico .im .iim .tif .tiff .jfif .jpe .jpg .jpeg "
    ".mpg .mpeg .msp .pcd .pxr "
    ".pbm .pgm .ppm .pnm .psd .bw .rgb .rgba .sgi .ras .tga .icb .vda .vst .webp .wmf .emf .xbm .xpm".split()
)


def _image_extensions() -> frozenset[str]:
    return IMAGE_EXTENSIONS


def _is_image(path: str, extensions: frozenset[str]) -> bool:
    root, ext = os.path.splitext(path)
    return ext.lower() in extensions or os.path.splitext(root)[1].lower() in extensions


def _root(where: str) -> str:
    return where.rstrip("/") if location.is_url(where) else os.path.abspath(where)


def _rel(path: str, root: str) -> str:
    """``path`` relative to ``root``, with forward slashes (an id, never a file system path)."""
    if location.is_url(root) or location.is_url(path):  # compare the file systems' own paths
        import fsspec

        base, full = fsspec.core.url_to_fs(root)[1].rstrip("/"), fsspec.core.url_to_fs(path)[1]
        return full[len(base) + 1 :] if full.startswith(base + "/") else posixpath.basename(full)
    return os.path.relpath(path, root).replace(os.sep, "/")


def _with_protocol(found: str, where: str) -> str:
    if "://" in where and "://" not in found:
        return where.split("://", 1)[0] + "://" + found
    return found


@dataclass(frozen=True)
class Layout:
    """What datasets' ImageFolder would find in a folder."""

    splits: list[tuple[str | None, list[str], list[str]]]  # (split, image files, metadata files)
    labels: bool


def scan_folder(where: str) -> Layout:
    import fsspec

    if not location.exists(where):
        raise UsageError(f"input not found: {where}")
    fs, root = fsspec.core.url_to_fs(_root(where))
    root = root.rstrip("/") or "/"
    try:
        tree = splits.Tree(fs, root)
        patterns = splits.data_patterns(tree)
        resolved = splits.data_files(tree, patterns)
    except FileNotFoundError:
        raise UsageError(f"{where} holds no image files and no {' or '.join(METADATA_FILES)}") from None
    unsplit = patterns == splits.UNSPLIT
    extensions = _image_extensions()
    layout = []
    for split, found in resolved.items():
        found = [_with_protocol(f, where) for f in found]
        images = [f for f in found if _is_image(f, extensions)]
        metadata = sorted(f for f in found if posixpath.basename(f.replace(os.sep, "/")) in METADATA_FILES)
        layout.append((None if unsplit else str(split), images, metadata))
    if any(m for _, _, m in layout):
        kinds = {posixpath.splitext(m)[1] for _, _, ms in layout for m in ms}
        if len(kinds) > 1:
            raise UsageError(
                f"{where} mixes metadata.jsonl and metadata.csv files; datasets reads only one kind"
            )
        return Layout(layout, labels=False)
    images = [f for _, files, _ in layout for f in files]
    names = {posixpath.basename(posixpath.dirname(f.replace(os.sep, "/"))) for f in images}
    depths = {f.replace(os.sep, "/").count("/") for f in images}
    return Layout(layout, labels=len(names) > 1 and len(depths) == 1)


def looks_like_image_folder(where: str) -> bool:
    """A folder with a metadata file or image files at its top or one or two folders down, and
    no other JSON Lines or JSON file at its top: that is a manifest's folder (name the manifest)."""
    if where.startswith(("http://", "https://")):  # no folder listings over HTTP
        return False
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(where)
        if not fs.isdir(path):
            return False
        top = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
        if any(
            n.endswith((".jsonl", ".json")) and n not in METADATA_FILES and n != "config.json" for n in top
        ):
            return False
        extensions = _image_extensions()
        for depth in ("*", "*/*", "*/*/*"):
            for found in fs.glob(posixpath.join(path, depth)):
                name = posixpath.basename(found)
                if name in METADATA_FILES or _is_image(name, extensions):
                    return True
        return False
    except Exception:  # noqa: BLE001 - detection never raises
        return False


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _folder_of(meta_file: str) -> str:
    return posixpath.dirname(meta_file) if location.is_url(meta_file) else os.path.dirname(meta_file)


def _join(folder: str, rel: str) -> str:
    return posixpath.join(folder, rel) if location.is_url(folder) else os.path.join(folder, rel)


def _planned_id(item: Any, folder: str, root: str) -> str | None:
    """A planned identity: the id itself, or (None, file_name) for the file's path under the folder."""
    if isinstance(item, tuple):
        return _rel(_join(folder, item[1]), root)
    return None if item is None else str(item)


def _file_key(obj: dict[str, Any]) -> str | None:
    if "file_name" in obj:
        return "file_name"
    return next((k for k in obj if k.endswith("_file_name")), None)


@register
@dataclass(frozen=True)
class ImageFolderSource(Source):
    where: str
    id_column: str | None = None
    output_column: str | None = None

    kind = KIND
    expects = "an image folder (images, with metadata.jsonl or metadata.csv)"

    @classmethod
    def detect(cls, where: str) -> bool:
        return looks_like_image_folder(where)

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> ImageFolderSource:
        return cls(
            opts.manifest,
            id_column=getattr(opts, "id_column", None),
            output_column=getattr(opts, "output_column", None),
        )

    def default_base(self) -> str:
        return _root(self.where)

    def check(self) -> None:
        layout = scan_folder(self.where)
        if not any(images or metadata for _, images, metadata in layout.splits):
            raise UsageError(f"{self.where} holds no image files and no {' or '.join(METADATA_FILES)}")

    def sha256(self) -> str:
        return self.plan(1 << 20).sha256

    def plan(self, grain: int) -> FolderPlan:
        import numpy as np
        import polars as pl

        layout = scan_folder(self.where)
        root = _root(self.where)
        digest = hashlib.sha256()
        units: list[FolderUnit] = []
        frames: list[pl.DataFrame] = []
        line = 1
        for split, images, metadata in layout.splits:
            digest.update(orjson.dumps([split, [_rel(f, root) for f in images]]))
            if not any(m for _, _, m in layout.splits):
                for i in range(0, len(images), grain):
                    chunk = tuple(images[i : i + grain])
                    units.append(
                        FolderUnit(
                            len(units),
                            len(chunk),
                            (),
                            (FolderPiece(split, FILES, "", 0, 0, line, len(chunk), chunk, layout.labels),),
                        )
                    )
                    line += len(chunk)
                continue
            for meta_file in metadata:
                pieces, ids = (_plan_jsonl if meta_file.endswith(".jsonl") else _plan_csv)(
                    meta_file, split, line, grain, digest, self.id_column
                )
                for piece in pieces:
                    units.append(FolderUnit(len(units), piece.num_rows, (), (piece,)))
                    line += piece.num_rows
                folder = _folder_of(meta_file)
                frames.append(
                    pl.DataFrame(
                        {
                            "line": pl.Series(range(line - len(ids), line), dtype=pl.Int64),
                            "id": pl.Series([_planned_id(i, folder, root) for i in ids], dtype=pl.String),
                        }
                    )
                )
        if line == 1:
            raise UsageError(f"{self.where} holds no rows (no image files, or empty metadata files)")
        duplicates = _duplicate_lines(frames)
        out = []
        for u in units:
            p = u.pieces[0]
            lo, hi = np.searchsorted(duplicates, [p.first_line, p.first_line + p.num_rows])
            out.append(FolderUnit(u.index, u.num_rows, tuple(int(x) for x in duplicates[lo:hi]), u.pieces))
        return FolderPlan(
            units=out, num_rows=line - 1, num_duplicates=len(duplicates), sha256=digest.hexdigest()
        )

    def read(self, unit: FolderUnit, *, base: str, default_split: str) -> Iterator[Row | Reject]:
        root = _root(self.where)
        for piece in unit.pieces:
            split = piece.split or default_split
            if piece.kind == FILES:
                for i, path in enumerate(piece.files):
                    meta = (
                        {"label": posixpath.basename(posixpath.dirname(path.replace(os.sep, "/")))}
                        if piece.labels
                        else {}
                    )
                    yield Row(
                        line=piece.first_line + i,
                        kind="labelr",
                        image_id=_rel(path, root),
                        split=split,
                        locations=(path,),
                        meta=meta,
                        output=None,
                    )
                continue
            rows = _read_jsonl(piece) if piece.kind == JSONL else _read_csv(piece)
            folder = _folder_of(piece.location)
            for line, obj in rows:
                yield self._row(line, obj, folder, root, split)

    def _row(self, line: int, obj: Any, folder: str, root: str, split: str) -> Row | Reject:
        if isinstance(obj, Reject):
            return obj
        key = _file_key(obj)
        name = obj.get(key) if key else None
        if not isinstance(name, str) or not name:
            return Reject(
                line, None, "manifest", "no 'file_name' (the image's path relative to the metadata file)"
            )
        rel = posixpath.normpath(name.replace("\\", "/"))
        if "://" in name or "\x00" in name or posixpath.isabs(rel) or rel == ".." or rel.startswith("../"):
            return Reject(
                line, None, "manifest", f"file_name {name!r} must be a relative path inside the folder"
            )
        path = _join(folder, rel)
        id_key = self.id_column or "image_id"
        image_id = obj.get(id_key) if id_key in obj else _rel(path, root)
        if isinstance(image_id, int) and not isinstance(image_id, bool):
            image_id = str(image_id)
        if not isinstance(image_id, str) or not image_id or "\x00" in image_id:
            return Reject(line, None, "manifest", f"no {id_key!r} (a non-empty string)")
        out_key = self.output_column or "output"
        meta = {k: _text(v) for k, v in obj.items() if k not in (key, id_key, out_key)}
        return Row(
            line=line,
            kind="labelr",
            image_id=image_id,
            split=split,
            locations=(path,),
            meta=meta,
            output=obj.get(out_key),
        )


def _plan_jsonl(
    meta_file: str, split: str | None, first_line: int, grain: int, digest, id_column: str | None
):
    """Pieces of ``grain`` non-blank lines, and each row's identity: (id,) when the row has
    the id column, (None, file_name) otherwise, None when it has neither."""
    pieces: list[FolderPiece] = []
    ids: list[Any] = []
    id_key = id_column or "image_id"
    line = first_line
    start = offset = count = 0
    piece_first = line
    carry = b""
    with location.open_binary(meta_file) as f:
        while True:
            block = f.read(BLOCK_BYTES)
            digest.update(block)
            buf = carry + block
            lines = buf.split(b"\n") if block else ([buf] if buf else [])
            carry = lines.pop() if block else b""
            for raw in lines:
                pos = offset
                offset += len(raw) + 1
                if not raw.strip():
                    continue
                if count == grain:
                    pieces.append(FolderPiece(split, JSONL, meta_file, start, pos, piece_first, count))
                    start, count, piece_first = pos, 0, line
                count += 1
                line += 1
                ids.append(_identity(raw, id_key))
            if not block:
                break
    if count:
        pieces.append(FolderPiece(split, JSONL, meta_file, start, offset, piece_first, count))
    return pieces, ids


def _identity(raw: bytes, id_key: str) -> Any:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if id_key in obj:
        value = obj[id_key]
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    key = _file_key(obj)
    name = obj.get(key) if key else None
    return (None, posixpath.normpath(name.replace("\\", "/"))) if isinstance(name, str) and name else None


def _read_jsonl(piece: FolderPiece) -> Iterator[tuple[int, Any]]:
    with location.open_binary(piece.location) as f:
        f.seek(piece.start)
        data = f.read(piece.stop - piece.start)
    line = piece.first_line
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield line, Reject(line, None, "manifest", f"metadata line is not valid JSON: {exc}")
        else:
            yield (
                line,
                obj
                if isinstance(obj, dict)
                else Reject(line, None, "manifest", "metadata line is not a JSON object"),
            )
        line += 1


def _csv_frame(meta_file: str, **kwargs):
    import polars as pl

    path = location.local_path(meta_file)
    if path is None:
        with location.open_binary(meta_file) as f:
            path = f.read()
    return pl.read_csv(path, infer_schema=False, **kwargs)  # every value as text, as written


def _plan_csv(meta_file: str, split: str | None, first_line: int, grain: int, digest, id_column: str | None):
    with location.open_binary(meta_file) as f:
        while block := f.read(BLOCK_BYTES):
            digest.update(block)
    header = _csv_frame(meta_file, n_rows=0).columns
    id_key = id_column or "image_id"
    key = _file_key(dict.fromkeys(header))
    wanted = [c for c in (id_key, key) if c in header]
    frame = _csv_frame(meta_file, columns=wanted) if wanted else None
    num_rows = frame.height if frame is not None else _csv_frame(meta_file).height
    if id_key in header:
        ids = frame.get_column(id_key).to_list()
    elif key is not None:
        ids = [
            None if v is None else (None, posixpath.normpath(v.replace("\\", "/")))
            for v in frame.get_column(key).to_list()
        ]
    else:
        ids = [None] * num_rows
    pieces = [
        FolderPiece(
            split, CSV, meta_file, i, min(i + grain, num_rows), first_line + i, min(grain, num_rows - i)
        )
        for i in range(0, num_rows, grain)
    ]
    return pieces, ids


def _read_csv(piece: FolderPiece) -> Iterator[tuple[int, Any]]:
    frame = _csv_frame(piece.location, skip_rows_after_header=piece.start, n_rows=piece.stop - piece.start)
    for i, obj in enumerate(frame.iter_rows(named=True)):
        yield piece.first_line + i, obj


def _duplicate_lines(frames: list):
    """Lines whose id an earlier line already has (first occurrence wins; an empty id claims nothing)."""
    import numpy as np
    import polars as pl

    if not frames:
        return np.zeros(0, dtype=np.int64)
    ids = pl.concat(frames)
    return duplicate_lines(ids.get_column("line").to_numpy(), ids.get_column("id").replace("", None))

"""A Parquet shard assembled from an old shard's bytes: ``engine update``'s fast path.

Parquet encodes each leaf column of each row group on its own (pages, content-defined chunks,
dictionary, statistics, page index), so when a new shard's row groups hold exactly the rows of
old row groups, the file ``convert`` would write is: the old column chunks copied verbatim,
except those of the columns that changed (``output``), which come from a small Parquet file of
those columns alone written with the same settings and row groups; then the page index (column
indexes copied, offset indexes with their page offsets moved), then the footer with every
offset recomputed. Nothing is decoded but the old ``output`` of the row groups that changed.

The footer's other fields (schema, key-value metadata, ``created_by``, column orders) must be
those the current writer gives the shard's schema; otherwise (another pyarrow, another meta
key) the shard is written the usual way. A shard that would come out as the old file byte for
byte (no change in it) is the old file, hard-linked, on a local folder.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.layouts.parquet import parquet_writer
from engine.sinks.shards import ShardResult, ShardSpec
from engine.sinks.store import Finisher
from engine.sources.location import local_path
from engine.update import thrift

MAGIC = b"PAR1"
COPY_BLOCK = 8 << 20  # bytes per read where the kernel cannot copy (object storage)
CHANGED = ("output",)  # the only column an update of the Parquet layout rewrites

# Parquet thrift field ids (parquet.thrift): FileMetaData, RowGroup, ColumnChunk, ColumnMetaData,
# PageLocation; the footer fields a splice keeps must be the writer's own
FMD_NUM_ROWS, FMD_ROW_GROUPS, FMD_KEPT = 3, 4, (1, 2, 5, 6, 7)
RG_COLUMNS, RG_TOTAL_BYTE_SIZE, RG_NUM_ROWS = 1, 2, 3
RG_FILE_OFFSET, RG_TOTAL_COMPRESSED, RG_ORDINAL = 5, 6, 7
CC_FILE_OFFSET, CC_META = 2, 3
CC_OFFSET_INDEX, CC_OFFSET_INDEX_LEN, CC_COLUMN_INDEX, CC_COLUMN_INDEX_LEN = 4, 5, 6, 7
CC_ENCRYPTED = (8, 9)
MD_PATH, MD_UNCOMPRESSED, MD_COMPRESSED = 3, 6, 7
MD_DATA_PAGE, MD_INDEX_PAGE, MD_DICTIONARY_PAGE, MD_BLOOM_FILTER = 9, 10, 11, 14
PAGE_LOCATIONS, LOCATION_OFFSET = 1, 1


@dataclass(frozen=True, slots=True)
class SourceGroup:
    """One row group of the new shard: row group ``group`` of the old shard at ``source``, and
    the new ``output`` of its rows that changed (row in the group -> text)."""

    source: str  # a local path or fsspec URL
    group: int
    texts: dict[int, str] = field(default_factory=dict)


class NotSpliceable(Exception):
    """The old shard's footer is not what the current writer makes (the shard is rewritten)."""


@dataclass
class _File:
    """An open Parquet file's bytes and parsed footer."""

    handle: object
    fd: int | None  # a local file's descriptor (the kernel copies from it)
    footer: thrift.Struct
    footer_start: int = 0
    _index: tuple[int, bytes] | None = None  # the page index: its offset and bytes, read at once

    def read(self, start: int, length: int) -> bytes:
        if self.fd is not None:
            return os.pread(self.fd, length, start)
        self.handle.seek(start)
        return self.handle.read(length)

    def index(self, start: int, length: int) -> bytes:
        """Bytes of the page index (between the last column chunk and the footer), read at once."""
        if self._index is None:
            self._index = (self.footer_start, b"")
            offsets = [
                cc.get(fid)
                for rg in self.footer.get(FMD_ROW_GROUPS).values
                for cc in rg.get(RG_COLUMNS).values
                for fid in (CC_COLUMN_INDEX, CC_OFFSET_INDEX)
                if cc.has(fid)
            ]
            first = min(offsets, default=self.footer_start)
            self._index = (first, self.read(first, self.footer_start - first))
        first, data = self._index
        if not first <= start <= start + length <= first + len(data):
            return self.read(start, length)
        return data[start - first : start - first + length]


def _open(source: str, stack: ExitStack) -> _File:
    path = local_path(source)
    if path is not None:
        handle = stack.enter_context(open(path, "rb"))
        fd = handle.fileno()
    else:
        import fsspec

        handle = stack.enter_context(fsspec.open(source, "rb"))
        fd = None
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    file = _File(handle, fd, thrift.Struct())
    file.footer, file.footer_start = _footer(file.read, size, source)
    file.index(file.footer_start, 0)  # before its metadata is moved
    return file


def _footer(read, size: int, name: str) -> tuple[thrift.Struct, int]:
    """A Parquet file's footer, and where it starts."""
    tail = read(size - 8, 8)
    if size < 12 or tail[4:] != MAGIC:
        raise NotSpliceable(f"{name} is not a Parquet file")
    (length,) = struct.unpack("<i", tail[:4])
    footer, used = thrift.loads(read(size - 8 - length, length))
    if used != length:
        raise NotSpliceable(f"{name}: footer of {used} bytes, {length} announced")
    return footer, size - 8 - length


def template_footer(schema: pa.Schema) -> thrift.Struct:
    """The footer the layout's writer gives an empty file of ``schema``."""
    sink = pa.BufferOutputStream()
    with parquet_writer(sink, schema):
        pass
    data = sink.getvalue().to_pybytes()
    return _footer(lambda s, n: data[s : s + n], len(data), "template")[0]


def _kept(footer: thrift.Struct) -> bytes:
    """The footer's fields other than the row count and the row groups, serialised."""
    return thrift.dumps(thrift.Struct([f for f in footer.fields if f[0] in FMD_KEPT]))


def _chunk_start(md: thrift.Struct) -> int:
    dictionary = md.get(MD_DICTIONARY_PAGE)
    return dictionary if dictionary else md.get(MD_DATA_PAGE)


def _thin_file(groups: Sequence[SourceGroup], files: dict[str, _File], schema: pa.Schema) -> _File | None:
    """The changed columns of the row groups with new texts, one row group each, in order."""
    changed = [g for g in groups if g.texts]
    if not changed:
        return None
    thin_schema = pa.schema([schema.field(c) for c in CHANGED])
    old: dict[str, pa.Table] = {}  # each source's changed row groups' outputs, read in one call
    for source in dict.fromkeys(g.source for g in changed):
        wanted = [g.group for g in changed if g.source == source]
        old[source] = pq.ParquetFile(files[source].handle).read_row_groups(wanted, columns=list(CHANGED))
    offsets = dict.fromkeys(old, 0)
    sink = pa.BufferOutputStream()
    with parquet_writer(sink, thin_schema) as writer:
        for g in changed:
            rows = len(g.texts) and files[g.source].footer.get(FMD_ROW_GROUPS).values[g.group].get(
                RG_NUM_ROWS
            )
            values = old[g.source].column("output").slice(offsets[g.source], rows).to_pylist()
            offsets[g.source] += rows
            for i, text in g.texts.items():
                values[i] = text
            writer.write_table(
                pa.Table.from_arrays([string_array(values)], schema=thin_schema), row_group_size=rows
            )
    data = sink.getvalue().to_pybytes()
    thin, start = _footer(lambda s, n: data[s : s + n], len(data), "thin")
    file = _File(_Bytes(data), None, thin, start)
    file.index(start, 0)  # before its metadata is moved
    return file


def string_array(values: list[str | None]) -> pa.Array:
    """A string array built from its buffers: ``pa.array`` of a list imports pandas (0.3 s), which
    an update that keeps the features does not otherwise need."""
    encoded = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    nulls = sum(v is None for v in values)
    validity = None
    if nulls:
        bits = np.array([v is not None for v in values], bool)
        validity = pa.py_buffer(np.packbits(bits, bitorder="little").tobytes())
    buffers = [validity, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers, nulls)


class _Bytes:
    """A bytes object read like a file."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def seek(self, pos: int, whence: int = 0) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def splice_parquet_shard(
    spec: ShardSpec, groups: Sequence[SourceGroup], finisher: Finisher | None = None
) -> tuple[ShardResult, bool]:
    """Write ``spec``'s shard from the old row groups ``groups`` (one per row group of the spec);
    raises NotSpliceable, before anything is written, when an old footer is not the writer's.
    Returns the shard and whether it is the old file itself, hard-linked (a shard that did not
    change, on a local folder)."""
    if len(groups) != len(spec.row_groups):
        raise ValueError(f"{spec.relpath}: {len(groups)} source row groups for {len(spec.row_groups)}")
    template = template_footer(spec.schema)
    want = _kept(template)
    with ExitStack() as stack:
        files: dict[str, _File] = {}
        for g in groups:
            if g.source not in files:
                files[g.source] = _open(g.source, stack)
                if _kept(files[g.source].footer) != want:
                    raise NotSpliceable(f"{g.source} was not written by this writer with this schema")
        thin = _thin_file(groups, files, spec.schema)
        first = files[groups[0].source].footer.get(FMD_ROW_GROUPS).values[groups[0].group]
        names = [".".join(v.decode() for v in cc.get(CC_META).get(MD_PATH).values) for cc in _ccs(first)]
        ranges, row_groups = _layout(spec, groups, files, thin, names)
        if _unchanged(groups, files, ranges) and _link(spec, groups[0].source, finisher):
            size = os.fstat(files[groups[0].source].fd).st_size
            return ShardResult(spec.relpath, spec.split, sum(spec.row_groups), size), True
        with spec.store.writing(spec.relpath, finisher=finisher) as tmp, open(tmp, "wb") as out:
            pos = _write_ranges(out, ranges)
            row_groups = _page_index(out, pos, row_groups)
            footer = template.copy()
            footer.set(FMD_NUM_ROWS, sum(rg.get(RG_NUM_ROWS) for rg in row_groups))
            footer.set(FMD_ROW_GROUPS, thrift.List(thrift.STRUCT, row_groups))
            data = thrift.dumps(footer)
            out.write(data + struct.pack("<i", len(data)) + MAGIC)
            size = out.tell()
    return ShardResult(spec.relpath, spec.split, sum(spec.row_groups), size), False


def _unchanged(groups: Sequence[SourceGroup], files: dict[str, _File], ranges) -> bool:
    """The new shard would be the old file byte for byte: all its row groups in order, no new
    text, and nothing in the old file but the chunks, the page index and the footer."""
    (source,) = files.values() if len(files) == 1 else (None,)
    if source is None or source.fd is None or any(g.texts for g in groups):
        return False
    if [g.group for g in groups] != list(range(len(source.footer.get(FMD_ROW_GROUPS).values))):
        return False
    index_start = source._index[0] if source._index is not None else -1
    return len(ranges) == 1 and ranges[0][1] == len(MAGIC) and len(MAGIC) + ranges[0][2] == index_start


def _link(spec: ShardSpec, source: str, finisher: Finisher | None) -> bool:
    """Hard-link the old shard as the new one; False where the folder cannot (then it is copied)."""
    if spec.store.remote:
        return False
    try:
        with spec.store.writing(spec.relpath, finisher=finisher) as tmp:
            os.link(local_path(source), tmp)
    except OSError:
        return False
    return True


def _ccs(rg: thrift.Struct) -> list[thrift.Struct]:
    return rg.get(RG_COLUMNS).values


@dataclass
class _Chunk:
    """A column chunk of the new file: where its bytes come from, and its metadata to move."""

    file: _File
    cc: thrift.Struct  # changed in place: each old chunk goes to one new file
    start: int
    length: int
    column_index: tuple[int, int] | None  # where its page index is in ``file``
    offset_index: tuple[int, int] | None


def _layout(spec, groups, files, thin, names):
    """The byte ranges to copy, in file order, and each new row group's chunks."""
    ranges: list[list] = []  # [file, start, length]
    row_groups: list[tuple[thrift.Struct, list[_Chunk]]] = []
    thin_index = 0
    for k, g in enumerate(groups):
        source = files[g.source]
        rg = source.footer.get(FMD_ROW_GROUPS).values[g.group]
        if rg.get(RG_NUM_ROWS) != spec.row_groups[k]:
            raise ValueError(f"{g.source} row group {g.group} has {rg.get(RG_NUM_ROWS)} rows")
        thin_rg = None
        if g.texts:
            thin_rg = thin.footer.get(FMD_ROW_GROUPS).values[thin_index]
            thin_index += 1
        chunks = []
        for j, cc in enumerate(rg.get(RG_COLUMNS).values):
            f = source
            if thin_rg is not None and names[j] in CHANGED:
                cc, f = thin_rg.get(RG_COLUMNS).values[CHANGED.index(names[j])], thin
            if any(cc.has(x) for x in CC_ENCRYPTED) or cc.get(CC_META).has(MD_BLOOM_FILTER):
                raise NotSpliceable(f"{g.source}: encrypted columns or bloom filters")
            md = cc.get(CC_META)
            start, length = _chunk_start(md), md.get(MD_COMPRESSED)
            chunks.append(
                _Chunk(
                    f,
                    cc,
                    start,
                    length,
                    (cc.get(CC_COLUMN_INDEX), cc.get(CC_COLUMN_INDEX_LEN))
                    if cc.has(CC_COLUMN_INDEX)
                    else None,
                    (cc.get(CC_OFFSET_INDEX), cc.get(CC_OFFSET_INDEX_LEN))
                    if cc.has(CC_OFFSET_INDEX)
                    else None,
                )
            )
            last = ranges[-1] if ranges else None
            if last is not None and last[0] is f and last[1] + last[2] == start:
                last[2] += length  # contiguous in the source: one copy
            else:
                ranges.append([f, start, length])
        row_groups.append((rg, chunks))
    return ranges, row_groups


def _write_ranges(out, ranges) -> int:
    out.write(MAGIC)
    out.flush()
    pos = len(MAGIC)
    for f, start, length in ranges:
        _copy(f, start, length, out, pos)
        pos += length
    out.seek(pos)
    return pos


def _copy(f: _File, start: int, length: int, out, pos: int) -> None:
    if f.fd is not None:
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(f.fd, out.fileno(), length - done, start + done, pos + done)
                if n == 0:
                    raise OSError("copy_file_range copied nothing")
                done += n
            return
        except OSError:  # another filesystem, or no copy_file_range: copy through user space
            start, length, pos = start + done, length - done, pos + done
    out.seek(pos)
    f.handle.seek(start)
    if isinstance(f.handle, _Bytes):
        out.write(f.handle.read(length))
    else:
        shutil.copyfileobj(_Limited(f.handle, length), out, COPY_BLOCK)
    out.flush()


class _Limited:
    def __init__(self, handle, length: int):
        self.handle, self.left = handle, length

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.handle.read(n) if n else b""
        self.left -= len(data)
        return data


def _page_index(out, pos: int, row_groups) -> list[thrift.Struct]:
    """Write the column indexes then the offset indexes (row group by row group, column by
    column, as pyarrow does) and return the new row groups' metadata."""
    new_groups: list[thrift.Struct] = []
    moved: list[list[thrift.Struct]] = []
    offset = len(MAGIC)
    for k, (rg, chunks) in enumerate(row_groups):
        ccs = []
        for c in chunks:
            cc = c.cc
            delta = offset - c.start
            md = cc.get(CC_META)
            for fid in (MD_DATA_PAGE, MD_INDEX_PAGE, MD_DICTIONARY_PAGE):
                if md.get(fid):
                    md.set(fid, md.get(fid) + delta)
            if cc.get(CC_FILE_OFFSET):
                cc.set(CC_FILE_OFFSET, cc.get(CC_FILE_OFFSET) + delta)
            ccs.append((cc, c, delta))
            offset += c.length
        moved.append(ccs)
        new = rg
        mds = [cc.get(CC_META) for cc, _, _ in ccs]
        new.set(RG_COLUMNS, thrift.List(thrift.STRUCT, [cc for cc, _, _ in ccs]))
        new.set(RG_TOTAL_BYTE_SIZE, sum(md.get(MD_UNCOMPRESSED) for md in mds))
        new.set(RG_TOTAL_COMPRESSED, sum(md.get(MD_COMPRESSED) for md in mds))
        new.set(RG_FILE_OFFSET, _chunk_start(mds[0]))
        if new.has(RG_ORDINAL):
            new.set(RG_ORDINAL, k)
        new_groups.append(new)
    if offset != pos:
        raise AssertionError(f"column chunks end at {pos}, their metadata says {offset}")
    buf = bytearray()
    for ccs in moved:
        for cc, c, _ in ccs:
            if c.column_index is not None:
                data = c.file.index(*c.column_index)
                cc.set(CC_COLUMN_INDEX, pos + len(buf))
                buf += data
    for ccs in moved:
        for cc, c, delta in ccs:
            if c.offset_index is not None:
                index, _ = thrift.loads(c.file.index(*c.offset_index))
                for loc in index.get(PAGE_LOCATIONS).values:
                    loc.set(LOCATION_OFFSET, loc.get(LOCATION_OFFSET) + delta)
                data = thrift.dumps(index)
                cc.set(CC_OFFSET_INDEX, pos + len(buf))
                cc.set(CC_OFFSET_INDEX_LEN, len(data))
                buf += data
    out.write(buf)
    return new_groups


# PageHeader and DataPageHeader field ids, and the values the walk below reads
PH_TYPE, PH_COMPRESSED, PH_DATA_PAGE = 1, 3, 5
DP_NUM_VALUES, DP_ENCODING = 1, 2
DATA_PAGE, PLAIN = 0, 0


def plain_lengths(path: str, f: pq.ParquetFile, column: int, group: int) -> np.ndarray | None:
    """The byte length of each value of a BYTE_ARRAY column chunk, read from its pages' headers and
    the values' 4-byte length prefixes alone, not from the values: for an uncompressed PLAIN chunk
    of a non-repeated column without nulls (the layout's image bytes). None for any other chunk,
    whose values the caller then reads. Hand-written: pyarrow reads a column only with its values."""
    cc = f.metadata.row_group(group).column(column)
    desc = f.schema.column(column)
    if (
        cc.physical_type != "BYTE_ARRAY"
        or cc.compression != "UNCOMPRESSED"
        or cc.has_dictionary_page
        or desc.max_repetition_level != 0
        or desc.max_definition_level == 0
    ):
        return None
    lengths: list[int] = []
    with open(path, "rb") as handle:
        fd = handle.fileno()
        pos, end = cc.data_page_offset, cc.data_page_offset + cc.total_compressed_size
        while pos < end:
            try:
                header, used = thrift.loads(os.pread(fd, 512, pos))
            except thrift.ThriftError:  # a header longer than that (statistics)
                header, used = thrift.loads(os.pread(fd, 1 << 20, pos))
            page = header.get(PH_DATA_PAGE)
            if header.get(PH_TYPE) != DATA_PAGE or page is None or page.get(DP_ENCODING) != PLAIN:
                return None
            body, page_end = pos + used, pos + used + header.get(PH_COMPRESSED)
            (levels,) = struct.unpack("<i", os.pread(fd, 4, body))  # the definition levels' length
            value, count = body + 4 + levels, 0
            while value < page_end:
                (n,) = struct.unpack("<i", os.pread(fd, 4, value))
                lengths.append(n)
                value, count = value + 4 + n, count + 1
            if value != page_end or count != page.get(DP_NUM_VALUES):  # nulls: fewer values than levels
                return None
            pos = page_end
    if len(lengths) != f.metadata.row_group(group).num_rows:
        return None
    return np.array(lengths, np.int64)

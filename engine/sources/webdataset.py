"""WebDataset tars (img2dataset's output among them): ``key.jpg`` + ``key.json`` [+ ``key.txt``].

The input is a ``.tar``, a folder of tars, or a brace pattern (``shard-{00000..00009}.tar``),
local or fsspec. Members are grouped into samples as the webdataset library does (the name up
to the first dot of its base name is the key; consecutive members with one key are a sample).

Planning walks each tar's headers (seeking over the image bytes; only the small ``.json``
members are read, for the ids) and cuts it into ranges of samples; a worker opens the tar at
its range's first header and streams member by member, so memory holds one sample.

Rows are numbered across the tars in order: a tar's samples, then the rows its img2dataset
``.parquet`` side file lists that the tar does not hold (downloads that failed, with
img2dataset's error message; samples lost to a damaged tar).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import orjson

from engine.config import DEFAULT_ATTACHMENT_TOKEN, SPLIT_NAME
from engine.conversation import user_content
from engine.errors import UsageError
from engine.records import Reject, SourceRef
from engine.sources import identity, location, register, sharegpt
from engine.sources.base import InlineImage, Row, Source, SourcePlan, build_meta, json_kind

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp", "avif", "heic", "heif", "jp2")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then every extension
_META_NAME = re.compile(r"(^|/)__[^/]*__($|/)")  # webdataset skips such members (__key__ files and the like)
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
# img2dataset's status -> the stage its failure belongs to
_STATUS_STAGES = {"failed_to_download": "fetch", "failed_to_resize": "decode"}


def _split_name(name: str) -> tuple[str | None, str]:
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


@dataclass(frozen=True, slots=True)
class Piece:
    """Consecutive rows of one tar: ``num_samples`` samples from the header at ``offset``, or
    (``side_rows``) rows of its img2dataset parquet that the tar does not hold."""

    tar: str
    first_line: int
    offset: int = 0
    num_samples: int = 0
    damage: str | None = None  # the planner found the tar cut short inside this piece's last sample
    quick: bool = True  # its headers are walked by _quick_members (else by tarfile)
    side: str | None = None
    side_rows: tuple[int, ...] = ()  # parquet row numbers
    lost: str | None = None  # why a listed success is not in the tar

    @property
    def num_rows(self) -> int:
        return self.num_samples + len(self.side_rows)


@dataclass(frozen=True, slots=True)
class TarUnit:
    index: int
    pieces: tuple[Piece, ...]
    num_rows: int
    duplicate_lines: tuple[int, ...]


@dataclass(frozen=True)
class TarPlan(SourcePlan):
    def merge(self, index: int, group) -> TarUnit:
        pieces: list[Piece] = []
        for p in (p for u in group for p in u.pieces):
            last = pieces[-1] if pieces else None
            if (
                last is not None
                and last.tar == p.tar
                and last.num_samples
                and p.num_samples
                and not last.side_rows
                and not p.side_rows
                and last.damage is None
            ):
                # the next samples of the same tar: one open, one walk
                pieces[-1] = dataclasses.replace(
                    last, num_samples=last.num_samples + p.num_samples, damage=p.damage
                )
            else:
                pieces.append(p)
        return TarUnit(
            index=index,
            pieces=tuple(pieces),
            num_rows=sum(u.num_rows for u in group),
            duplicate_lines=tuple(d for u in group for d in u.duplicate_lines),
        )


@dataclass
class _Scan:
    """What the planner learns of one tar."""

    samples: list[tuple[int, str]] = field(default_factory=list)  # (header offset, id) per sample
    keys: set[str] = field(default_factory=set)
    quick: bool = True  # the headers are POSIX ustar/pax, which _quick_members walks
    damage: str | None = None  # the last sample is cut short
    note: str | None = None  # the tar is damaged after its last whole sample


def expand(where: str) -> list[str]:
    """The tars ``where`` names: a brace pattern's expansion, a folder's ``*.tar`` (sorted), or itself."""
    if _BRACES.search(where):
        import braceexpand

        return list(braceexpand.braceexpand(where))
    path = location.local_path(where)
    if path is not None:
        if os.path.isdir(path):
            return [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".tar")]
        return [where]
    import fsspec

    fs, p = fsspec.core.url_to_fs(where)
    if fs.isdir(p):
        protocol = where.split("://", 1)[0]
        return [f"{protocol}://{q}" for q in sorted(fs.glob(p.rstrip("/") + "/*.tar"))]
    return [where]


def _side_file(tar: str, suffix: str) -> str | None:
    """img2dataset's side file of a tar (``00000.tar`` -> ``00000.parquet``, ``00000_stats.json``)."""
    stem = tar[: -len(".tar")] if tar.endswith(".tar") else tar
    candidate = stem + suffix
    try:
        return candidate if location.exists(candidate) else None
    except (OSError, ValueError):
        return None


def _side_table(side: str):
    import pyarrow.parquet as pq

    names = pq.read_schema(side).names
    if "key" not in names or "status" not in names:
        return None
    columns = ["key", "status"] + (["error_message"] if "error_message" in names else [])
    return pq.read_table(side, columns=columns).to_pydict()


@register
@dataclass(frozen=True)
class WebDatasetSource(Source):
    kind: ClassVar[str] = "webdataset"
    expects: ClassVar[str] = "WebDataset tars (a .tar, a folder of .tar files, or a brace pattern)"
    where: str
    attachment_token: str = DEFAULT_ATTACHMENT_TOKEN
    attachment_position: str = "after"

    @classmethod
    def detect(cls, where: str) -> bool:
        if where.endswith(".tar") or (_BRACES.search(where) and ".tar" in where):
            return True
        try:
            path = location.local_path(where)
            if path is not None:
                return os.path.isdir(path) and any(n.endswith(".tar") for n in os.listdir(path))
            import fsspec

            fs, p = fsspec.core.url_to_fs(where)
            return fs.isdir(p) and bool(fs.glob(p.rstrip("/") + "/*.tar"))
        except (OSError, ValueError, ImportError):
            return False

    @classmethod
    def from_options(cls, opts) -> WebDatasetSource:
        return cls(
            opts.manifest,
            attachment_token=opts.attachment_token,
            attachment_position=opts.attachment_position,
        )

    def default_base(self) -> str:
        path = location.local_path(self.where)
        if path is not None and os.path.isdir(path):
            return os.path.abspath(path)
        return location.parent(self.where)

    def check(self) -> None:
        tars = expand(self.where)
        if not tars:
            raise UsageError(f"no .tar files in {self.where}")
        missing = [t for t in tars if not location.exists(t)]
        if missing:
            raise UsageError(
                f"tar not found: {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def plan(self, grain: int) -> TarPlan:
        digest = hashlib.sha256()
        units: list[TarUnit] = []
        lines: list[int] = []
        ids: list[str] = []
        line = 1
        pieces: list[Piece] = []
        for tar in expand(self.where):
            scan = _scan_tar(tar, digest)
            side = _side_file(tar, ".parquet")
            table = _side_table(side) if side else None
            extra: list[int] = []
            lost = None
            if table is not None:
                digest.update(orjson.dumps(table))
                extra = [
                    i
                    for i, (k, s) in enumerate(zip(table["key"], table["status"]))
                    if s != "success" or k not in scan.keys
                ]
                num_lost = sum(1 for i in extra if table["status"][i] == "success")
                if num_lost:
                    lost = (
                        f"img2dataset's {os.path.basename(side)} lists it as downloaded, but "
                        f"{os.path.basename(tar)} does not hold it"
                        + (f" ({scan.damage or scan.note})" if scan.damage or scan.note else "")
                    )
            lost_text = self._lost_text(tar, scan, table, extra)
            if scan.note:
                log.warning("%s: %s; %s", tar, scan.note, lost_text)
            for start in range(0, len(scan.samples), grain):
                chunk = scan.samples[start : start + grain]
                last = start + grain >= len(scan.samples)
                damage = f"{scan.damage}; {lost_text}" if last and scan.damage else None
                pieces.append(
                    Piece(
                        tar=tar,
                        first_line=line,
                        offset=chunk[0][0],
                        num_samples=len(chunk),
                        damage=damage,
                        quick=scan.quick,
                    )
                )
                for _, sid in chunk:
                    lines.append(line)
                    ids.append(sid)
                    line += 1
            for start in range(0, len(extra), grain):
                chunk = tuple(extra[start : start + grain])
                pieces.append(Piece(tar=tar, first_line=line, side=side, side_rows=chunk, lost=lost))
                for i in chunk:
                    lines.append(line)
                    ids.append(str(table["key"][i]))
                    line += 1
        if not lines:
            raise UsageError(f"{self.where} holds no samples (no tar member has a key and an extension)")
        dups = identity.duplicate_lines(lines, ids)
        for i, piece in enumerate(pieces):
            lo, hi = np.searchsorted(dups, [piece.first_line, piece.first_line + piece.num_rows])
            units.append(
                TarUnit(
                    index=i,
                    pieces=(piece,),
                    num_rows=piece.num_rows,
                    duplicate_lines=tuple(int(x) for x in dups[lo:hi]),
                )
            )
        return TarPlan(units=units, num_rows=len(lines), num_duplicates=len(dups), sha256=digest.hexdigest())

    @staticmethod
    def _lost_text(tar: str, scan: _Scan, table: dict | None, extra: list[int]) -> str:
        """How many samples a damaged tar lost, as far as its side files tell."""
        if table is not None:
            n = sum(1 for i in extra if table["status"][i] == "success")
            return (
                f"{n} later sample(s) that img2dataset's .parquet lists are lost "
                "(rejected after this tar's rows)"
            )
        stats = _side_file(tar, "_stats.json")
        if stats:
            try:
                with location.open_binary(stats) as f:
                    successes = int(orjson.loads(f.read())["successes"])
                n = max(successes - len(scan.samples), 0)
                return (
                    f"{n} later sample(s) lost (img2dataset's {os.path.basename(stats)} counts {successes})"
                )
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return "the samples after it, if any, are lost (nothing says how many)"

    def read(self, unit: TarUnit, *, base: str, default_split: str) -> Iterator[Row | Reject]:
        for piece in unit.pieces:
            if piece.side_rows:
                yield from _side_rows(piece)
            else:
                yield from self._samples(piece, default_split)

    def _samples(self, piece: Piece, default_split: str) -> Iterator[Row | Reject]:
        """The piece's samples, member by member from its first header: one sample in memory."""
        line = piece.first_line
        end = piece.first_line + piece.num_samples
        name = os.path.basename(piece.tar)
        local = location.local_path(piece.tar)
        with location.open_binary(piece.tar) as f:
            file_size = f.seek(0, os.SEEK_END)
            f.seek(piece.offset)
            # a local tar's kept members may be referenced by the part files, like files (SourceRef)
            st = os.fstat(f.fileno()) if local is not None else None
            tar_path = os.path.abspath(local) if local is not None else ""
            members: dict[str, tuple[str, bytes]] = {}
            origins: dict[str, SourceRef] = {}
            key: str | None = None
            member = ""
            walk = _quick_members(f, file_size, piece.offset) if piece.quick else _tarfile_members(f)
            try:
                for _, member, size, _, data, regular in walk:
                    if not regular or _META_NAME.search(member):
                        continue
                    prefix, ext = _split_name(member)
                    if prefix is None:
                        continue
                    if prefix != key:
                        if key is not None:
                            yield self._row(line, key, members, name, default_split, origins)
                            line += 1
                            members, origins = {}, {}
                        if line == end:
                            break
                        key = prefix
                    if ext not in members:
                        f.seek(data)
                        blob = f.read(size)
                        if len(blob) != size:
                            raise tarfile.ReadError("unexpected end of data")
                        members[ext] = (member, blob)
                        if st is not None:
                            origins[ext] = SourceRef(tar_path, size, st.st_mtime_ns, data)
                else:
                    if key is not None and line < end:
                        yield self._row(line, key, members, name, default_split, origins)
                        line += 1
            except (tarfile.TarError, OSError, EOFError) as exc:
                why = piece.damage or f"the tar could not be read on ({exc})"
                if key is not None and line < end:
                    yield Reject(line, key, "manifest", f"{name}: member {member!r} is cut short: {why}")
                    line += 1
        while line < end:  # the tar changed since planning, or broke in a way the planner missed
            yield Reject(line, None, "manifest", f"{name}: sample missing: the tar ends before it")
            line += 1

    def _row(
        self,
        line: int,
        key: str,
        members: dict[str, tuple[str, bytes]],
        tar: str,
        default_split: str,
        origins: dict[str, SourceRef],
    ) -> Row | Reject:
        return sample_row(
            line,
            key,
            members,
            tar,
            default_split=default_split,
            attachment_token=self.attachment_token,
            attachment_position=self.attachment_position,
            origins=origins,
        )


class _Unsupported(Exception):
    """A header the quick walk leaves to tarfile (GNU format, long names, sparse files, base-256 sizes)."""


def _quick_members(f, file_size: int, start: int = 0) -> Iterator[tuple[int, str, int, int, int, bool]]:
    """(header offset, name, size, mtime, data offset, regular file) of every member of a POSIX
    ustar/pax tar (what webdataset's TarWriter and Python's tarfile write), reading only the
    headers: tarfile parses each header in Python, which cost more than the rest of planning.
    Raises _Unsupported for anything else; the caller then walks the tar with tarfile."""
    pos, start, pax = start, None, {}
    while True:
        f.seek(pos)
        hdr = f.read(512)
        if len(hdr) < 512 or hdr == bytes(512):
            if hdr.strip(b"\0"):
                raise tarfile.ReadError(f"the tar ends inside a header at byte {pos}")
            return
        if hdr[257:265] != b"ustar\x0000" or hdr[124] & 0x80:
            raise _Unsupported
        try:
            checksum = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            mtime = int(hdr[136:148].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _Unsupported from None
        if checksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise tarfile.ReadError(f"bad header checksum at byte {pos}")
        kind = hdr[156:157]
        data = pos + 512
        start = pos if start is None else start
        if kind in (b"x", b"g"):  # pax records for the next member, or global ones
            records = f.read(size)
            if kind == b"x":
                pax = _pax_records(records)
            else:
                start = None
            pos = data + (size + 511) // 512 * 512
            continue
        if kind not in (b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"):
            raise _Unsupported  # GNU long names ('L', 'K'), sparse files ('S'), ...
        name = pax.get("path")
        if name is None:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}" if prefix else name
        if "size" in pax:
            size = int(pax["size"])
        regular = kind in (b"0", b"7") or (kind == b"\0" and not name.endswith("/"))  # as tarfile reads them
        yield start, name, size, int(float(pax.get("mtime", mtime))), data, regular
        start, pax = None, {}
        pos = data + (size + 511) // 512 * 512 if kind in (b"0", b"\0", b"7") else data


def _pax_records(raw: bytes) -> dict[str, str]:
    """'%d key=value\\n' records (POSIX pax), as tarfile reads them."""
    out, i = {}, 0
    while i < len(raw):
        space = raw.index(b" ", i)
        length = int(raw[i:space])
        key, _, value = raw[space + 1 : i + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def _tarfile_members(f) -> Iterator[tuple[int, str, int, int, int, bool]]:
    tf = tarfile.open(fileobj=f, mode="r:")
    while (info := tf.next()) is not None:
        tf.members = []
        yield info.offset, info.name, info.size, int(info.mtime), info.offset_data, info.isreg()


def _scan_tar(tar: str, digest) -> _Scan:
    with location.open_binary(tar) as f:
        file_size = f.seek(0, os.SEEK_END)
        try:
            scan, own = _scan_members(f, tar, _quick_members(f, file_size), file_size)
        except _Unsupported:
            f.seek(0)
            scan, own = _scan_members(f, tar, _tarfile_members(f), file_size)
            scan.quick = False
    digest.update(own.digest())
    return scan


def _scan_members(f, tar: str, members, file_size: int):
    """The tar's samples (header offset, id), from its members in order."""
    scan, own = _Scan(), hashlib.sha256()
    key, pending, name, end = None, None, None, 0  # pending: the current sample's offset, key, id
    try:
        for offset, name, size, mtime, data, regular in members:
            end = data + size
            if not regular or _META_NAME.search(name):
                if end > file_size and regular:
                    raise tarfile.ReadError("unexpected end of data")
                continue
            prefix, ext = _split_name(name)
            if prefix is None:
                continue
            own.update(f"{name}\0{size}\0{mtime}\n".encode())
            if prefix != key:
                if pending is not None:
                    scan.samples.append((pending[0], pending[2] or pending[1]))
                key = prefix
                scan.keys.add(prefix)
                pending = (offset, prefix, None)
            if ext == "json" and pending[2] is None:
                f.seek(data)
                raw = f.read(size)
                own.update(raw)
                pending = (pending[0], pending[1], _json_id(raw))
            if end > file_size:  # this member's sample is read up to the cut, then rejected
                raise tarfile.ReadError("unexpected end of data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        if pending is not None and end > file_size:
            scan.damage = f"the tar ends inside member {name!r} ({exc})"
        else:
            scan.note = f"unreadable from byte {end} on ({exc}): the rest of the tar is lost"
    if pending is not None:
        scan.samples.append((pending[0], pending[2] or pending[1]))
    if scan.damage is None and scan.note is None:
        f.seek((end + 511) // 512 * 512)
        if f.read(1024).strip(b"\0"):
            scan.note = (
                f"unreadable tar header at byte {(end + 511) // 512 * 512}: the rest of the tar is lost"
            )
    return scan, own


def _json_id(raw: bytes) -> str | None:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = obj.get("image_id") if isinstance(obj, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value else None


def _side_rows(piece: Piece) -> Iterator[Reject]:
    """The rows of img2dataset's parquet that the tar does not hold: each a reject."""
    table = _side_table(piece.side)
    errors = table.get("error_message") or [None] * len(table["key"])
    for k, i in enumerate(piece.side_rows):
        key, status = str(table["key"][i]), table["status"][i]
        line = piece.first_line + k
        if status == "success":
            yield Reject(line, key, "manifest", piece.lost or "not in the tar")
        else:
            yield Reject(
                line,
                key,
                _STATUS_STAGES.get(status, "manifest"),
                f"img2dataset: {status}: {errors[i] or 'no error message'}",
            )


def sample_row(
    line: int,
    key: str,
    members: dict[str, tuple[str, bytes]],
    tar: str,
    *,
    default_split: str,
    attachment_token: str = DEFAULT_ATTACHMENT_TOKEN,
    attachment_position: str = "after",
    origins: dict[str, SourceRef] | None = None,
) -> Row | Reject:
    """One sample (extension -> (member name, bytes)) -> a row, or a reject naming why.
    ``origins`` (extension -> where its bytes lie in a local tar) become the images' origins.

    The ``.json`` holds the row: ``output`` (a labelr row), or ``conversations``/``messages``
    (LLaVA/ShareGPT or trainer turns) or ``text``, plus ``split``, ``image_id`` and the rest
    as meta. A ``.txt`` is the row's ``text`` when the json has none of these."""
    obj: dict[str, Any] = {}
    if "json" in members:
        try:
            obj = orjson.loads(members["json"][1])
        except orjson.JSONDecodeError as exc:
            return Reject(line, key, "manifest", f"{key}.json is not valid JSON: {exc}")
        if not isinstance(obj, dict):
            return Reject(
                line,
                key,
                "manifest",
                f"{key}.json is {json_kind(obj)}, not a JSON object",
            )
    image_id = _json_id(members["json"][1]) if "json" in members else None
    image_id = image_id or key
    if "\x00" in image_id:
        return Reject(line, image_id.replace("\x00", "\\0"), "manifest", "'image_id' contains a NUL byte")

    def reject(reason: str, stage: str = "manifest") -> Reject:
        return Reject(line, image_id, stage, reason)

    status = obj.get("status")
    if isinstance(status, str) and status != "success":  # an img2dataset sample that failed
        return reject(
            f"img2dataset: {status}: {obj.get('error_message') or 'no error message'}",
            _STATUS_STAGES.get(status, "manifest"),
        )
    origins = origins or {}
    images = [
        InlineImage(data, os.path.basename(name), origins.get(ext))
        for ext, (name, data) in members.items()
        if ext in IMAGE_EXTENSIONS
    ]
    if not images:
        return reject(
            f"sample {key!r} of {tar} has no image member (.{', .'.join(IMAGE_EXTENSIONS[:4])}, ...)"
        )
    split = obj.get("split") or default_split
    if not isinstance(split, str) or not SPLIT_NAME.match(split):
        return reject(f"invalid split name {split!r}")
    caption = members["txt"][1] if "txt" in members else None
    if "output" in obj:
        if len(images) != 1:
            return reject(f"a row with 'output' takes one image; sample {key!r} has {len(images)}")
        meta = _meta(obj)
        if caption is not None and "txt" not in meta:
            meta["txt"] = caption.decode("utf-8", "replace")
        return Row(
            line=line,
            kind="labelr",
            image_id=image_id,
            split=split,
            locations=tuple(images),
            meta=meta,
            output=obj["output"],
        )
    if "conversations" in obj or "messages" in obj:
        listed = {
            **obj,
            "images": [f"tar-image-{i}" for i in range(len(images))],
        }  # the tar's images, in member order
        listed.pop("image", None)
        turns = sharegpt.convert(listed, attachment_token)
        if isinstance(turns, str):
            return reject(turns)
        return Row(
            line=line,
            kind="trainer",
            image_id=image_id,
            split=split,
            locations=tuple(images),
            meta={},
            conversations=turns.turns,
        )
    text = obj.get("text")
    if text is None and caption is not None:
        text = caption.decode("utf-8", "replace")
    if not isinstance(text, str):
        return reject(f"sample {key!r} has no output, conversations or text in its .json, and no .txt")
    if sharegpt.IMAGE_TOKEN in text:
        text = text.replace(sharegpt.IMAGE_TOKEN, attachment_token)
    elif attachment_token not in text:  # a plain caption: the image goes where --attachment-position says
        text = user_content(text, attachment_token, len(images), attachment_position)
    return Row(
        line=line, kind="trainer", image_id=image_id, split=split, locations=tuple(images), meta={}, text=text
    )


def _meta(obj: dict[str, Any]) -> dict[str, str | None]:
    """barcode, off_image_id, image_url (img2dataset's ``url``), then the json's other keys (a
    ``meta`` object's entries among them), as strings."""
    flat = {k: v for k, v in obj.items() if k != "meta"}
    if isinstance(obj.get("meta"), dict):
        flat.update(obj["meta"])
    return build_meta(flat, url_keys=("image_url", "url"))

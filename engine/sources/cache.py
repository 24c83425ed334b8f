"""The download cache: fetched image bytes kept by URL, in a local folder or at an fsspec URL.

An entry is what the server sent with status 200, whatever became of the row later, so a run
with other image options or another layout (or a retry of the rows rejected after their fetch)
downloads nothing again. Failures are not kept: a 404 may be served later. Each entry holds a
header with the body's length and SHA-256, so a torn or damaged entry reads as a miss and is
fetched and written again. Entries are written atomically (a temporary file renamed, or one
object PUT), so concurrent runs sharing a cache never see a partial entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import uuid
from dataclasses import dataclass

from engine.sources.location import local_path

MAGIC = b"ENGINEC1"
_HEADER = struct.Struct(">8sQ32s")  # magic, body length, SHA-256 of the body
HEADER_BYTES = _HEADER.size  # where the body starts in an entry
# Object stores write an object in one PUT, visible whole or not at all.
_ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


@dataclass(frozen=True, slots=True)
class CacheRead:
    """What a lookup found: ``data`` on a hit; ``corrupt`` when an entry exists but fails its check."""

    data: bytes | None
    corrupt: bool = False
    size: int = 0  # of the entry, header included


class DownloadCache:
    """Thread-safe; one per process. Keys are the SHA-256 of the URL, under two-hex-digit folders."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or root
        self._local = local_path(self.root)
        if self._local is None:
            import fsspec

            self._fs, self._base = fsspec.core.url_to_fs(self.root)
            self._protocol = self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]
        else:
            self._base = os.path.abspath(self._local)
            os.makedirs(self._base, exist_ok=True)

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()

    def _path(self, url: str) -> str:
        key = self.key(url)
        return f"{self._base}/{key[:2]}/{key}"

    def get(self, url: str) -> CacheRead:
        path = self._path(url)
        try:
            if self._local is not None:
                with open(path, "rb") as f:
                    raw = f.read()
            else:
                raw = self._fs.cat_file(path)
        except FileNotFoundError:
            return CacheRead(None)
        body = decode_entry(raw)
        return CacheRead(body, corrupt=body is None, size=len(raw))

    @property
    def is_local(self) -> bool:
        return self._local is not None

    def local_entry(self, url: str) -> str | None:
        """The path of ``url``'s entry when this cache is a local folder (whether or not it exists)."""
        return self._path(url) if self._local is not None else None

    @staticmethod
    def read_local(path: str, max_body: int) -> tuple[CacheRead, os.stat_result | None]:
        """A local entry read and checked as a file is, with the status of the open file taken
        before the read (a part file may reference the body at HEADER_BYTES, see SourceRef). A
        body over ``max_body`` is not read: the read says so with ``size`` and no data."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size - HEADER_BYTES > max_body:
                    return CacheRead(None, size=st.st_size), st
                header = f.read(HEADER_BYTES)
                body = f.read()  # the body alone: no copy out of the whole entry
        except FileNotFoundError:
            return CacheRead(None), None
        data = _checked(header, body)
        return CacheRead(data, corrupt=data is None, size=st.st_size), st

    def contains(self, url: str) -> bool:
        """Whether a sound entry exists (reads and checks it)."""
        return self.get(url).data is not None

    def put(self, url: str, data: bytes, replace: bool = True) -> int:
        """Store ``data`` for ``url``; returns the entry's size in bytes. Without ``replace``, a
        local entry that appeared meanwhile (another run's) is kept: a part file may reference it."""
        return (
            self.put_local(url, data, replace)[0] if self._local is not None else self._put_remote(url, data)
        )

    def put_local(self, url: str, data: bytes, replace: bool = True) -> tuple[int, int | None]:
        """``put`` into a local folder: the entry's size, and its mtime in ns when this call wrote
        it (None when an entry already there was kept)."""
        entry = encode_entry(data)
        path = self._path(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(entry)
                f.flush()  # so the status below is the closed file's
                mtime_ns: int | None = os.fstat(f.fileno()).st_mtime_ns
            if replace or not _link(tmp, path):
                os.replace(tmp, path)
            elif not os.path.samefile(tmp, path):
                mtime_ns = None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # after a link or a failure; a rename left nothing here
        return len(entry), mtime_ns

    def _put_remote(self, url: str, data: bytes) -> int:
        entry = encode_entry(data)
        path = self._path(url)
        if self._protocol in _ATOMIC_PUT:
            self._fs.pipe_file(path, entry)
        else:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            self._fs.makedirs(os.path.dirname(path), exist_ok=True)
            self._fs.pipe_file(tmp, entry)
            self._fs.mv(tmp, path)
        return len(entry)

    def size_bytes(self) -> int:
        """Bytes the whole cache holds (walks it: meant for reports, not per row)."""
        if self._local is not None:
            total = 0
            for folder, _, files in os.walk(self._base):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.stat(os.path.join(folder, name)).st_size
            return total
        return int(self._fs.du(self._base)) if self._fs.exists(self._base) else 0


def _link(tmp: str, path: str) -> bool:
    """Put ``tmp`` at ``path`` unless an entry is there already (kept, as a part file may reference
    it); False when this file system has no hard links, so the caller renames instead."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:
        return False
    return True


def encode_entry(data: bytes) -> bytes:
    return _HEADER.pack(MAGIC, len(data), hashlib.sha256(data).digest()) + data


def decode_entry(raw: bytes) -> bytes | None:
    """The body of a sound entry, or None when the header, the length or the digest is wrong."""
    return _checked(raw[:HEADER_BYTES], raw[HEADER_BYTES:])


def _checked(header: bytes, body: bytes) -> bytes | None:
    if len(header) < HEADER_BYTES:
        return None
    magic, length, digest = _HEADER.unpack(header)
    if magic != MAGIC or length != len(body) or hashlib.sha256(body).digest() != digest:
        return None
    return body

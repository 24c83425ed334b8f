"""The output folder: a local path, or any fsspec URL (``s3://bucket/prefix``, ``gs://``, ...).

Every file appears whole or not at all:
- locally, it is written to ``OUT/.engine/tmp``, fsynced, and renamed into place (same filesystem);
- on object storage, which has no rename, it is written to a local temporary file and uploaded
  to its final key in one PUT (or one multipart upload), which the store makes visible only
  once complete. The dataset as a whole is committed by ``stats.json``, written last.

A store is small and picklable: workers get it in their descriptors and write their own files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from engine.errors import ShardError, reason
from engine.sources.location import local_path
from engine.workdir import TMP_DIR


class Finisher:
    """Finishes written files (fsync and rename, or upload) in one background thread, in order.

    A shard writer that fsyncs each shard itself waits for the disk while it could write the
    next one; two writers overlapped that wait at twice the memory. With this thread, one
    writer keeps the disk as busy. ``wait`` (or leaving the ``with`` block) returns once every
    file is in place, and raises the first failure as a ShardError naming its file."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-finish")
        self._pending: list[tuple[str, Future]] = []

    def submit(self, rel: str, complete: Callable[[], None]) -> None:
        self._pending.append((rel, self._pool.submit(complete)))

    def wait(self) -> None:
        """Every file submitted is finished or failed (each then removes its temporary copy,
        so none is cancelled); the first failure is raised."""
        pending, self._pending = self._pending, []
        failure: ShardError | None = None
        for rel, future in pending:
            try:
                future.result()
            except Exception as exc:
                if failure is None:
                    failure = ShardError(rel, reason(exc))
                    failure.__cause__ = exc
        if failure is not None:
            raise failure

    def __enter__(self) -> Finisher:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


class Store:
    def __init__(self, root: str):
        path = local_path(root)
        self.remote = path is None
        self.root = root.rstrip("/") if self.remote else os.path.abspath(path)
        self._fs = None

    def __getstate__(self):
        return {"root": self.root, "remote": self.remote}

    def __setstate__(self, state):
        self.root, self.remote, self._fs = state["root"], state["remote"], None

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.root)
        return self._fs

    def path(self, rel: str = "") -> str:
        if not rel:
            return self.root
        return f"{self.root}/{rel}" if self.remote else os.path.join(self.root, *rel.split("/"))

    # ---- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, rel: str, durable: bool = True, finisher: Finisher | None = None) -> Iterator[str]:
        """Yield a local path to write ``rel`` to; it appears under its final name only on success.

        ``durable=False`` skips the fsync before the rename, for scratch files that a resumed run
        checks anyway (part files and unit checkpoints). A process crash loses nothing either
        way; only a power loss can leave such a file short, and the resume check redoes its unit
        (``engine.workdir.load_unit_result``). The fsync of every part was slow (bench/GAP.md).

        With a ``finisher``, the last step (fsync and rename, or the upload) runs in its thread
        while the caller writes the next file; ``Finisher.wait`` reports its failures."""
        if self.remote:
            folder = tempfile.mkdtemp(prefix="engine-")
            tmp = os.path.join(folder, os.path.basename(rel))

            def finish() -> None:
                self.fs.put_file(tmp, self.path(rel))

            def discard() -> None:
                shutil.rmtree(folder, ignore_errors=True)
        else:
            final = self.path(rel)
            tmp_dir = self.path(TMP_DIR)
            os.makedirs(tmp_dir, exist_ok=True)
            tmp = os.path.join(tmp_dir, f".{os.path.basename(final)}.{uuid.uuid4().hex[:12]}.tmp")

            def finish() -> None:
                if durable:
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(tmp, final)

            def discard() -> None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)

        def complete() -> None:
            try:
                finish()
            finally:
                discard()

        try:
            yield tmp
        except BaseException:
            discard()
            raise
        if finisher is not None:
            finisher.submit(rel, complete)
        else:
            complete()

    def write_bytes(self, rel: str, data: bytes, durable: bool = True) -> None:
        with self.writing(rel, durable) as tmp, open(tmp, "wb") as f:
            f.write(data)

    def size(self, rel: str) -> int | None:
        """The file's size in bytes, or None if it does not exist."""
        try:
            return self.fs.size(self.path(rel)) if self.remote else os.path.getsize(self.path(rel))
        except FileNotFoundError:
            return None

    # ---- reading -------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        if self.remote:
            return self.fs.cat_file(self.path(rel))
        with open(self.path(rel), "rb") as f:
            return f.read()

    def open_arrow(self, rel: str) -> pa.NativeFile:
        """A part file for streaming reads. Not memory-mapped: the pages of a mapped file count
        in the process's memory until it is unmapped, so memory would grow with the part size."""
        if self.remote:
            return pa.PythonFile(self.fs.open(self.path(rel), "rb"), mode="r")
        return pa.OSFile(self.path(rel), "rb")

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel)) if self.remote else os.path.exists(self.path(rel))

    def is_file(self, rel: str) -> bool:
        return self.fs.isfile(self.path(rel)) if self.remote else os.path.isfile(self.path(rel))

    def entries(self) -> list[str]:
        """Names directly under the root (empty when it does not exist)."""
        if self.remote:
            if not self.fs.exists(self.root):
                return []
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        return os.listdir(self.root) if os.path.isdir(self.root) else []

    # ---- removing ------------------------------------------------------------------------------

    def remove(self, rel: str) -> None:
        """Remove a file or a folder (recursively); missing is fine."""
        target = self.path(rel)
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(target, recursive=True)
        elif os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(target)

    def make_dirs(self, rel: str) -> None:
        if not self.remote:  # object stores have no folders to make
            os.makedirs(self.path(rel), exist_ok=True)

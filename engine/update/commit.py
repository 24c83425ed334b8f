"""Where an update builds the new dataset, and how it replaces the old one.

- **Local folder.** The new dataset is built whole in a sibling folder,
  ``PARENT/.NAME.engine-update/next``, and swapped with ``OUT`` in one ``renameat2`` call
  (``RENAME_EXCHANGE``): a reader sees the old folder or the new one, never a mix, and the old
  one is untouched until then. Where the filesystem cannot exchange, two renames are used
  (for an instant there is no ``OUT``, but never a mix).
- **Object storage** has no rename. The new files are uploaded under ``OUT/.engine-update/next``;
  then a journal is written, ``stats.json`` is removed, the new files are copied over the old
  keys (stale shards deleted), and ``stats.json`` is written last, as ``convert`` commits.

``state.json`` in the staging folder says how far it got: a crash before the commit leaves the
old dataset as it was (the staging folder is discarded by the next run); a crash during the
commit is finished by the next run, before anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil

import orjson

from engine import workdir
from engine.errors import UsageError
from engine.sinks.store import Store

STAGING = ".engine-update"  # on object storage, inside OUT
_RENAME_EXCHANGE = 2


def crash_point(name: str) -> None:
    """Tests SIGKILL the update here (``ENGINE_CRASH_AT=name``)."""
    if os.environ.get("ENGINE_CRASH_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically; False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


class Staging:
    def __init__(self, store: Store):
        self.out = store
        if store.remote:
            self.root = store.path(STAGING)
        else:
            parent, name = os.path.split(store.root)
            self.root = os.path.join(parent, f".{name}{STAGING}")
        self.next = Store(f"{self.root}/next" if store.remote else os.path.join(self.root, "next"))
        self._state = Store(self.root)

    def _read_state(self) -> dict | None:
        try:
            return orjson.loads(self._state.read_bytes("state.json"))
        except FileNotFoundError:
            return None
        except ValueError:  # torn: nothing was committed yet (the commit state is written whole)
            return None

    def _write_state(self, doc: dict) -> None:
        self._state.write_bytes("state.json", orjson.dumps(doc))

    def discard(self) -> None:
        if self.out.remote:
            self.out.remove(STAGING)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def unlock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock.name)
            self._lock = None

    def lock(self) -> None:
        """One update of a local folder at a time: a second one is refused, not interleaved. The
        lock is held until the process ends (object storage has no such lock)."""
        if self.out.remote:
            return
        import fcntl

        self._lock = open(f"{self.root}.lock", "a+b")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UsageError(f"another 'engine update' of {self.out.root} is running") from None

    def start(self, digest: str) -> Store:
        """A fresh staging folder for an update with this digest; returns the new dataset's store."""
        self.discard()
        self._state.make_dirs("")
        self._write_state({"phase": "staging", "digest": digest})
        workdir.make(self.next)
        return self.next

    def recover(self) -> str | None:
        """Finish a commit a crash interrupted (returns its digest), or discard an unfinished staging."""
        state = self._read_state()
        if state is None or state.get("phase") != "committing":
            if state is not None or (not self.out.remote and os.path.exists(self.root)):
                self.discard()
            return None
        self._commit(state)
        return state["digest"]

    def commit(self, digest: str, files: list[str], stale: list[str], carry: list[str]) -> None:
        """Make the staged dataset the dataset. ``files``: what the new dataset holds (relative
        paths, stats.json last); ``stale``: the old dataset's files it no longer has; ``carry``:
        entries of OUT that are not the dataset's (a user's own files), kept in the new folder."""
        workdir.remove(self.next)
        stats = self.next.read_bytes("stats.json")
        state = {
            "phase": "committing",
            "digest": digest,
            "stats_sha256": hashlib.sha256(stats).hexdigest(),
            "files": files,
            "stale": stale,
            "carry": carry,
        }
        self._write_state(state)
        crash_point("update-committing")
        self._commit(state)

    def _commit(self, state: dict) -> None:
        if self.out.remote:
            self._commit_remote(state)
        else:
            self._commit_local(state)
        self.discard()

    def _commit_local(self, state: dict) -> None:
        out, new = self.out.root, self.next.root
        if _is_committed(self.out, state):
            self._carry(state, new if os.path.exists(new) else os.path.join(self.root, "old"))
            return
        if os.path.exists(new) and os.path.exists(out):
            if not _exchange(new, out):
                os.rename(out, os.path.join(self.root, "old"))
                crash_point("update-between-renames")
                os.rename(new, out)
        elif os.path.exists(new):  # the two-rename fallback stopped between its renames
            os.rename(new, out)
        crash_point("update-swapped")
        self._carry(state, new if os.path.exists(new) else os.path.join(self.root, "old"))

    def _carry(self, state: dict, old: str) -> None:
        """Move the user's own entries from the old folder into the new one."""
        for name in state.get("carry", []):
            source, target = os.path.join(old, name), os.path.join(self.out.root, name)
            if os.path.lexists(source) and not os.path.lexists(target):
                os.rename(source, target)

    def _commit_remote(self, state: dict) -> None:
        """Copies, not moves: a re-run after a crash here copies again, whatever was done."""
        if _is_committed(self.out, state):
            return
        fs = self.out.fs
        self.out.remove("stats.json")  # from here the folder is unfinished until stats.json is back
        for old in state["stale"]:
            self.out.remove(old)
        for rel in state["files"]:
            if rel == "stats.json":
                continue
            fs.copy(self.next.path(rel), self.out.path(rel))
            crash_point("update-mid-commit")
        fs.copy(self.next.path("stats.json"), self.out.path("stats.json"))  # last: the commit marker


def _is_committed(store: Store, state: dict) -> bool:
    try:
        return hashlib.sha256(store.read_bytes("stats.json")).hexdigest() == state["stats_sha256"]
    except FileNotFoundError:
        return False

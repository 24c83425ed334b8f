"""HTTP(S) fetching in a child process of its own (the default; ``--http-in-process`` turns it off).

The loop of :mod:`engine.sources.http` still spends Python on every request (its bookkeeping
and libcurl's callbacks). On a thread of the units' process that time is taken from their GIL;
here the same :class:`~engine.sources.http.HttpClient` runs in a child process, and the parent
only frames requests and results over two pipes (bench/GAP.md, "A process of its own for
HTTP", and "libcurl instead of aiohttp").

:class:`RemoteHttpClient` has the client's interface (``submit``, ``has_room``,
``mean_body_bytes``, ``max_in_flight``). A body counts against the child's fetch buffer until
the parent's :class:`~engine.sources.fetch.Fetched` is released or dropped, as in-process. A
frame is a 4-byte length and a pickle; a result's body follows it raw. The child ends when its
stdin closes: when the client is dropped or closed, or when the parent dies however it dies.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import pickle
import queue
import re
import struct
import subprocess
import sys
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path

from engine.config import FetchOptions
from engine.sources.fetch import Fetched, FetchFailure

_LEN = struct.Struct("<I")
PIPE_BYTES = 1 << 20  # pipe buffer asked for on Linux (64 KiB by default: a body would take many turns)


def _write_frame(fd: int, lock: threading.Lock, message, body: bytes = b"") -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        _write_all(fd, _LEN.pack(len(payload)) + payload)
        if body:
            _write_all(fd, body)


def _write_all(fd: int, data: bytes) -> None:
    # a pipe write that a stop signal interrupts (a profiler attaching) returns having written
    # part: the rest must follow, or the stream loses its frames
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(stream, n: int) -> bytes | None:
    """``n`` bytes from the buffered ``stream``, or None at its end."""
    data = stream.read(n)
    return data if len(data) == n else None


def _buffered(fd_or_file) -> io.BufferedReader:
    # one read brings many frames: each system call on the parent's reader thread gives the
    # GIL away, and the units' threads may keep it for a switch interval before it comes back
    raw = (
        fd_or_file
        if isinstance(fd_or_file, io.RawIOBase)
        else open(fd_or_file, "rb", buffering=0, closefd=False)
    )
    return io.BufferedReader(raw, buffer_size=PIPE_BYTES)


def _read_frame(stream):
    head = _read_exact(stream, _LEN.size)
    if head is None:
        return None
    payload = _read_exact(stream, _LEN.unpack(head)[0])
    return None if payload is None else pickle.loads(payload)


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(ImportError, AttributeError, OSError):  # Linux only; a hint elsewhere
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


_SPARE: list[subprocess.Popen] = []  # a child started before its options were known (prespawn)
_URL_VALUE = re.compile(rb'"(?:https?)://')
HEAD_BYTES = 64 * 1024


def _spawn() -> subprocess.Popen:
    # the engine's folder on the path: a Ray worker may have it from its runtime env only
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.sources.http_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path},
        bufsize=0,
    )
    _grow_pipe(proc.stdin.fileno())
    _grow_pipe(proc.stdout.fileno())
    return proc


def prespawn(manifest: str) -> None:
    """Start a child now when the head of the local file ``manifest`` holds URL strings: its
    start (Python, pycurl) then overlaps the parent's imports and planning, and the first
    client of this process takes it. An unused one ends with this process."""
    try:
        with open(manifest, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:  # a folder, a remote URL, or nothing there: the run says what is wrong
        return
    if _URL_VALUE.search(head) and not _SPARE:
        proc = _spawn()
        _SPARE.append(proc)
        weakref.finalize(proc, _stop, proc)


class _Link:
    """The pipes to one child and the futures waiting on it; what the reader thread holds (not
    the client, so a dropped client is collected, and its child stopped)."""

    def __init__(self, opts: FetchOptions, max_bytes: int):
        try:
            self.proc = _SPARE.pop()
        except IndexError:
            self.proc = _spawn()
        self._out_lock = threading.Lock()
        self.futures: dict[int, Future] = {}
        self.closed = False  # the child ended: fetches fail at once
        self.lock = threading.Lock()
        self.mean_body_bytes, self.room, self.max_in_flight = float(2 << 20), True, 0
        # releases come from finalizers, which may run inside a send: they are queued (a
        # SimpleQueue's put is safe there) and sent by a thread of their own
        self._posted: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._send_posted, name="engine-http-release", daemon=True).start()
        self.send(("init", opts, max_bytes))

    def send(self, message) -> None:
        try:
            _write_frame(self.proc.stdin.fileno(), self._out_lock, message)
        except (OSError, ValueError):  # the child is gone: the reader fails what waits on it
            pass

    def post(self, message) -> None:
        self._posted.put(message)

    def _send_posted(self) -> None:
        while (message := self._posted.get()) is not None:
            self.send(message)

    def read(self) -> None:
        from engine.sources import http

        stream = _buffered(self.proc.stdout)
        while True:
            try:
                message = _read_frame(stream)
            except (OSError, ValueError, EOFError, pickle.UnpicklingError):
                message = None
            if message is None:
                break
            kind = message[0]
            if kind == "state":
                _, self.mean_body_bytes, self.room, self.max_in_flight = message
                continue
            _, ident, meta, size, self.mean_body_bytes, self.room, self.max_in_flight = message
            data = _read_exact(stream, size) if size >= 0 else meta.pop("failure")
            if data is None:
                break
            fetched = Fetched(data, **meta)
            http._DOWNLOADED[0] += fetched.num_bytes_downloaded
            if kind == "held":  # its bytes count in the child's buffer until it is released here
                fetched.hold = weakref.finalize(fetched, self.post, ("release", ident))
            with self.lock:
                future = self.futures.pop(ident, None)
            if future is not None and future.set_running_or_notify_cancel():
                future.set_result(fetched)
        self.fail_waiting()
        self._posted.put(None)

    def fail_waiting(self) -> None:
        """The child ended: every fetch still waiting on it, or asked of it later, is that row's
        fetch failure."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        code = self.proc.poll()
        with self.lock:
            waiting, self.futures, self.closed = self.futures, {}, True
        failure = FetchFailure(f"the HTTP fetch process ended (exit code {code}); see the log above")
        for future in waiting.values():
            if future.set_running_or_notify_cancel():
                future.set_result(Fetched(failure))


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RemoteHttpClient:
    """The parent's side; thread-safe, like HttpClient."""

    def __init__(self, opts: FetchOptions, max_bytes: int):
        self._link = link = _Link(opts, max_bytes)
        self._ids = itertools.count()
        threading.Thread(target=link.read, name="engine-http-reader", daemon=True).start()
        self._stop = weakref.finalize(self, _stop, link.proc)

    def submit(self, url: str, speculative: bool = False, cached: str | None = None) -> Future:
        link, ident, future = self._link, next(self._ids), Future()
        with link.lock:
            if not link.closed:  # else the reader has failed what waited: this one fails here
                link.futures[ident] = future
        if link.closed:
            future.set_running_or_notify_cancel()
            future.set_result(Fetched(FetchFailure(f"the HTTP fetch process ended: {url}")))
            return future
        future.add_done_callback(lambda f: f.cancelled() and link.post(("cancel", ident)))
        link.send(("get", ident, url, speculative, cached))
        return future

    @property
    def mean_body_bytes(self) -> float:
        return self._link.mean_body_bytes

    @property
    def max_in_flight(self) -> int:
        return self._link.max_in_flight

    def has_room(self) -> bool:
        """As HttpClient's, as of the child's last word (it says when room comes back)."""
        return self._link.room

    def close(self) -> None:
        self._stop()


def _child() -> None:
    import signal

    # Ctrl-C reaches the whole process group: the parent handles it, and this child ends when
    # the parent closes the pipe (no traceback of its own on the terminal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import pycurl  # noqa: F401 - imported while the parent may not have sent the options yet

    from engine.sources.cache import DownloadCache
    from engine.sources.http import HttpClient

    stdin, out = _buffered(0), os.dup(1)
    os.dup2(2, 1)  # only frames on the pipe: anything printed goes to stderr
    sys.stdout = sys.stderr
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # as the CLI's
    init = _read_frame(stdin)
    if init is None:  # a spare child whose parent needed no HTTP after all
        os._exit(0)
    _, opts, max_bytes = init
    client = HttpClient(opts, max_bytes, DownloadCache(opts.cache) if opts.cache else None)
    out_lock = threading.Lock()
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    futures: dict[int, Future] = {}
    held: dict[int, Fetched] = {}
    room = [True]

    def state() -> tuple:
        return client.mean_body_bytes, client.has_room(), client.max_in_flight

    def write() -> None:  # a thread of its own: a full pipe never stalls the client's loop
        while True:
            ident, fetched = outbox.get()
            data = fetched.data
            meta = {
                "origin": fetched.origin,
                "num_requests": fetched.num_requests,
                "num_bytes_downloaded": fetched.num_bytes_downloaded,
                "cache": fetched.cache,
                "num_cache_bytes": fetched.num_cache_bytes,
            }
            size = len(data) if isinstance(data, bytes) else -1
            if size < 0:
                meta["failure"] = data
            kind = "held" if fetched.hold is not None else "free"
            if kind == "held":  # before the parent can see it, and so release it
                held[ident] = fetched
            room[0] = client.has_room()
            try:
                _write_frame(out, out_lock, (kind, ident, meta, size, *state()), data if size > 0 else b"")
            except OSError:  # the parent is gone
                os._exit(0)
            # the parent has the bytes now; what stays here until it releases them is their count
            fetched.data = None
            del fetched, data

    threading.Thread(target=write, name="engine-http-writer", daemon=True).start()

    def done(ident: int, future: Future) -> None:
        futures.pop(ident, None)
        if not future.cancelled():
            outbox.put((ident, future.result()))

    while (message := _read_frame(stdin)) is not None:
        kind = message[0]
        if kind == "get":
            _, ident, url, speculative, cached = message
            futures[ident] = future = client.submit(url, speculative=speculative, cached=cached)
            future.add_done_callback(lambda f, i=ident: done(i, f))
        elif kind == "release":
            fetched = held.pop(message[1], None)
            if fetched is not None:
                fetched.release()
                if not room[0] and client.has_room():  # the parent's look-ahead may go on
                    room[0] = True
                    with contextlib.suppress(OSError):
                        _write_frame(out, out_lock, ("state", *state()))
        elif kind == "cancel":
            future = futures.pop(message[1], None)
            if future is not None:
                future.cancel()
    os._exit(0)  # the parent closed the pipe: nothing is left to answer


if __name__ == "__main__":
    _child()

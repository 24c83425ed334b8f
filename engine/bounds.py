"""The per-image bound (``--image-timeout``): the same decision in every thread and process, under
any load.

A transform is bounded by the CPU time of the thread that runs it, which other work on the
machine does not change, so the same file is written or rejected on every run. A watchdog
thread reads each watched thread's CPU clock and, past the bound, raises :class:`ImageTimeout`
in it (``PyThreadState_SetAsyncExc``), which works in the driver's helper threads as in a Ray
worker's main thread. It fires at the thread's next Python step: Pillow's ``ImageFile.load``
feeds its decoders block by block, and Python decoders (DDS's) are Python throughout.

A thread that gets too little CPU to finish (the GIL or the cores taken by others) would run on
far past the bound in wall time. Past the bound plus a grace period it is stopped too, and the
transform is re-run once in a fresh process with the same CPU bound (a profiling timer) and a
memory limit (``RLIMIT_AS``), whose outcome decides, so load still decides nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from engine.config import ImageOptions
from engine.imaging import EncodedImage, ImageFailure, configure_pillow, transform_image

# Wall time past the CPU bound after which a starved thread is stopped and re-checked in isolation.
GRACE_SECONDS = 2.0
GRACE_RATIO = 0.25
MAX_TICK = 0.25  # the watchdog looks at least this often while a watch is near its bound
# Address space of the isolated re-check: the interpreter and libraries, then room for an image at
# the pixel limit in 4 bytes a pixel, decoded and converted (three copies).
ISOLATED_BASE_BYTES = 1 << 30
ISOLATED_BYTES_PER_PIXEL = 12


class ImageTimeout(BaseException):
    """Raised inside a transform that ran past its bound (a BaseException, so the transform's own
    error handling cannot swallow it). ``kind`` is ``cpu`` (its work exceeded the bound) or
    ``wall`` (it was starved of CPU; decide again in isolation)."""

    def __init__(self, kind: str = "cpu"):
        super().__init__(kind)
        self.kind = kind


@dataclass(eq=False, slots=True)
class _Watch:
    ident: int
    clock: int | None
    cpu0: float
    wall0: float
    seconds: float
    fired: str | None = None
    fired_at: float = 0.0

    def cpu_used(self) -> float:
        return _read_clock(self.clock) - self.cpu0


def _thread_clock(ident: int) -> int | None:
    """The CPU clock of thread ``ident``; None where the platform has none (macOS): wall time then."""
    getter = getattr(time, "pthread_getcpuclockid", None)
    return getter(ident) if getter is not None else None


def _read_clock(clock: int | None) -> float:
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


def _raise_in(ident: int, exc: type[BaseException] | None) -> None:
    """Schedule ``exc`` in thread ``ident`` at its next Python step (None clears a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc else None)


class _Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._watches: list[_Watch] = []
        self._local = threading.local()
        self._pid = 0
        self._parked = False  # the watchdog waits for _wake (no watch for a while)

    def watch(self, seconds: float) -> _Watch:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # a forked child's thread has another clock
            local.pid, local.ident = os.getpid(), threading.get_ident()
            local.clock = _thread_clock(local.ident)
        clock = local.clock
        w = _Watch(local.ident, clock, _read_clock(clock), time.monotonic(), seconds)
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child, which has no watchdog thread
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="image-watchdog", daemon=True).start()
            self._watches.append(w)
            parked = self._parked
        if parked:
            self._wake.set()
        return w

    def unwatch(self, w: _Watch) -> str | None:
        """Stop watching; how the bound was exceeded, or None. A fired exception still pending is
        cleared: the caller raises its own (every fired watch raises when it is left)."""
        with self._lock:
            with contextlib.suppress(ValueError):
                self._watches.remove(w)
            # CPU time is at most wall time, so a block shorter than its bound needs no clock read
            if w.fired is None and time.monotonic() - w.wall0 > w.seconds and w.cpu_used() > w.seconds:
                w.fired = "cpu"  # over the bound inside one call into C, which returned just now
            elif w.fired is not None:
                _raise_in(w.ident, None)
        return w.fired

    def _forget(self, w: _Watch) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._watches.remove(w)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._lock:
                watches = list(self._watches)
                # park only after a second without watches: images come one after another
                self._parked = not watches and time.monotonic() - idle_since > 1.0
                if self._parked:
                    self._wake.clear()
            if self._parked:
                self._wake.wait()
                idle_since = time.monotonic()
                continue
            if watches:
                idle_since = time.monotonic()
            tick = MAX_TICK
            now = time.monotonic()
            for w in watches:
                if w.fired is not None:
                    if now - w.fired_at > 10:  # left while its exception was being raised
                        self._forget(w)
                    continue
                try:
                    used = w.cpu_used()
                except OSError:  # the thread is gone
                    continue
                starved_at = w.wall0 + w.seconds + max(GRACE_SECONDS, GRACE_RATIO * w.seconds)
                kind = "cpu" if used > w.seconds else "wall" if now > starved_at else None
                if kind is None:  # CPU time grows no faster than wall time: nothing can fire before
                    tick = min(tick, w.seconds - used + 0.002, starved_at - now + 0.002)
                    continue
                with self._lock:
                    if w in self._watches and w.fired is None:
                        w.fired, w.fired_at = kind, now
                        _raise_in(w.ident, ImageTimeout)
            time.sleep(max(tick, 0.002))


_WATCHDOG = _Watchdog()


class time_limit:  # noqa: N801 - used as a function: ``with time_limit(seconds):``
    """Raise :class:`ImageTimeout` in the block once its thread has used ``seconds`` of CPU time,
    or ran so much longer in wall time that it was starved (``kind == "wall"``). Works in any
    thread; nests. A class, not a generator: it wraps every image."""

    __slots__ = ("_seconds", "_watch")

    def __init__(self, seconds: float | None):
        self._seconds = seconds
        self._watch: _Watch | None = None

    def __enter__(self) -> None:
        if self._seconds:
            self._watch = _WATCHDOG.watch(self._seconds)

    def __exit__(self, kind, exc, tb) -> bool:
        if self._watch is None:
            return False
        fired = _WATCHDOG.unwatch(self._watch)
        if fired is None or (kind is not None and not issubclass(kind, ImageTimeout)):
            return False  # no bound passed (or an outer one's), or another error to propagate
        raise ImageTimeout(fired) from None


def timeout_reason(seconds: float) -> str:
    return f"took longer than {seconds:g} s of CPU time to transform (--image-timeout)"


def transform_bounded(data: bytes, opts: ImageOptions) -> EncodedImage | ImageFailure:
    """``transform_image`` within ``opts.timeout``: here, and once again in a fresh process when
    this thread was starved of CPU before it could finish."""
    try:
        with time_limit(opts.timeout):
            return transform_image(data, opts)
    except ImageTimeout as exc:
        if exc.kind == "cpu":
            return ImageFailure(timeout_reason(opts.timeout or 0))
    return transform_isolated(data, opts)


def transform_isolated(data: bytes, opts: ImageOptions) -> EncodedImage | ImageFailure:
    """``transform_image`` in a fresh interpreter bounded to ``opts.timeout`` of CPU time and
    ISOLATED_* bytes of address space; its stderr is dropped (libraries' warnings)."""
    seconds = opts.timeout or 0
    memory = ISOLATED_BASE_BYTES + ISOLATED_BYTES_PER_PIXEL * opts.max_pixels
    wall = 10 + 4 * seconds  # only a machine stalled for minutes gets here
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "engine.bounds", str(seconds), str(memory)],
            input=pickle.dumps((data, opts)),
            capture_output=True,
            timeout=wall,
        )
    except subprocess.TimeoutExpired:
        return ImageFailure(timeout_reason(seconds))
    if proc.returncode == 0:
        return pickle.loads(proc.stdout)
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL, 3):
        return ImageFailure(timeout_reason(seconds))
    return ImageFailure(f"the image's decoder crashed (exit status {proc.returncode})")


def _isolated_main(seconds: float, memory: int) -> int:
    """The re-check's process: limits first, then the transform; the result is pickled to stdout."""
    data, opts = pickle.loads(sys.stdin.buffer.read())
    configure_pillow(opts.max_pixels)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    hard = (
        math.ceil(cpu.ru_utime + cpu.ru_stime + seconds) + 2
    )  # the kernel's stop, if a C call never returns
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard + 1))

    def on_profile(signum, frame):
        raise ImageTimeout("cpu")

    signal.signal(signal.SIGPROF, on_profile)
    signal.setitimer(signal.ITIMER_PROF, seconds)  # process CPU time, as the thread's clock in-process
    try:
        result = transform_image(data, opts)
    except ImageTimeout:
        return 3
    signal.setitimer(signal.ITIMER_PROF, 0)
    sys.stdout.buffer.write(pickle.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_isolated_main(float(sys.argv[1]), int(sys.argv[2])))

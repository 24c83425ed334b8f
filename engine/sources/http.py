"""HTTP(S) fetching on libcurl's multi interface (pycurl), one loop thread per process, shared by
its threads.

Any thread submits a URL and gets a ``concurrent.futures.Future``; up to
``FetchOptions.concurrency`` requests are in flight at once on kept-alive connections, at most
``max_per_host`` to one host and ``max_rps_per_host`` started per second to one host. A request
waits for a slot, then its clock starts: every attempt, pause and body read of one image fits in
``total_timeout``, so a server that trickles its body or never answers costs one row that long.
Requests start in submission order while fewer than ``buffer_bytes`` of fetched bytes are held
(being read, or done and not yet taken by their unit), so memory does not grow with the
concurrency; a unit takes its rows in order, so the oldest waiting row always gets to start.
Look-ahead fetches (rows no unit has asked for yet) are capped in number by their caller and
stay out of that count, so they never hold up a row a unit waits for.

libcurl connects, sends, parses and reads in C: a request costs half the CPU that aiohttp took
(bench/GAP.md, "libcurl instead of aiohttp"). Only the loop's bookkeeping, a header callback per
header line and a write callback per 512 KiB are Python.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import itertools
import logging
import os
import selectors
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import quote, urlsplit, urlunsplit

import pycurl

from engine.config import FetchOptions
from engine.refs import SourceRef
from engine.sources.cache import HEADER_BYTES, CacheRead, DownloadCache
from engine.sources.fetch import Fetched, FetchFailure

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
LARGE_BODY_BYTES, LARGE_BODIES_AT_ONCE = 1 << 20, 4  # see _Job.on_body
FIRST_SIZES = 4  # bodies whose mean replaces the size guess (2 MiB)
READ_BUFFER = 512 << 10  # libcurl hands over at most this much per write callback
IDLE_CONNECTION_SECONDS = 15  # kept-alive connections older than this are not reused
_DOWNLOADED = [0]  # bytes received over HTTP by this process, for the progress bar
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"  # kept as they are when a URL is quoted for the wire


def downloaded_bytes() -> int:
    """Bytes this process has received over HTTP so far."""
    return _DOWNLOADED[0]


class _Retry:
    __slots__ = ("reason", "after")

    def __init__(self, reason: str, after: float | None = None):
        self.reason, self.after = reason, after


class _ByteGate:
    """Lets requests start, first come first served, while the bytes held stay under the limit.
    The bytes held are the bodies that arrived and are not yet released, plus each started
    request's share at the running mean of body sizes: so the first bodies' sizes correct at
    once every reservation made at the first guess. Used on the loop thread only."""

    def __init__(self, limit: int):
        self.limit, self.bodies, self.pending, self.num_sizes, self._first = limit, 0, 0, 0, 0
        # a guess until bodies arrive: high, so large images do not flood the buffer at first
        self.mean = 2 << 20
        self._waiters: deque[Callable[[], None]] = deque()

    @property
    def held(self) -> float:
        return self.bodies + self.pending * self.mean

    def acquire(self, start: Callable[[], None]) -> None:
        """Call ``start`` once the request has its share: now, or when room comes."""
        if self._waiters or self.held >= self.limit:
            self._waiters.append(start)
            return
        self.pending += 1
        start()

    def forget(self, start: Callable[[], None]) -> bool:
        """Take a waiting request out of the line; False when it was let in already."""
        try:
            self._waiters.remove(start)
        except ValueError:
            return False
        return True

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def arrived(self, size: int) -> None:
        """A started request's body (``size`` bytes, 0 for a failure) is in: held until released."""
        self.pending -= 1
        self.bodies += size
        self._wake()

    def release(self, size: int) -> None:
        self.bodies -= size
        self._wake()

    def note_size(self, size: int) -> None:
        # the guess until a few bodies came, then their mean, then a running mean over about the last 16
        self.num_sizes += 1
        if self.num_sizes <= FIRST_SIZES:
            self._first += size
            if self.num_sizes == FIRST_SIZES:
                self.mean = self._first / FIRST_SIZES
                self._wake()
            return
        self.mean += (size - self.mean) / min(self.num_sizes, 16)

    def _wake(self) -> None:
        # every waiter that fits is let in at once, its share reserved before the next is weighed
        while self._waiters and self.held < self.limit:
            start = self._waiters.popleft()
            self.pending += 1
            start()


class _Job:
    """One image: its future, its outcome so far, and the current attempt's transfer."""

    __slots__ = (
        "url",
        "wire",
        "host",
        "speculative",
        "cached",
        "future",
        "fetched",
        "reserved",
        "deadline",
        "attempts",
        "last",
        "handle",
        "chunks",
        "size",
        "status",
        "reason",
        "declared",
        "retry_after",
        "failure",
        "progress",
        "large",
        "paused",
        "done",
        "admit",
        "__weakref__",
    )

    def __init__(self, url: str, speculative: bool, cached: str | None):
        self.url, self.speculative, self.cached = url, speculative, cached
        self.future: Future = Future()
        self.fetched = Fetched(None, cache=cached)
        self.reserved = self.large = self.paused = self.done = False
        self.deadline: float | None = None
        self.attempts, self.last = 0, "no attempt made"
        self.handle = None
        self.wire = self.host = ""
        self.failure: FetchFailure | None = None
        self.admit: Callable[[], None] | None = None


class HttpClient:
    """One per process and set of options (see ``engine.sources.fetch``); thread-safe."""

    def __init__(self, opts: FetchOptions, max_bytes: int, cache: DownloadCache | None = None):
        self._opts, self._max_bytes, self._cache = opts, max_bytes, cache
        self._cache_warned = False
        self._gate = _ByteGate(opts.buffer_bytes)
        self._commands: deque = deque()
        self._woken = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.in_flight = self.max_in_flight = 0
        self.max_large_at_once = 0  # the most large bodies read at once from one host
        self._thread = threading.Thread(target=self._run, name="engine-http", daemon=True)
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------

    def submit(self, url: str, speculative: bool = False, cached: str | None = None) -> Future:
        """Fetch ``url``; the future's result is a :class:`Fetched`. Cancelling it stops the request.
        A speculative fetch (a row this process will probably need soon) does not wait for room
        in the buffer, nor counts in it: the caller bounds how many it starts. ``cached`` is what
        the caller found in a local download cache (``miss`` or ``corrupt``): not looked up again."""
        job = _Job(url, speculative, cached)
        ref = weakref.ref(job)
        job.future.add_done_callback(lambda f: f.cancelled() and self._post(("cancel", ref)))
        self._post(("get", job))
        return job.future

    @property
    def mean_body_bytes(self) -> float:
        """The running mean size of the bodies fetched so far (a guess before the first)."""
        return self._gate.mean

    def has_room(self) -> bool:
        """Whether the buffer is less than half full (read from any thread; a hint)."""
        return self._gate.held < self._gate.limit // 2 and not self._gate.waiting

    def _post(self, command) -> None:
        # safe from finalizers and from the loop thread itself: a deque append and one byte
        self._commands.append(command)
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"\0")

    def _release_later(self, n: int) -> None:
        self._post(("release", n))

    # -- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        opts = self._opts
        self._multi = multi = pycurl.CurlMulti()
        multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, opts.concurrency)
        multi.setopt(pycurl.M_MAXCONNECTS, opts.concurrency)
        if opts.max_per_host:
            multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, opts.max_per_host)
        multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._curl_due: float | None = None
        self._timers: list = []  # (when, seq, callback): retry pauses, per-host pacing
        self._seq = itertools.count()
        self._ready: deque[_Job] = deque()  # waiting for a slot, in order
        self._per_host: dict[str, int] = {}  # transfers in flight per host
        self._active: dict[object, _Job] = {}  # curl handle -> job
        self._free: list = []  # curl handles to reuse
        self._next_start: dict[str, float] = {}
        self._large: dict[str, list] = {}  # host: [bodies reading, jobs waiting to read]
        self._host_env: dict[tuple[str, str], tuple] = {}
        self._netrc = _netrc()
        self._cainfo = _cainfo()
        self._pool: ThreadPoolExecutor | None = None
        self._next_sweep = time.monotonic() + self._sweep_every()
        while True:
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - a bug here must not hang every row: log, go on
                log.exception("HTTP loop")

    def _turn(self) -> None:
        now = time.monotonic()
        due = [t for t in (self._curl_due, self._timers[0][0] if self._timers else None) if t is not None]
        due.append(self._next_sweep)
        events = self._selector.select(max(0.0, min(due) - now))
        multi = self._multi
        for key, mask in events:
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue
            flags = (pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0) | (
                pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0
            )
            multi.socket_action(key.fd, flags)
        now = time.monotonic()
        if self._curl_due is not None and now >= self._curl_due:
            self._curl_due = None
            multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        self._woken = False
        while self._commands:
            self._command(self._commands.popleft())
        self._collect()
        while self._timers and self._timers[0][0] <= now:
            heapq.heappop(self._timers)[2]()
        if now >= self._next_sweep:
            self._sweep(now)
        self._start_ready()

    def _on_socket(self, what: int, fd: int, multi, socketp) -> None:
        sel = self._selector
        events = (selectors.EVENT_READ if what in (pycurl.POLL_IN, pycurl.POLL_INOUT) else 0) | (
            selectors.EVENT_WRITE if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT) else 0
        )
        if not events:  # POLL_REMOVE, or POLL_NONE: watched for nothing now
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(fd)
            return
        try:
            sel.modify(fd, events, fd)
        except KeyError:
            sel.register(fd, events, fd)

    def _on_timer(self, ms: int) -> None:
        self._curl_due = None if ms < 0 else time.monotonic() + ms / 1000

    def _later(self, seconds: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._seq), callback))

    def _command(self, command) -> None:
        kind = command[0]
        if kind == "get":
            self._admit(command[1])
        elif kind == "release":
            self._gate.release(command[1])
        elif kind == "cancel":
            job = command[1]()
            if job is not None:
                self._cancel(job)
        elif kind == "call":
            command[1]()

    def _admit(self, job: _Job) -> None:
        """A new job: its share of the buffer, then the cache, then a slot."""
        if job.future.cancelled():
            return
        if job.speculative:
            if self._cache_first(job):
                self._looked_up(job)
            return

        def admit() -> None:
            job.reserved = True
            if self._cache_first(job):
                self._looked_up(job)

        job.admit = admit
        self._gate.acquire(admit)

    def _cache_first(self, job: _Job) -> bool:
        """True to go on to the request now; else the cache is read in a thread, which goes on."""
        if self._cache is None or job.cached is not None:
            return True
        self._io_pool().submit(self._lookup, job)
        return False

    def _lookup(self, job: _Job) -> None:
        found = self._cache_get(job.url)
        self._post(("call", lambda: self._found(job, found)))

    def _found(self, job: _Job, found: CacheRead) -> None:
        fetched = job.fetched
        if found.data is not None:
            fetched.data, fetched.cache, fetched.num_cache_bytes = found.data, "hit", found.size
            self._complete(job, found.data)
            return
        fetched.cache = "corrupt" if found.corrupt else "miss"
        self._looked_up(job)

    def _looked_up(self, job: _Job) -> None:
        if job.done:
            return
        try:
            parts = urlsplit(job.url)
            job.host = parts.netloc
            job.wire = _wire_url(parts)
            job.wire.encode("ascii")
        except (ValueError, UnicodeError) as exc:
            self._finish(job, FetchFailure(f"InvalidURL: {_short(str(exc))}: {job.url}"))
            return
        self._pace(job)

    def _pace(self, job: _Job) -> None:
        """At most ``max_rps_per_host`` requests start per second on one host."""
        rate = self._opts.max_rps_per_host
        if rate > 0:
            now = time.monotonic()
            start = max(now, self._next_start.get(job.host, now))
            self._next_start[job.host] = start + 1.0 / rate
            if start > now:
                self._later(start - now, lambda: self._queue(job))
                return
        self._queue(job)

    def _queue(self, job: _Job) -> None:
        if not job.done:
            self._ready.append(job)

    def _start_ready(self) -> None:
        limit, per_host = self._opts.concurrency, self._opts.max_per_host
        ready = self._ready
        while ready and self.in_flight < limit:
            if not per_host:
                job = ready.popleft()
            else:  # the oldest job whose host has a free connection
                job = next((j for j in ready if self._per_host.get(j.host, 0) < per_host), None)
                if job is None:
                    return
                ready.remove(job)
            if not job.done:
                try:
                    self._attempt(job)
                except (
                    pycurl.error,
                    ValueError,
                    TypeError,
                    UnicodeError,
                ) as exc:  # an option libcurl refused
                    self._abandon(job)
                    self._finish(job, FetchFailure(f"{type(exc).__name__}: {_short(str(exc))}: {job.url}"))

    def _attempt(self, job: _Job) -> None:
        opts, now = self._opts, time.monotonic()
        if job.deadline is None:  # the clock starts once the request may go
            job.deadline = now + opts.total_timeout
        remaining = job.deadline - now
        if remaining <= 0:
            self._finish(job, self._timed_out(job))
            return
        job.attempts += 1
        job.fetched.num_requests += 1
        job.chunks, job.size, job.status, job.reason = [], 0, 0, ""
        job.declared = job.retry_after = None
        job.progress = now
        c = self._free.pop() if self._free else pycurl.Curl()
        job.handle = c
        c.reset()
        c.setopt(pycurl.URL, job.wire)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.FOLLOWLOCATION, 1)
        c.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.TIMEOUT_MS, max(1, int(remaining * 1000)))
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(opts.timeout * 1000)))
        c.setopt(pycurl.USERAGENT, opts.user_agent)
        c.setopt(pycurl.ACCEPT_ENCODING, "")  # whatever libcurl decodes; images are sent as they are
        c.setopt(pycurl.BUFFERSIZE, READ_BUFFER)
        c.setopt(pycurl.MAXAGE_CONN, IDLE_CONNECTION_SECONDS)
        if self._cainfo:
            c.setopt(pycurl.CAINFO, self._cainfo)
        if job.attempts > 1:  # after a broken answer, not on a kept-alive connection that may hold its rest
            c.setopt(pycurl.FRESH_CONNECT, 1)
        proxy, auth = self._env_for(job.url)
        c.setopt(pycurl.PROXY, proxy)  # "" turns libcurl's own lookup off: looked up here once per host
        if auth is not None:
            c.setopt(pycurl.HTTPAUTH, pycurl.HTTPAUTH_BASIC)
            c.setopt(pycurl.USERPWD, auth)
        c.setopt(pycurl.HEADERFUNCTION, lambda line: self._on_header(job, line))
        c.setopt(pycurl.WRITEFUNCTION, lambda chunk: self._on_body(job, chunk))
        self._active[c] = job
        self._per_host[job.host] = self._per_host.get(job.host, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._multi.add_handle(c)

    def _abandon(self, job: _Job) -> None:
        """Undo a transfer ``_attempt`` set up but could not start."""
        if job.handle is not None:
            self._end_transfer(job.handle)
            job.handle = None

    def _on_header(self, job: _Job, line: bytes) -> None:
        job.progress = time.monotonic()
        if line.startswith(b"HTTP/"):  # a new response (after a redirect, or a 100 Continue)
            parts = line.decode("latin-1").split(None, 2)
            job.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            job.reason = parts[2].strip() if len(parts) > 2 else ""
            job.declared = job.retry_after = None
            return
        name, sep, value = line.partition(b":")
        if not sep:
            return
        name = name.strip().lower()
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                job.declared = int(value.strip())
        elif name == b"retry-after":
            job.retry_after = value.decode("latin-1").strip()

    def _on_body(self, job: _Job, chunk: bytes):
        job.progress = time.monotonic()
        if not job.chunks and not job.large:
            declared = job.declared
            if declared is not None and declared > self._max_bytes and job.status < 300:
                job.failure = self._too_big(declared)
                return 0  # stops the transfer
            if declared is not None and declared >= LARGE_BODY_BYTES and job.status < 300:
                # large bodies are read a few at a time per host, in the order their answers
                # came, so the first photos arrive whole first instead of all sharing the link
                gate = self._large.setdefault(job.host, [0, deque()])
                if gate[0] >= LARGE_BODIES_AT_ONCE:
                    if not job.paused:
                        job.paused = True
                        gate[1].append(job)
                    return pycurl.WRITEFUNC_PAUSE
                gate[0] += 1
                job.large, job.paused = True, False
                self.max_large_at_once = max(self.max_large_at_once, gate[0])
        n = len(chunk)
        job.size += n
        job.fetched.num_bytes_downloaded += n
        _DOWNLOADED[0] += n
        if job.size > self._max_bytes:
            job.failure = self._too_big(job.size)
            return 0
        job.chunks.append(chunk)
        return None

    def _collect(self) -> None:
        multi = self._multi
        while True:
            queued, ok, failed = multi.info_read()
            for c in ok:
                self._ended(c, None, "")
            for c, code, message in failed:
                self._ended(c, code, message)
            if not queued:
                return

    def _ended(self, c, code: int | None, message: str) -> None:
        job = self._end_transfer(c)
        if job is None or job.done:
            return
        outcome = self._outcome(job, c, code, message)
        if isinstance(outcome, _Retry):
            self._retry_or_fail(job, outcome)
        else:
            self._finish(job, outcome)

    def _end_transfer(self, c) -> _Job | None:
        """The attempt on handle ``c`` is over, however it ended: the handle goes back to the
        pool, its slot to the next job, a large body's turn to the next one on its host.
        Returns the job it was for (None for a handle never started)."""
        job = self._active.pop(c, None)
        with contextlib.suppress(pycurl.error):
            self._multi.remove_handle(c)
        c.setopt(pycurl.HEADERFUNCTION, _ignore)  # the callbacks hold the job
        c.setopt(pycurl.WRITEFUNCTION, _ignore)
        self._free.append(c)
        if job is not None:
            self.in_flight -= 1
            left = self._per_host.get(job.host, 1) - 1
            if left:
                self._per_host[job.host] = left
            else:
                self._per_host.pop(job.host, None)
            job.handle = None
            self._finish_large(job)
        return job

    def _outcome(self, job: _Job, c, code: int | None, message: str):
        """The attempt's result: bytes, a FetchFailure, or a _Retry."""
        url, opts = job.url, self._opts
        if job.failure is not None:  # stopped here: too big
            return job.failure
        if code is None:
            status = job.status or c.getinfo(pycurl.RESPONSE_CODE)
            if status in RETRY_STATUS:
                after = _retry_after(job.retry_after) if status in (429, 503) else None
                return _Retry(self._status_line(job, status), after)
            if status >= 300:
                return FetchFailure(f"{self._status_line(job, status)}: {url}")
            return b"".join(job.chunks)
        if code == pycurl.E_OPERATION_TIMEDOUT:
            if time.monotonic() >= job.deadline - 0.05:
                return self._timed_out(job)
            return _Retry(f"Timeout: no answer within {opts.timeout:g} s ({message})")
        if code == pycurl.E_TOO_MANY_REDIRECTS:
            return FetchFailure(f"too many redirects (more than {MAX_REDIRECTS}): {url}")
        if code == pycurl.E_PARTIAL_FILE:
            return _Retry(f"body cut short: {_short(message)}")
        if code in _FAILURES:
            return FetchFailure(f"{_FAILURES[code]}: {_short(message)}: {url}")
        return _Retry(f"ConnectionError: {_short(message)}")

    def _status_line(self, job: _Job, status: int) -> str:
        return f"HTTP {status} {job.reason}" if job.reason else f"HTTP {status}"

    def _timed_out(self, job: _Job) -> FetchFailure:
        return FetchFailure(
            f"timed out after {self._opts.total_timeout:g} s (--http-total-timeout), "
            f"{job.attempts} attempt(s): {job.url}"
        )

    def _gave_up(self, job: _Job) -> FetchFailure:
        return FetchFailure(f"gave up after {job.attempts} attempt(s) ({job.last}): {job.url}")

    def _sweep_every(self) -> float:
        return min(1.0, max(0.05, self._opts.timeout / 4))

    def _sweep(self, now: float) -> None:
        """A transfer that received nothing for ``timeout`` (waiting for an answer, or for the
        next bytes) ends its attempt, as a retry."""
        self._next_sweep = now + self._sweep_every()
        limit = self._opts.timeout
        for c, job in list(self._active.items()):
            if not job.paused and now - job.progress > limit:
                self._end_transfer(c)
                self._retry_or_fail(job, _Retry(f"Timeout: no answer within {limit:g} s"))

    def _retry_or_fail(self, job: _Job, outcome: _Retry) -> None:
        """Another attempt after a pause (the server's Retry-After, or a backoff), while the
        retries and the total bound allow; else the row's failure, with the last reason."""
        opts = self._opts
        job.last = outcome.reason
        if job.attempts > opts.retries:
            self._finish(job, self._gave_up(job))
            return
        pause = outcome.after if outcome.after is not None else min(0.25 * 2 ** (job.attempts - 1), 4.0)
        if time.monotonic() + pause >= job.deadline:
            if outcome.after is not None:
                job.last += (
                    f"; it asked to retry after {outcome.after:g} s, past the {opts.total_timeout:g} s bound"
                )
            self._finish(job, self._gave_up(job))
            return
        self._later(pause, lambda: self._pace(job))

    def _finish_large(self, job: _Job) -> None:
        """A large body's turn is over (read, failed or given up): the next one on its host reads."""
        gate = self._large.get(job.host)
        if gate is None:
            return
        if job.paused:
            job.paused = False
            with contextlib.suppress(ValueError):
                gate[1].remove(job)
        elif job.large:
            job.large = False
            gate[0] -= 1
            while gate[1] and gate[0] < LARGE_BODIES_AT_ONCE:
                nxt = gate[1].popleft()
                if nxt.handle is None or nxt.done:
                    continue
                gate[0] += 1
                nxt.large, nxt.paused, nxt.progress = True, False, time.monotonic()
                self.max_large_at_once = max(self.max_large_at_once, gate[0])
                with contextlib.suppress(pycurl.error):
                    nxt.handle.pause(pycurl.PAUSE_CONT)
        if not gate[0] and not gate[1]:  # no host's gate outlives its bodies
            del self._large[job.host]

    def _finish(self, job: _Job, data) -> None:
        """The job's outcome is known: keep it in the cache when there is one, then hand it over."""
        job.chunks = None
        fetched = job.fetched
        if isinstance(data, bytes):
            self._gate.note_size(len(data))
            if self._cache is not None:
                fetched.data = data
                self._io_pool().submit(self._store, job)
                return
        self._complete(job, data)

    def _store(self, job: _Job) -> None:
        self._cache_put(job.url, job.fetched)
        self._post(("call", lambda: self._complete(job, job.fetched.data)))

    def _complete(self, job: _Job, data) -> None:
        if job.done:
            return
        job.done = True
        fetched = job.fetched
        fetched.data = data
        size = len(data) if isinstance(data, bytes) else 0
        if job.reserved:
            job.reserved = False
            self._gate.arrived(size)
            if size:
                fetched.hold = weakref.finalize(fetched, self._release_later, size)
        if job.future.set_running_or_notify_cancel():
            job.future.set_result(fetched)
        elif fetched.hold is not None:  # cancelled meanwhile: nobody will take it
            fetched.hold.detach()
            fetched.hold = None
            self._gate.release(size)

    def _cancel(self, job: _Job) -> None:
        if job.done:
            return
        job.done = True
        if job.handle is not None:  # in a transfer (a paused one too)
            self._end_transfer(job.handle)
        with contextlib.suppress(ValueError):
            self._ready.remove(job)
        if job.admit is not None and self._gate.forget(job.admit):
            return  # it never had its share
        if job.reserved:
            job.reserved = False
            self._gate.arrived(0)

    def _io_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self._opts.io_threads, thread_name_prefix="http-cache"
            )
        return self._pool

    def _cache_get(self, url: str) -> CacheRead:
        try:
            return self._cache.get(url)
        except Exception as exc:  # noqa: BLE001 - an unreadable cache is a miss, never a lost row
            self._warn_cache(exc)
            return CacheRead(None)

    def _cache_put(self, url: str, fetched: Fetched) -> None:
        """Keep the body; in a local folder, the row's bytes are then also where the entry is
        (``origin``), so a part file may reference them as it does a local file's."""
        data = fetched.data
        try:
            path = self._cache.local_entry(url)
            if path is None:
                fetched.num_cache_bytes = self._cache.put(url, data)
                return
            # an entry found sound meanwhile (another run's) is kept: a part may reference it
            fetched.num_cache_bytes, mtime_ns = self._cache.put_local(
                url, data, replace=fetched.cache != "miss"
            )
            if mtime_ns is not None:
                fetched.origin = SourceRef(path, len(data), mtime_ns, HEADER_BYTES)
        except Exception as exc:  # noqa: BLE001 - the row has its bytes; only the next run loses them
            self._warn_cache(exc)

    def _warn_cache(self, exc: Exception) -> None:
        if not self._cache_warned:
            self._cache_warned = True
            log.warning(
                "download cache %s: %s: %s (rows are fetched without it)",
                self._cache.root,
                type(exc).__name__,
                exc,
            )

    def _too_big(self, size: int) -> FetchFailure:
        return FetchFailure(f"image is {size:,} bytes, over the limit of {self._max_bytes:,}")

    def _env_for(self, url: str) -> tuple[str, str | None]:
        """The proxy (HTTP(S)_PROXY, NO_PROXY) and .netrc credentials for ``url``'s host, looked
        up once per host: ("", None) when neither applies."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        found = self._host_env.get(key)
        if found is None:
            host, proxy = parts.hostname or "", ""
            if any(name.lower().endswith("_proxy") for name in os.environ):  # urllib.request: 20 ms
                import urllib.request

                proxies = urllib.request.getproxies_environment()
                proxy = proxies.get(parts.scheme) or ""
                if proxy and urllib.request.proxy_bypass_environment(host, proxies):
                    proxy = ""
            auth = None
            if self._netrc is not None and host and parts.username is None:
                with contextlib.suppress(LookupError, TypeError):
                    login, _, password = self._netrc.authenticators(host)
                    auth = f"{login}:{password}"
            found = self._host_env[key] = (proxy, auth)
        return found


# libcurl's errors that no retry can mend, by the name the reason gives them
_FAILURES = {
    pycurl.E_UNSUPPORTED_PROTOCOL: "InvalidURL",
    pycurl.E_URL_MALFORMAT: "InvalidURL",
    pycurl.E_BAD_CONTENT_ENCODING: "ContentEncodingError",
    pycurl.E_FILESIZE_EXCEEDED: "TooLarge",
    pycurl.E_PEER_FAILED_VERIFICATION: "SSLCertVerificationError",
}


def _ignore(data: bytes) -> None:
    return None


def _wire_url(parts) -> str:
    """``url`` as it goes on the wire: the host in IDNA, spaces and other characters that a URL
    may not hold percent-encoded (existing escapes are kept, as browsers do)."""
    netloc = parts.netloc
    host = parts.hostname or ""
    if host and not host.isascii():
        with contextlib.suppress(UnicodeError):
            netloc = netloc.replace(host, host.encode("idna").decode("ascii"))
    return urlunsplit(
        (
            parts.scheme,
            netloc,
            quote(parts.path, safe=_URL_SAFE),
            quote(parts.query, safe=_URL_SAFE),
            "",
        )
    )


def _netrc():
    """The user's .netrc (NETRC, else ~/.netrc), or None."""
    import netrc

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path) if os.path.isfile(path) else None
    except (netrc.NetrcParseError, OSError) as exc:
        log.warning("could not read %s: %s", path, exc)
        return None


def _cainfo() -> str | None:
    """Certificates from certifi when it is installed (as requests did), else libcurl's own."""
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(text: str) -> str:
    return text if len(text) < 200 else text[:200] + "…"

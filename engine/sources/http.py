"""HTTP(S) fetching on one asyncio event loop per process (aiohttp), shared by its threads.

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
bench/GAP.md says why this is an event loop rather than a larger thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from urllib.parse import urlsplit

from engine.config import FetchOptions
from engine.refs import SourceRef
from engine.sources.cache import HEADER_BYTES, CacheRead, DownloadCache
from engine.sources.fetch import Fetched, FetchFailure

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
LARGE_BODY_BYTES, LARGE_BODIES_AT_ONCE = 1 << 20, 4  # see _attempt
FIRST_SIZES = 4  # bodies whose mean replaces the size guess (2 MiB)
_DOWNLOADED = [0]  # bytes received over HTTP by this process, for the progress bar


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
    once every reservation made at the first guess."""

    def __init__(self, limit: int):
        self.limit, self.bodies, self.pending, self.num_sizes, self._first = limit, 0, 0, 0, 0
        # a guess until bodies arrive: high, so large images do not flood the buffer at first
        self.mean = 2 << 20
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def held(self) -> float:
        return self.bodies + self.pending * self.mean

    async def acquire(self) -> None:
        if self._waiters or self.held >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.arrived(0)  # it was let in, and reserved for: give the share back
                else:
                    with contextlib.suppress(ValueError):  # _wake may have dropped it already
                        self._waiters.remove(waiter)
                raise
            return  # _wake reserved its share
        self.pending += 1

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
            return
        self.mean += (size - self.mean) / min(self.num_sizes, 16)

    def _wake(self) -> None:
        # every waiter that fits is let in at once, its share reserved here: waking one at a time
        # would take one pass of the event loop per request
        while self._waiters and self.held < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.pending += 1
                waiter.set_result(None)


class HttpClient:
    """One per process and set of options (see ``engine.sources.fetch``); thread-safe."""

    def __init__(self, opts: FetchOptions, max_bytes: int, cache: DownloadCache | None = None):
        self._opts, self._max_bytes, self._cache = opts, max_bytes, cache
        self._cache_warned = False
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-http", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._setup())
        self._ready.set()
        self._loop.run_forever()

    async def _setup(self) -> None:
        import aiohttp

        opts = self._opts
        self._aiohttp = aiohttp
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=opts.concurrency,
                limit_per_host=opts.max_per_host,
                ttl_dns_cache=300,
                ssl=_ssl_context(),
            ),
            headers={"User-Agent": opts.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            # proxies and .netrc are read once per host (_env_for), not per request as trust_env does
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=opts.timeout, sock_read=opts.timeout),
        )
        if hasattr(self._session, "_retry_connection"):
            # aiohttp resends a GET once after any disconnect; the attempts here are counted and
            # bounded by --http-retries (idle connections close after 15 s, before servers drop them)
            self._session._retry_connection = False
        self._slots = asyncio.Semaphore(opts.concurrency)
        self._gate = _ByteGate(opts.buffer_bytes)
        self._next_start: dict[str, float] = {}
        self._large: dict[str, list] = {}  # host: [its large-body gate, bodies using it]
        self._netrc = _netrc()
        self._host_env: dict[tuple[str, str], dict] = {}
        self.in_flight = self.max_in_flight = 0

    def submit(self, url: str, speculative: bool = False, cached: str | None = None) -> Future:
        """Fetch ``url``; the future's result is a :class:`Fetched`. Cancelling it stops the request.
        A speculative fetch (a row this process will probably need soon) does not wait for room
        in the buffer, nor counts in it: the caller bounds how many it starts. ``cached`` is what
        the caller found in a local download cache (``miss`` or ``corrupt``): not looked up again."""
        return asyncio.run_coroutine_threadsafe(self._fetch(url, speculative, cached), self._loop)

    @property
    def mean_body_bytes(self) -> float:
        """The running mean size of the bodies fetched so far (a guess before the first)."""
        return self._gate.mean

    def has_room(self) -> bool:
        """Whether the buffer is less than half full (read from any thread; a hint)."""
        return self._gate.held < self._gate.limit // 2 and not self._gate.waiting

    def _release_later(self, n: int) -> None:
        try:
            self._loop.call_soon_threadsafe(self._gate.release, n)
        except RuntimeError:  # the loop is gone (interpreter exit)
            pass

    def _hold(self, fetched: Fetched, size: int) -> Fetched:
        if size:
            fetched.hold = weakref.finalize(fetched, self._release_later, size)
        return fetched

    async def _fetch(self, url: str, speculative: bool, cached: str | None = None) -> Fetched:
        # look-ahead fetches stay out of the buffer (their number is capped instead), so the rows
        # units wait for never wait behind rows no unit has asked for yet
        reserved = not speculative
        if reserved:
            await self._gate.acquire()
        try:
            fetched = Fetched(None, cache=cached)
            if self._cache is not None and cached is None:
                found = await self._loop.run_in_executor(None, self._cache_get, url)
                if found.data is not None:
                    fetched.data, fetched.cache, fetched.num_cache_bytes = found.data, "hit", found.size
                else:
                    fetched.cache = "corrupt" if found.corrupt else "miss"
            if fetched.data is None:
                fetched.data = await self._download(url, fetched)
                if isinstance(fetched.data, bytes):
                    self._gate.note_size(len(fetched.data))
                    if self._cache is not None:
                        await self._loop.run_in_executor(None, self._cache_put, url, fetched)
            if speculative:
                return fetched
            size = len(fetched.data) if isinstance(fetched.data, bytes) else 0
            reserved = False
            self._gate.arrived(size)
            return self._hold(fetched, size)
        except BaseException:
            if reserved:
                self._gate.arrived(0)
            raise

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

    async def _pace(self, host: str) -> None:
        """At most ``max_rps_per_host`` requests start per second on one host."""
        rate = self._opts.max_rps_per_host
        if rate <= 0:
            return
        now = self._loop.time()
        start = max(now, self._next_start.get(host, now))
        self._next_start[host] = start + 1.0 / rate
        if start > now:
            await asyncio.sleep(start - now)

    async def _download(self, url: str, fetched: Fetched):
        """GET with retries: connection errors and retryable statuses are retried with exponential
        backoff, or after the server's Retry-After on 429 and 503, all within the total bound."""
        opts, loop = self._opts, self._loop
        host = urlsplit(url).netloc
        deadline: float | None = None
        last, attempts, pause = "no attempt made", 0, 0.0
        outcome = None  # the previous attempt's, read before a retry
        for attempt in range(opts.retries + 1):
            if attempt:
                if loop.time() + pause >= deadline:
                    if isinstance(outcome, _Retry) and outcome.after is not None:
                        last += (
                            f"; it asked to retry after {outcome.after:g} s, "
                            f"past the {opts.total_timeout:g} s bound"
                        )
                    break
                await asyncio.sleep(pause)
            await self._pace(host)
            async with self._slots:
                if deadline is None:  # the clock starts once the request may go
                    deadline = loop.time() + opts.total_timeout
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                attempts += 1
                fetched.num_requests += 1
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    async with asyncio.timeout(remaining):  # no task of its own, as wait_for makes
                        outcome = await self._attempt(url, fetched)
                except TimeoutError:
                    return FetchFailure(
                        f"timed out after {opts.total_timeout:g} s (--http-total-timeout), "
                        f"{attempts} attempt(s): {url}"
                    )
                finally:
                    self.in_flight -= 1
            if not isinstance(outcome, _Retry):
                return outcome
            last = outcome.reason
            pause = outcome.after if outcome.after is not None else min(0.25 * 2**attempt, 4.0)
        return FetchFailure(f"gave up after {attempts} attempt(s) ({last}): {url}")

    async def _attempt(self, url: str, fetched: Fetched):
        aiohttp = self._aiohttp
        try:
            # aiohttp raises on reaching max_redirects hops, so one more lets the fifth be followed
            async with self._session.get(url, max_redirects=MAX_REDIRECTS + 1, **self._env_for(url)) as resp:
                status = resp.status
                if status in RETRY_STATUS:
                    after = _retry_after(resp.headers.get("Retry-After")) if status in (429, 503) else None
                    return _Retry(_status_line(resp), after)
                if status >= 300:
                    return FetchFailure(f"{_status_line(resp)}: {url}")
                declared = resp.content_length
                if declared is not None and declared > self._max_bytes:
                    return self._too_big(declared)
                if declared is not None and declared >= LARGE_BODY_BYTES:
                    # large bodies are read a few at a time per host, in the order their answers
                    # came, so the first photos arrive whole first instead of all sharing the link
                    async with self._large_bodies(url):
                        return await self._read_body(resp, fetched)
                return await self._read_body(resp, fetched)
        except aiohttp.TooManyRedirects:
            return FetchFailure(f"too many redirects (more than {MAX_REDIRECTS}): {url}")
        except aiohttp.ClientPayloadError as exc:  # cut off mid-body, or fewer bytes than promised
            return _Retry(f"body cut short: {_short(exc)}")
        except (aiohttp.ServerTimeoutError, aiohttp.ConnectionTimeoutError) as exc:
            return _Retry(
                f"Timeout: no answer within {self._opts.timeout:g} s ({_short(exc) or type(exc).__name__})"
            )
        except aiohttp.ClientConnectionError as exc:
            return _Retry(f"ConnectionError: {_short(exc) or type(exc).__name__}")
        except (aiohttp.ClientError, ValueError) as exc:  # a bad URL or a malformed answer
            return FetchFailure(f"{type(exc).__name__}: {_short(exc)}: {url}")

    async def _read_body(self, resp, fetched: Fetched):
        chunks, size = [], 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            fetched.num_bytes_downloaded += len(chunk)
            _DOWNLOADED[0] += len(chunk)
            if size > self._max_bytes:
                return self._too_big(size)
            chunks.append(chunk)
        return b"".join(chunks)

    @contextlib.asynccontextmanager
    async def _large_bodies(self, url: str):
        host = urlsplit(url).netloc
        gate = self._large.get(host)
        if gate is None:
            gate = self._large[host] = [asyncio.Semaphore(LARGE_BODIES_AT_ONCE), 0]
        gate[1] += 1
        try:
            async with gate[0]:
                yield
        finally:
            gate[1] -= 1
            if not gate[1]:  # no host's gate outlives its bodies (a manifest may name many hosts)
                del self._large[host]

    def _too_big(self, size: int):
        return FetchFailure(f"image is {size:,} bytes, over the limit of {self._max_bytes:,}")

    def _env_for(self, url: str) -> dict:
        """The proxy (HTTP(S)_PROXY, NO_PROXY) and .netrc credentials for ``url``'s host, as
        aiohttp's ``trust_env`` finds them, looked up once per host: ``trust_env`` looks them up
        on every request, in two hops through the executor threads (bench/GAP.md)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        found = self._host_env.get(key)
        if found is None:
            from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url
            from yarl import URL

            found = {}
            try:
                target = URL(url)
                with contextlib.suppress(LookupError):
                    found["proxy"], found["proxy_auth"] = get_env_proxy_for_url(target)
                if self._netrc is not None and target.host and target.user is None:
                    with contextlib.suppress(LookupError):
                        found["headers"] = {
                            "Authorization": basicauth_from_netrc(self._netrc, target.host).encode()
                        }
            except ValueError:  # a malformed URL: the request itself says so
                pass
            self._host_env[key] = found
        return found


def _netrc():
    """The user's .netrc (NETRC or ~/.netrc) as aiohttp reads it, or None."""
    from aiohttp.helpers import netrc_from_env

    return netrc_from_env()


def _ssl_context():
    """Certificates from certifi when it is installed (as requests did), else the system's."""
    import ssl

    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


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


def _status_line(resp) -> str:
    return f"HTTP {resp.status} {resp.reason}" if resp.reason else f"HTTP {resp.status}"


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "…"

"""Fetching image bytes: local files, HTTP(S) (see :mod:`engine.sources.http`), fsspec URLs.

Every failure is returned as a :class:`FetchFailure` (stage ``fetch``), never raised.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from engine.config import FetchOptions
from engine.refs import SourceRef
from engine.sources.base import ImageInput, InlineImage
from engine.sources.location import local_path

# Local files are read inline while small and quick to read (handing a row to a thread costs
# more than reading it from the page cache); otherwise threads overlap reads with decoding.
# Figures: bench/GAP.md, "Inline local reads".
INLINE_LOCAL_READ_BYTES = 512 * 1024
SLOW_LOCAL_READ_SECONDS = 0.002
SPECULATIVE_SECONDS = 30.0  # a look-ahead fetch no unit has claimed by then is dropped
RECENT_URLS = 1 << 14  # URLs remembered as asked for by units, so look-ahead never fetches them again
LOOKAHEAD_SHARE = 4  # the look-ahead holds about buffer_bytes / this of bodies (bench/GAP.md)


@dataclass(frozen=True, slots=True)
class FetchFailure:
    reason: str


@dataclass
class Fetched:
    """One image's outcome and what it cost. Until :meth:`release` (or until it is dropped), its
    bytes count against the fetch buffer (``FetchOptions.buffer_bytes``)."""

    data: bytes | FetchFailure
    # where these bytes lie in a local file (the file itself, or a local download-cache entry),
    # as it was before the read, so a part file may reference them instead of copying them
    origin: SourceRef | None = None
    num_requests: int = 0
    num_bytes_downloaded: int = 0
    cache: str | None = None  # hit | miss | corrupt (a miss whose entry failed its check); None: no cache
    num_cache_bytes: int = 0  # size of the cache entry read or written
    hold: Callable[[], object] | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        if self.hold is not None:
            self.hold()


@dataclass(slots=True)
class FetchTally:
    """What fetching a unit's images cost (summed into stats.json's ``fetch``)."""

    num_requests: int = 0
    num_bytes_downloaded: int = 0
    num_cache_hits: int = 0
    num_cache_misses: int = 0
    num_cache_corrupt: int = 0
    num_cache_bytes: int = 0  # size of the cache entries read or written

    def add(self, fetched: Fetched) -> None:
        self.num_requests += fetched.num_requests
        self.num_bytes_downloaded += fetched.num_bytes_downloaded
        self.num_cache_bytes += fetched.num_cache_bytes
        if fetched.cache == "hit":
            self.num_cache_hits += 1
        elif fetched.cache is not None:
            self.num_cache_misses += 1
            self.num_cache_corrupt += fetched.cache == "corrupt"

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class Fetcher:
    """Reads image bytes. One per worker process and set of options; thread-safe.

    HTTP(S) goes through one libcurl loop per process (:mod:`engine.sources.http`), with the
    download cache when one is set; local files and other fsspec URLs are read in threads. A URL
    whose entry a local download cache holds is read like a local file (:meth:`reads_locally`)."""

    def __init__(self, opts: FetchOptions, max_bytes: int):
        self._opts = opts
        self._max_bytes = max_bytes
        self._http = None
        self._http_lock = threading.Lock()
        self._speculative: dict[str, tuple[float, Future]] = {}  # URL -> (when, fetch), oldest first
        self._recent: dict[str, None] = {}  # URLs units have asked for lately, oldest first
        self._pool: ThreadPoolExecutor | None = None
        self._cache = None  # the DownloadCache, made with the first URL
        self._cache_made = False
        self._cache_lock = threading.Lock()
        self._local_read_seconds = 0.0  # running means over the last ~64 local reads
        self._local_read_bytes = 0.0
        self._local_reads = 0

    @staticmethod
    def is_local(location: ImageInput) -> bool:
        """Read by :meth:`fetch` as a local file (every URL but ``file://`` is remote), or bytes
        the input holds (no I/O at all)."""
        return isinstance(location, InlineImage) or local_path(location) is not None

    @staticmethod
    def is_http(location: ImageInput) -> bool:
        return not isinstance(location, InlineImage) and location.startswith(("http://", "https://"))

    def reads_locally(self, location: ImageInput) -> bool:
        """:meth:`is_local`, or a URL whose bytes a local download cache holds (its entry is read
        in this process like a file, and checked there; a corrupt one is fetched again)."""
        return self.is_local(location) or (
            self.is_http(location) and self._cached_entry(location) is not None
        )

    def _download_cache(self):
        if not self._cache_made:
            with self._cache_lock:
                if not self._cache_made:
                    from engine.sources.cache import DownloadCache

                    self._cache = DownloadCache(self._opts.cache) if self._opts.cache else None
                    self._cache_made = True
        return self._cache

    def _local_cache(self):
        """The download cache when it is a local folder, else None."""
        cache = self._download_cache() if self._opts.cache else None
        return cache if cache is not None and cache.is_local else None

    def _cached_entry(self, url: str) -> str | None:
        """The local cache entry's path for ``url`` when one exists (not yet checked)."""
        cache = self._local_cache()
        path = cache.local_entry(url) if cache is not None else None
        return path if path is not None and os.path.exists(path) else None

    @property
    def inline_local_reads(self) -> bool:
        """Whether local files have been small and quick to read so far (assumed until measured)."""
        return (
            self._local_read_bytes < INLINE_LOCAL_READ_BYTES
            and self._local_read_seconds < SLOW_LOCAL_READ_SECONDS
        )

    def fetch(self, location: ImageInput) -> bytes | FetchFailure:
        fetched = self.read(location)
        fetched.release()
        return fetched.data

    def read(self, location: ImageInput) -> Fetched:
        """Fetch one image in this thread (waiting for an HTTP answer), with where its bytes lie
        when that is a local file (``origin``). An InlineImage's bytes pass through as they are
        (its size is checked like a file's). Call ``release`` on the result once it is taken."""
        if isinstance(location, InlineImage):
            data = location.data
            return Fetched(
                self._too_big(len(data)) if len(data) > self._max_bytes else data, origin=location.origin
            )
        if self.is_http(location):
            return self._start_http(location, inline=True).result()
        try:
            path = local_path(location)
            if path is not None:
                started = time.perf_counter()
                data, st = self._read_local(path)
                self._note_local_read(
                    time.perf_counter() - started, len(data) if isinstance(data, bytes) else 0
                )
                if st is None:
                    return Fetched(data)
                # the status of the open file, taken before the read: a file rewritten meanwhile
                # shows a newer mtime when its shard is written
                return Fetched(data, origin=SourceRef(os.path.abspath(path), st.st_size, st.st_mtime_ns))
            return Fetched(self._read_fsspec(location))
        except Exception as exc:  # noqa: BLE001 - any I/O problem is this row's failure
            return Fetched(FetchFailure(f"{type(exc).__name__}: {exc}"))

    def _read_cached(self, url: str, entry: str) -> Fetched:
        """``url`` from its local cache entry, read and checked here like a local file; an entry
        that fails its check (or is gone) is fetched again, and rewritten."""
        from engine.sources.cache import HEADER_BYTES, DownloadCache

        started = time.perf_counter()
        try:
            found, st = DownloadCache.read_local(entry, self._max_bytes)
        except OSError:  # unreadable: fetched again, and the entry rewritten if it can be
            found, st = None, None
        if found is not None and found.data is not None:
            self._note_local_read(time.perf_counter() - started, len(found.data))
            origin = SourceRef(entry, len(found.data), st.st_mtime_ns, HEADER_BYTES)
            return Fetched(found.data, cache="hit", num_cache_bytes=found.size, origin=origin)
        if found is not None and st is not None and not found.corrupt:  # sound length, over the limit
            return Fetched(self._too_big(found.size - HEADER_BYTES), cache="hit", num_cache_bytes=found.size)
        state = "corrupt" if found is not None and found.corrupt else "miss"
        return self._fetch_http(url, cached=state).result()

    def submit(self, location: ImageInput) -> Future:
        """Start fetching (or take over a speculative fetch of the same URL); the future's result
        is a :class:`Fetched`."""
        if isinstance(location, InlineImage):  # nothing to wait for
            return _done(self.read(location))
        if self.is_http(location):
            return self._start_http(location, inline=False)
        return self._io_pool().submit(self.read, location)

    def _start_http(self, url: str, inline: bool) -> Future:
        """Take over a look-ahead fetch of ``url``, or read its local cache entry (in this thread
        when ``inline``, else in the pool), or send the request."""
        claimed = self._claim(url)
        if claimed is not None:
            return claimed
        entry = self._cached_entry(url)
        if entry is None:
            return self._fetch_http(url)
        if inline:
            return _done(self._read_cached(url, entry))
        return self._io_pool().submit(self._read_cached, url, entry)

    def _claim(self, url: str) -> Future | None:
        """A look-ahead fetch of ``url`` taken over, if one was started; no look-ahead starts one now."""
        with self._http_lock:
            found = self._speculative.pop(url, None)
            self._recent[url] = None
            if len(self._recent) > RECENT_URLS:
                del self._recent[next(iter(self._recent))]
        return found[1] if found is not None else None

    def _fetch_http(self, url: str, cached: str | None = None) -> Future:
        # a local cache has been looked up already: a miss, unless the caller found the entry corrupt
        cached = cached or ("miss" if self._local_cache() is not None else None)
        return self._http_client().submit(url, cached=cached)

    def _io_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._http_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=self._opts.io_threads, thread_name_prefix="fetch"
                    )
        return self._pool

    def speculate(self, urls: Iterable[str], limit: int) -> int:
        """Start fetching up to ``limit`` of ``urls`` that this process will probably need soon
        (the rows after its unit: see ``engine.pipeline``), while the fetch buffer is less than
        half full; :meth:`submit` takes them over. At most about a quarter of the buffer's worth
        is held ahead; unclaimed ones are dropped after SPECULATIVE_SECONDS. Returns how many
        were started."""
        client = self._http_client()
        local_cache = self._local_cache() is not None
        now, started = time.monotonic(), 0
        cap = self._lookahead_cap(client)
        with self._http_lock:
            table = self._speculative
            while table and next(iter(table.values()))[0] < now - SPECULATIVE_SECONDS:
                table.pop(next(iter(table)))[1].cancel()
            urls = iter(urls)
            # checked before the next URL is drawn: a URL drawn is one the look-ahead has passed
            while started < limit and len(table) < cap and client.has_room():
                url = next(urls, None)
                if url is None:
                    break
                if url not in table and url not in self._recent:
                    if local_cache and self._cached_entry(url) is not None:
                        continue  # read from the cache like a local file, by its unit
                    cached = "miss" if local_cache else None
                    table[url] = (now, client.submit(url, speculative=True, cached=cached))
                    started += 1
        return started

    def lookahead_room(self) -> int:
        """How many look-ahead fetches :meth:`speculate` could start now (read without a lock: a hint)."""
        client = self._http
        if client is None or not client.has_room():
            return 0
        return self._lookahead_cap(client) - len(self._speculative)

    def _lookahead_cap(self, client) -> int:
        # rows ahead: enough to cover the latency at the local pace for small images; for large
        # ones, what a quarter of the buffer holds, so photos are not held in memory long before use
        share = self._opts.buffer_bytes / LOOKAHEAD_SHARE
        return min(self._opts.concurrency, max(8, int(share / client.mean_body_bytes)))

    def _http_client(self):
        if self._http is None:
            with self._http_lock:
                if self._http is None:
                    self._http = self._new_http_client()
        return self._http

    def _new_http_client(self):
        # an fsspec memory:// cache is this process's own: its client stays here too
        if self._opts.in_process or (self._opts.cache or "").startswith("memory://"):
            from engine.sources.http import HttpClient

            return HttpClient(self._opts, self._max_bytes, self._download_cache())
        from engine.sources.http_process import RemoteHttpClient

        return RemoteHttpClient(self._opts, self._max_bytes)

    @property
    def max_in_flight(self) -> int:
        """The most HTTP requests this process has had in flight at once."""
        return self._http.max_in_flight if self._http is not None else 0

    def _note_local_read(self, seconds: float, size: int) -> None:
        # Threads may race here; a lost update only nudges the means.
        self._local_reads = n = min(self._local_reads + 1, 64)
        self._local_read_seconds += (seconds - self._local_read_seconds) / n
        self._local_read_bytes += (size - self._local_read_bytes) / n

    def _too_big(self, size: int) -> FetchFailure:
        return FetchFailure(f"image is {size:,} bytes, over the limit of {self._max_bytes:,}")

    def _read_local(self, path: str) -> tuple[bytes | FetchFailure, os.stat_result | None]:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size > self._max_bytes:
                    return self._too_big(st.st_size), None
                return f.read(), st
        except FileNotFoundError:
            return FetchFailure(f"file not found: {path}"), None
        except IsADirectoryError:
            return FetchFailure(f"is a directory, not a file: {path}"), None
        except PermissionError:
            return FetchFailure(f"permission denied: {path}"), None

    def _read_fsspec(self, url: str) -> bytes | FetchFailure:
        import fsspec

        try:
            with fsspec.open(url, "rb") as f:
                data = f.read(self._max_bytes + 1)
        except FileNotFoundError:
            return FetchFailure(f"not found: {url}")
        return self._too_big(len(data)) if len(data) > self._max_bytes else data


def _done(fetched: Fetched) -> Future:
    future: Future = Future()
    future.set_result(fetched)
    return future

"""Fetching image bytes: local files, HTTP(S) with timeouts and bounded retries, fsspec URLs.

Every failure is returned as a :class:`FetchFailure` (stage ``fetch``), never raised.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from engine.config import FetchOptions
from engine.sources.location import local_path

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# Local files are read inline, in the unit's own thread, while they are small and reads are
# fast; otherwise the prefetch threads overlap the reads with decoding. Handing a row to a
# thread and back costs 50-90 us: more than reading a 150 KB file from the page cache (38 us
# here; pass-through of 10k rows took 2.5-2.9 s inline against 3.2-4.0 s through the threads),
# less than reading a 2 MB photo (280 us). The time is measured in the thread, so it includes
# waits for the GIL (often over 0.2 ms with two busy threads); a cold disk or a network file
# system shows as reads that take milliseconds.
INLINE_LOCAL_READ_BYTES = 512 * 1024
SLOW_LOCAL_READ_SECONDS = 0.002


@dataclass(frozen=True, slots=True)
class FetchFailure:
    reason: str


class Fetcher:
    """Reads image bytes. One per worker process; thread-safe (one HTTP session per thread)."""

    def __init__(self, opts: FetchOptions, max_bytes: int):
        self._opts = opts
        self._max_bytes = max_bytes
        self._local = threading.local()
        self._local_read_seconds = 0.0  # running means over the last ~64 local reads
        self._local_read_bytes = 0.0
        self._local_reads = 0

    @staticmethod
    def is_local(location: str) -> bool:
        """Read by :meth:`fetch` as a local file (every URL but ``file://`` is remote)."""
        return local_path(location) is not None

    @property
    def inline_local_reads(self) -> bool:
        """Whether local files have been small and quick to read so far (assumed until measured)."""
        return self._local_read_bytes < INLINE_LOCAL_READ_BYTES and self._local_read_seconds < SLOW_LOCAL_READ_SECONDS

    def fetch(self, location: str) -> bytes | FetchFailure:
        return self.fetch_with_stat(location)[0]

    def fetch_with_stat(self, location: str) -> tuple[bytes | FetchFailure, os.stat_result | None]:
        """The bytes and, for a local file, the status of the open file they were read from
        (taken before the read: a file rewritten meanwhile shows a newer mtime later)."""
        try:
            if location.startswith(("http://", "https://")):
                return self._fetch_http(location), None
            path = local_path(location)
            if path is not None:
                started = time.perf_counter()
                data, st = self._read_local(path)
                self._note_local_read(time.perf_counter() - started, len(data) if isinstance(data, bytes) else 0)
                return data, st
            return self._read_fsspec(location), None
        except Exception as exc:  # noqa: BLE001 - any I/O problem is this row's failure
            return FetchFailure(f"{type(exc).__name__}: {exc}"), None

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

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            session.headers["User-Agent"] = "engine/0.1 (image dataset converter)"
            self._local.session = session
        return session

    def _fetch_http(self, url: str) -> bytes | FetchFailure:
        """GET with a per-request timeout, retries with exponential backoff on connection errors
        and retryable statuses, and a total time bound per image."""
        import requests

        opts = self._opts
        deadline = time.monotonic() + opts.total_timeout
        last = "no attempt made"
        for attempt in range(opts.retries + 1):
            if attempt:
                pause = min(0.25 * 2 ** (attempt - 1), 4.0)
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            timeout = min(opts.timeout, remaining)
            try:
                with self._session().get(url, timeout=timeout, stream=True) as resp:
                    if resp.status_code in _RETRY_STATUS:
                        last = f"HTTP {resp.status_code} {resp.reason}"
                        continue
                    if resp.status_code >= 400:
                        return FetchFailure(f"HTTP {resp.status_code} {resp.reason}: {url}")
                    declared = int(resp.headers.get("Content-Length") or 0)
                    if declared > self._max_bytes:
                        return self._too_big(declared)
                    chunks, size = [], 0
                    for chunk in resp.iter_content(1 << 16):
                        size += len(chunk)
                        if size > self._max_bytes:
                            return self._too_big(size)
                        if time.monotonic() > deadline:
                            return FetchFailure(f"timed out after {opts.total_timeout:g} s: {url}")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {_short(exc)}"
            except requests.RequestException as exc:
                return FetchFailure(f"{type(exc).__name__}: {_short(exc)}")
        return FetchFailure(f"gave up after {attempt + 1} attempt(s) ({last}): {url}")


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "…"

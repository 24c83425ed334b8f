"""The driver's own threads (the runner's local lane): what they run, and the two pieces of
per-image code that must behave the same in a helper thread as in the main thread (the time
bound and the EXIF warnings). When Ray is worth starting instead: tests/unit/test_cost.py."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import imagegen
import pytest
from PIL import Image, ImageFile

from engine import imaging
from engine.config import ImageOptions
from engine.imaging import WARNING_EXIF_UNREADABLE, ImageFailure, metadata_orientation, transform_image
from engine.pipeline import ImageTimeout, time_limit
from engine.runners.ray_runner import RayRunner


def _exif_jpeg(truncate: int) -> bytes:
    exif = Image.Exif()
    exif[imagegen.ORIENTATION_TAG] = 6
    exif[0x010F] = "engine-tests-maker-long-string"
    raw = exif.tobytes()
    return imagegen.encode(
        imagegen.quadrant_image((64, 48)), "JPEG", exif=raw[:-truncate] if truncate else raw
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_exif_is_told_apart_from_good_exif_in_many_threads():
    """catch_warnings swaps process-wide state; threads parsing EXIF at once must neither miss a
    broken block nor blame a good one for another thread's warning."""
    good, broken = _exif_jpeg(0), _exif_jpeg(4)

    def orientation(data: bytes):
        return metadata_orientation(Image.open(io.BytesIO(data)).info)

    work = [good if i % 2 else broken for i in range(4000)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(orientation, work))
    for data, result in zip(work, results):
        if data is good:
            assert result.value == 6 and result.warnings == ()
        else:
            assert WARNING_EXIF_UNREADABLE in result.warnings


def test_a_photo_reaches_the_jpeg_decoder_in_one_call_with_the_same_pixels(monkeypatch):
    """Pillow feeds a decoder 64 KB per call, giving the GIL back and taking it again around each
    one; the engine hands a JPEG over whole (up to JPEG_DECODE_BLOCK). Same bytes out, and a
    truncated file is still refused."""
    data = imagegen.noise_jpeg((1600, 1200), quality=95)
    assert len(data) > 4 * ImageFile.MAXBLOCK
    opts = ImageOptions(max_size=700)
    calls: list[int] = []
    real = Image._getdecoder

    class Counting:
        def __init__(self, decoder):
            self._decoder = decoder

        def decode(self, buffer):
            calls.append(len(buffer))
            return self._decoder.decode(buffer)

        def __getattr__(self, name):
            return getattr(self._decoder, name)

    monkeypatch.setattr(Image, "_getdecoder", lambda *args: Counting(real(*args)))
    whole = transform_image(data, opts)
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(imaging, "JPEG_DECODE_BLOCK", ImageFile.MAXBLOCK)
    in_blocks = transform_image(data, opts)
    assert len(calls) > 4
    assert whole.data == in_blocks.data and (whole.width, whole.height) == (700, 525)
    monkeypatch.undo()
    cut = transform_image(data[: len(data) // 2], opts)
    assert isinstance(cut, ImageFailure) and "truncated" in cut.reason


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _bounded(seconds: float, work: float) -> tuple[str, float]:
    """Run ``work`` CPU seconds of Python under a bound of ``seconds``: the outcome and the CPU spent."""
    started = time.thread_time()
    try:
        with time_limit(seconds):
            _spin(work)
    except ImageTimeout:
        return "timed out", time.thread_time() - started
    return "finished", time.thread_time() - started


@pytest.mark.parametrize("where", ["main", "helper"])
def test_time_limit_holds_in_main_and_helper_threads(where):
    """The bound stops the block as it runs (not after it), in the main thread as in a helper."""
    if where == "main":
        outcomes = [_bounded(0.2, 3.0), _bounded(5, 0.01)]
    else:
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(_bounded, [0.2, 5], [3.0, 0.01]))
    assert [o for o, _ in outcomes] == ["timed out", "finished"]
    assert outcomes[0][1] < 1.5, outcomes  # stopped near its 0.2 s, long before its 3 s of work


def test_time_limit_counts_work_not_waiting():
    """A block that waits (no CPU) is not stopped by a bound it passes in wall time only: the
    bound is the thread's CPU time, which other load on the machine does not change."""
    started = time.monotonic()
    with time_limit(0.3):
        time.sleep(0.6)
    assert time.monotonic() - started >= 0.6


def test_small_job_runs_on_the_drivers_threads_without_ray():
    runner = RayRunner(workers=2)
    seen: set[str] = set()

    def work(n: int) -> int:
        seen.add(threading.current_thread().name)
        time.sleep(0.05)
        return n * n

    with runner:
        results = sorted(runner.map_unordered(work, [(n,) for n in range(8)]))
    assert results == [n * n for n in range(8)]
    assert not runner._started
    assert runner.num_local_items == 8
    assert len(seen) == 2 and all(name.startswith("engine-driver") for name in seen)


def test_a_failing_item_on_a_driver_thread_names_its_item():
    from engine.errors import ShardError

    def work(n: int) -> int:
        if n == 3:
            raise ValueError("bad input")
        return n

    runner = RayRunner(workers=2)
    with runner, pytest.raises(ShardError, match="bad input"):
        list(runner.map_unordered(work, [(n,) for n in range(6)]))


def _rows(paths):
    from engine.layouts.base import Checked
    from engine.sources.manifest import ManifestRow

    return [
        Checked(
            ManifestRow(line=i, kind="labelr", image_id=f"r{i}", split="train", locations=(str(p),), meta={})
        )
        for i, p in enumerate(paths)
    ]


@pytest.mark.parametrize("case", ["small", "slow", "large"])
def test_small_quick_local_reads_run_inline_others_in_the_prefetch_threads(tmp_path, monkeypatch, case):
    """Small, quick local reads (the page cache) are done in the unit's own thread: handing each
    row to a prefetch thread cost more than the read. Slow reads (a cold disk, a network file
    system) and large files are overlapped with decoding in the prefetch threads. Either way
    rows come back in order, whole."""
    from engine.config import FetchOptions
    from engine.pipeline import _prefetched
    from engine.sources import fetch

    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(bytes([i]) * (1000 + i))
    # thresholds far from this machine's read times, so that a hiccup cannot flip the outcome
    slow = case == "slow"
    monkeypatch.setattr(fetch, "SLOW_LOCAL_READ_SECONDS", 0.005 if slow else 10.0)
    monkeypatch.setattr(fetch, "INLINE_LOCAL_READ_BYTES", 500 if case == "large" else 1 << 20)
    readers: list[str] = []
    real_read = fetch.Fetcher._read_local

    def read_local(self, path):
        readers.append(threading.current_thread().name)
        if slow:
            time.sleep(2 * fetch.SLOW_LOCAL_READ_SECONDS)
        return real_read(self, path)

    monkeypatch.setattr(fetch.Fetcher, "_read_local", read_local)
    fetcher = fetch.Fetcher(FetchOptions(), max_bytes=1 << 20)
    first = list(_prefetched(fetcher, _rows(paths[:6]), threads=4))
    second = list(_prefetched(fetcher, _rows(paths[6:]), threads=4))

    got = [(checked.row.image_id, [data for data, _ in payloads]) for checked, payloads in first + second]
    assert got == [(f"r{i % 6}", [bytes([i]) * (1000 + i)]) for i in range(12)]
    # each local read comes with where its bytes lie: the file, its size and mtime before the read
    refs = [ref for _, payloads in first + second for _, ref in payloads]
    assert [(ref.path, ref.size, ref.offset) for ref in refs] == [
        (str(p), 1000 + i, None) for i, p in enumerate(paths)
    ]
    assert [ref.mtime_ns for ref in refs] == [p.stat().st_mtime_ns for p in paths]
    me = threading.current_thread().name
    assert readers[:6] == [me] * 6  # nothing measured yet: local reads are assumed fast
    if case == "small":
        assert fetcher.inline_local_reads
        assert readers[6:] == [me] * 6
    else:
        assert not fetcher.inline_local_reads
        assert all(name.startswith("fetch") for name in readers[6:])


@pytest.fixture(scope="module")
def echo_server(http_server):
    """conftest's file server: /echo/<i>.jpg holds its own path, /u<i>.jpg and /next<i>.jpg 1,000 x."""
    (http_server.root / "echo").mkdir(exist_ok=True)
    for i in range(5):
        (http_server.root / "echo" / f"{i}.jpg").write_bytes(f"/echo/{i}.jpg".encode())
    for name in [f"u{i}" for i in range(16)] + [f"next{i}" for i in range(400)]:
        (http_server.root / f"{name}.jpg").write_bytes(b"x" * 1000)
    return http_server.base_url


def _attempts(monkeypatch) -> list[tuple[str, str]]:
    """(thread, URL) of every request the in-process HTTP client starts, in the order it starts them."""
    from engine.sources import http

    started: list[tuple[str, str]] = []
    real = http.HttpClient._attempt

    def attempt(self, job):
        started.append((threading.current_thread().name, job.url))
        return real(self, job)

    monkeypatch.setattr(http.HttpClient, "_attempt", attempt)
    return started


def test_remote_locations_are_prefetched_in_threads(monkeypatch, echo_server):
    from engine.config import FetchOptions
    from engine.pipeline import _prefetched
    from engine.sources import fetch

    started = _attempts(monkeypatch)
    fetcher = fetch.Fetcher(FetchOptions(in_process=True), max_bytes=1 << 20)
    paths = [f"/echo/{i}.jpg" for i in range(5)]
    got = [
        payloads for _, payloads in _prefetched(fetcher, _rows([echo_server + p for p in paths]), threads=3)
    ]
    assert got == [[(p.encode(), None)] for p in paths]  # no file status for a remote image
    assert started and all(name == "engine-http" for name, _ in started)  # HTTP runs on its loop thread


def test_the_look_ahead_is_topped_up_while_a_unit_runs(monkeypatch, echo_server):
    """In a driver thread, a unit of URLs starts fetching the rows after it, and tops that up as
    it takes its own rows (the first bodies show how small the images are), so the next units'
    rows are in flight before a thread takes them, not only as many as the first guess allowed."""
    from engine.config import FetchOptions
    from engine.pipeline import _prefetched
    from engine.sources import fetch

    started = _attempts(monkeypatch)
    fetcher = fetch.Fetcher(FetchOptions(concurrency=256, in_process=True), max_bytes=1 << 20)
    unit = [f"{echo_server}/u{i}.jpg" for i in range(16)]
    after = [f"{echo_server}/next{i}.jpg" for i in range(400)]
    drawn = iter(after)
    got = []

    def run():
        got.extend(_prefetched(fetcher, _rows(unit), threads=2, lookahead=lambda: drawn, concurrency=256))

    thread = threading.Thread(target=run)  # not the main thread: where the driver's threads look ahead
    thread.start()
    thread.join(30)
    assert [payloads for _, payloads in got] == [[(b"x" * 1000, None)]] * 16
    deadline = time.monotonic() + 10
    while len(started) < 16 + 128 and time.monotonic() < deadline:
        time.sleep(0.01)
    fetched = [url for _, url in started]
    ahead = [u for u in fetched if "/next" in u]
    # at first an unknown size allows 32 rows ahead (a 2 MiB guess), once: about 50; topped up, far more
    assert len(ahead) > 128, len(ahead)
    assert sorted(ahead, key=after.index) == after[: len(ahead)]  # in order, each once
    assert len(set(fetched)) == len(fetched)

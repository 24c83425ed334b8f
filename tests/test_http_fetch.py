"""Fetching over HTTP against a server on 127.0.0.1 that this module starts: concurrency that
follows latency, politeness (Retry-After, redirects, a per-host cap and rate, the User-Agent),
slow and lying servers bounded, and the download cache. Every case checks the accounting:
each row is written or rejected with a reason."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import imagegen
import pytest
from conftest import LoopbackServer, Output, convert, decode, parquet_hashes, row, write_input

from engine.config import FetchOptions
from engine.sources.cache import DownloadCache
from engine.sources.fetch import Fetcher, FetchFailure

GOOD = imagegen.jpeg(size=(96, 64))
ROT6 = imagegen.oriented(6)
NOISE = [imagegen.noise_jpeg((400, 300), seed=i) for i in range(6)]  # kept as they are, and big
STOP = threading.Event()
BIG = [bytes([i]) * (3 << 19) for i in range(3)]  # 1.5 MiB each


class Server:
    """Counts requests per path and the most handled at once (overall and per path prefix)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.hits: dict[str, int] = {}
            self.times: dict[str, list[float]] = {}
            self.agents: list[str] = []
            self.auth: list[str] = []
            self.in_flight = self.max_in_flight = 0

    def count(self, prefix: str = "/") -> int:
        with self.lock:
            return sum(n for p, n in self.hits.items() if p.startswith(prefix))


STATE = Server()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real image servers do

    def log_message(self, *args):
        pass

    def _image(self, body: bytes = GOOD, content_type: str = "image/jpeg"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = urlsplit(self.path).path
        with STATE.lock:
            first = path not in STATE.hits
            STATE.hits[path] = STATE.hits.get(path, 0) + 1
            STATE.times.setdefault(path, []).append(time.monotonic())
            STATE.agents.append(self.headers.get("User-Agent", ""))
            STATE.auth.append(self.headers.get("Authorization", ""))
            STATE.in_flight += 1
            STATE.max_in_flight = max(STATE.max_in_flight, STATE.in_flight)
        try:
            self._route(path, first)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass
        finally:
            with STATE.lock:
                STATE.in_flight -= 1

    def _route(self, path: str, first: bool):
        parts = path.strip("/").split("/")
        kind = parts[0]
        if kind == "img":  # /img/<latency ms>/<name>
            time.sleep(int(parts[1]) / 1000)
            self._image(ROT6 if parts[-1].startswith("rot6") else GOOD)
        elif kind == "retry-after":  # /retry-after/<status>/<seconds>/<name>: once, then the image
            if first:
                self.send_response(int(parts[1]))
                self.send_header("Retry-After", parts[2])
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._image()
        elif kind == "redirect":  # /redirect/<n>/<name>: n hops, then the image
            n = int(parts[1])
            if n == 0:
                self._image()
                return
            self.send_response(302)
            self.send_header("Location", f"/redirect/{n - 1}/{parts[2]}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "loop":
            self.send_response(302)
            self.send_header("Location", path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "trickle":  # a valid header, then the body one byte at a time
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            for i in range(len(GOOD)):
                if STOP.is_set():
                    return
                self.wfile.write(GOOD[i : i + 1])
                self.wfile.flush()
                time.sleep(0.05)
        elif kind == "silent":  # accepts, reads the request, never answers
            STOP.wait(60)
            self.close_connection = True
        elif kind == "cl-long":  # promises more than it sends, then closes
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD) + 5000))
            self.end_headers()
            self.wfile.write(GOOD)
            self.close_connection = True
        elif kind == "cl-short":  # promises half of what it sends
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD) // 2))
            self.end_headers()
            self.wfile.write(GOOD)
            self.close_connection = True
        elif kind == "cl-extra":  # sends its promised half, then, later, more on the same connection
            half = len(GOOD) // 2
            self.send_response(200)
            self.send_header("Content-Length", str(half))
            self.end_headers()
            self.wfile.write(GOOD[:half])
            self.wfile.flush()
            time.sleep(0.1)  # the client has taken the answer as whole, and keeps the connection
            self.wfile.write(GOOD[half:])
            self.wfile.flush()
        elif kind == "chunked-cut":  # a chunked body cut off before its last chunk
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = GOOD[: len(GOOD) // 2]
            self.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
            self.wfile.flush()
            self.close_connection = True
        elif kind == "noise":  # /noise/<i>.jpg: NOISE[i]
            self._image(NOISE[int(parts[1].split(".")[0])])
        elif kind == "big":  # /big/<i>: a body over LARGE_BODY_BYTES, 100 ms after the request
            time.sleep(0.1)
            self._image(BIG[int(parts[1]) % len(BIG)], "application/octet-stream")
        elif kind == "html":  # an error page with status 200
            self._image(b"<html><body>Sorry, this product has no photo.</body></html>", "text/html")
        elif kind == "missing":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._image()


@pytest.fixture(scope="module")
def server():
    STOP.clear()
    httpd = LoopbackServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    STOP.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _fresh_counts():
    STATE.reset()


def _run(tmp_path: Path, rows: list[dict], *options: str, runner: str = "local", name: str = "out") -> Output:
    inp = write_input(tmp_path / f"in-{name}", rows)
    out = tmp_path / name
    assert convert(inp, out, "--http-retries", "1", *options, runner=runner) == 0
    o = Output(out)
    s = o.stats
    assert s["num_input_rows"] == len(rows) == s["num_written"] + s["num_rejected"]
    assert len(o.rejects) == s["num_rejected"] and all(r["reason"] for r in o.rejects)
    return o


def _first_units_wait_for_requests(monkeypatch, *, units: int, requests: int) -> list[int]:
    """The first ``units`` units wait (up to 10 s) until the server has seen ``requests`` image
    requests; returns the counts each saw as it started."""
    import engine.driver

    real = engine.driver.process_unit
    seen_at_start: list[int] = []

    def first_units_wait(unit, ctx):
        if len(seen_at_start) < units:
            deadline = time.monotonic() + 10
            while STATE.count("/img/") < requests and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_at_start.append(STATE.count("/img/"))
        return real(unit, ctx)

    monkeypatch.setattr(engine.driver, "process_unit", first_units_wait)
    return seen_at_start


def test_concurrency_follows_latency_across_units(server, tmp_path):
    """200 ms per answer, 16 rows per unit and the driver's threads: far more requests than one
    unit's rows (or the old 8 threads) are in flight, and no URL is fetched twice."""
    rows = [row(f"r{i}", f"{server}/img/200/{i}.jpg", key="image_url") for i in range(160)]
    o = _run(tmp_path, rows, "--unit-rows", "16", "--fetch-concurrency", "64", runner="ray")
    assert len(o.by_id()) == 160 and o.rejects == []
    assert STATE.max_in_flight > 16, STATE.max_in_flight
    assert STATE.max_in_flight <= 64
    assert STATE.count("/img/") == 160 and all(n == 1 for n in STATE.hits.values())
    fetch = o.stats["fetch"]
    assert fetch["num_requests"] == 160 and fetch["num_bytes_downloaded"] == 160 * len(GOOD)
    assert 16 < fetch["max_in_flight"] <= 64
    im = decode(o.by_id()["r7"]["image"])
    assert im.size == (96, 64)


def test_first_rows_are_fetched_while_the_run_starts(server, tmp_path, monkeypatch):
    """The HTTP client starts and the first rows' requests go out while the manifest is planned:
    the first unit finds them sent (here it waits until the server has seen them, which on the
    code before never happened). Each URL is still fetched once, and counted once."""
    rows = [row(f"r{i}", f"{server}/img/100/first-{i}.jpg", key="image_url") for i in range(40)]
    seen_at_start = _first_units_wait_for_requests(monkeypatch, units=1, requests=8)
    o = _run(tmp_path, rows, "--unit-rows", "16")
    assert seen_at_start[0] >= 8, seen_at_start
    assert len(o.by_id()) == 40 and o.rejects == []
    assert STATE.count("/img/") == 40 and all(n == 1 for n in STATE.hits.values())
    assert o.stats["fetch"]["num_requests"] == 40


def test_the_early_start_tops_up_once_the_first_bodies_show_their_size(server, tmp_path, monkeypatch):
    """Before any body has come, the look-ahead assumes large images and sends 32 requests; once
    the first small ones are in, the early start asks for more of the first rows (up to what the
    estimate allows and --fetch-concurrency) without waiting for a unit to take any. Each URL is
    still fetched once."""
    rows = [row(f"r{i}", f"{server}/img/100/early-{i}.jpg", key="image_url") for i in range(120)]
    seen_at_start = _first_units_wait_for_requests(monkeypatch, units=2, requests=64)
    o = _run(tmp_path, rows, "--unit-rows", "16")
    assert seen_at_start[0] >= 64, seen_at_start  # twice what the guess allows before any body came
    assert len(o.by_id()) == 120 and o.rejects == []
    assert STATE.count("/img/") == 120 and all(n == 1 for n in STATE.hits.values())


def test_first_urls_then_urls_after_go_on_from_the_last_row_drawn(tmp_path):
    from engine.sources.jsonl import JsonlSource

    rows = [row(f"r{i}", f"http://h/{i}.jpg", key="image_url") for i in range(40)]
    rows[3] = row("local", "a.jpg")  # a local file: not fetched ahead
    inp = write_input(tmp_path / "in", rows)
    source = JsonlSource(str(inp.manifest))
    first = source.first_urls(256, base=str(tmp_path), default_split="train")
    drawn = [next(first) for _ in range(20)]
    assert drawn == [f"http://h/{i}.jpg" for i in range(21) if i != 3]
    unit = source.plan(16).units[0]  # rows 0-15; rows up to 20 were drawn ahead already
    assert list(source.urls_after(unit, 8, base=str(tmp_path), default_split="train"))[:3] == [
        f"http://h/{i}.jpg" for i in (21, 22, 23)
    ]
    source.close()
    local = write_input(tmp_path / "local", [row("a", "a.jpg"), row("b", "b.jpg")])
    assert (
        list(JsonlSource(str(local.manifest)).first_urls(256, base=str(tmp_path), default_split="train"))
        == []
    )


def test_retry_after_and_503_then_success(server, tmp_path):
    rows = [
        row("r429", f"{server}/retry-after/429/1/a.jpg", key="image_url"),
        row("r503", f"{server}/retry-after/503/0/b.jpg", key="image_url"),
        row("date", f"{server}/retry-after/503/Wed, 21 Oct 2015 07:28:00 GMT/c.jpg", key="image_url"),
    ]
    o = _run(tmp_path, rows)
    assert sorted(o.by_id()) == ["date", "r429", "r503"], o.rejects
    assert STATE.hits["/retry-after/429/1/a.jpg"] == 2
    first, second = STATE.times["/retry-after/429/1/a.jpg"]
    assert second - first >= 0.9  # it waited as asked (a lower bound, not a speed)


def test_retry_after_past_the_total_bound_is_rejected_at_once(server, tmp_path):
    rows = [
        row("later", f"{server}/retry-after/429/3600/a.jpg", key="image_url"),
        row("ok", f"{server}/plain.jpg", key="image_url"),
    ]
    started = time.monotonic()
    o = _run(tmp_path, rows, "--http-total-timeout", "20")
    assert time.monotonic() - started < 15
    assert sorted(o.by_id()) == ["ok"]
    (rec,) = o.rejects
    assert rec["stage"] == "fetch" and "429" in rec["reason"] and "3600" in rec["reason"], rec


def test_redirects_up_to_five_then_refused(server, tmp_path):
    rows = [
        row("five", f"{server}/redirect/5/a.jpg", key="image_url"),
        row("six", f"{server}/redirect/6/b.jpg", key="image_url"),
        row("loop", f"{server}/loop/c.jpg", key="image_url"),
    ]
    o = _run(tmp_path, rows)
    assert sorted(o.by_id()) == ["five"]
    reasons = {r["image_id"]: r["reason"] for r in o.rejects}
    assert set(reasons) == {"six", "loop"}
    assert all("redirect" in r for r in reasons.values()), reasons
    assert STATE.count("/loop/") <= 6


@pytest.mark.parametrize("path", ["trickle/a.jpg", "silent/a.jpg"])
def test_slow_servers_are_cut_off_at_the_total_bound(server, tmp_path, path):
    """A body sent one byte at a time (each byte well within --http-timeout) and a server that
    never answers are rejected within --http-total-timeout, and the other rows are written."""
    rows = [row("slow", f"{server}/{path}", key="image_url")] + [
        row(f"ok{i}", f"{server}/img/0/{i}.jpg", key="image_url") for i in range(5)
    ]
    started = time.monotonic()
    o = _run(tmp_path, rows, "--http-timeout", "30", "--http-total-timeout", "2")
    assert time.monotonic() - started < 20  # the bound is 2 s; generous slack for a busy machine
    assert sorted(o.by_id()) == [f"ok{i}" for i in range(5)]
    (rec,) = o.rejects
    assert rec["stage"] == "fetch" and "timed out after 2 s" in rec["reason"], rec


def test_lying_and_broken_bodies_are_rejected(server, tmp_path):
    rows = [
        row("long", f"{server}/cl-long/a.jpg", key="image_url"),
        row("short", f"{server}/cl-short/b.jpg", key="image_url"),
        row("cut", f"{server}/chunked-cut/c.jpg", key="image_url"),
        row("html", f"{server}/html/d.jpg", key="image_url"),
        row("gone", f"{server}/missing/e.jpg", key="image_url"),
        row("ok", f"{server}/plain.jpg", key="image_url"),
    ]
    o = _run(tmp_path, rows)
    assert sorted(o.by_id()) == ["ok"], "no short or foreign body may be stored as an image"
    stages = {r["image_id"]: (r["stage"], r["reason"]) for r in o.rejects}
    assert stages["long"][0] == "fetch" and "cut short" in stages["long"][1], stages
    assert stages["cut"][0] == "fetch", stages
    assert stages["short"][0] in ("fetch", "decode"), stages
    assert stages["html"][0] == "decode", stages
    assert stages["gone"] == ("fetch", f"HTTP 404 Not Found: {server}/missing/e.jpg"), stages


def test_a_retry_does_not_trust_a_kept_alive_connection_again(server):
    """A lying server leaves bytes past its answer on two kept-alive connections. The next
    request reads them as its answer ("Invalid status line"); its retry opens a fresh
    connection instead of taking the other spoilt one, so the row is not lost."""
    fetcher = Fetcher(FetchOptions(max_per_host=2, retries=1, in_process=True), max_bytes=1 << 20)
    spoilt = [fetcher.submit(f"{server}/cl-extra/{i}.jpg") for i in range(2)]
    assert [f.result(timeout=30).data for f in spoilt] == [GOOD[: len(GOOD) // 2]] * 2
    time.sleep(0.3)  # the extra bytes have arrived on both connections
    assert fetcher.fetch(f"{server}/plain.jpg") == GOOD


def test_per_host_cap_and_rate_are_observed_at_the_server(server, tmp_path):
    rows = [row(f"r{i}", f"{server}/img/100/{i}.jpg", key="image_url") for i in range(24)]
    o = _run(tmp_path, rows, "--max-connections-per-host", "3", runner="ray", name="cap")
    assert len(o.by_id()) == 24
    assert STATE.max_in_flight <= 3, STATE.max_in_flight

    STATE.reset()
    rows = [row(f"q{i}", f"{server}/img/0/q{i}.jpg", key="image_url") for i in range(10)]
    o = _run(tmp_path, rows, "--max-requests-per-second-per-host", "10", name="rate")
    assert len(o.by_id()) == 10
    starts = sorted(t for p, ts in STATE.times.items() for t in ts)
    assert starts[-1] - starts[0] >= 0.6  # 10 requests at 10/s span about 0.9 s (a lower bound)


def test_user_agent_is_sent(server, tmp_path):
    _run(
        tmp_path,
        [row("a", f"{server}/plain.jpg", key="image_url")],
        "--user-agent",
        "labelr-export/1.0 (contact@example.org)",
    )
    assert STATE.agents == ["labelr-export/1.0 (contact@example.org)"]


def test_proxy_and_netrc_from_the_environment_are_used(server, tmp_path, monkeypatch):
    """HTTP_PROXY / NO_PROXY and .netrc are honoured (looked up once per host, not per request):
    the test server doubles as the proxy for a host that does not exist."""
    import base64

    netrc = tmp_path / "netrc"
    netrc.write_text("machine images.example.invalid login bot password s3cret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, server)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "localhost")
    fetcher = Fetcher(FetchOptions(retries=0), max_bytes=1 << 20)
    got = [fetcher.fetch(f"http://images.example.invalid/img/0/p{i}.jpg") for i in range(3)]
    assert got == [GOOD] * 3 and STATE.count("/img/") == 3
    assert STATE.auth == ["Basic " + base64.b64encode(b"bot:s3cret").decode()] * 3


def test_download_cache_second_run_sends_no_request(server, tmp_path):
    """The second run, with another --max-size, is served from the cache: the server sees no
    request, the images are right, and the cache changes no output byte."""
    cache = tmp_path / "cache"
    rows = [row(f"r{i}", f"{server}/img/0/rot6-{i}.jpg", key="image_url") for i in range(6)]
    rows.append(row("gone", f"{server}/missing/x.jpg", key="image_url"))
    first = _run(tmp_path, rows, "--download-cache", str(cache), name="first")
    assert STATE.count("/img/") == 6
    assert first.stats["fetch"]["num_cache_misses"] == 7
    assert first.stats["fetch"]["num_cache_bytes"] > 6 * len(ROT6)

    STATE.reset()
    second = _run(tmp_path, rows, "--download-cache", str(cache), "--max-size", "32", name="second")
    assert STATE.count("/img/") == 0, STATE.hits
    assert STATE.count("/missing/") == 1  # a failure is not kept: it is asked again
    fetch = second.stats["fetch"]
    assert (fetch["num_cache_hits"], fetch["num_cache_misses"]) == (6, 1)
    im = decode(second.by_id()["r3"]["image"])
    assert im.size == (32, 24)  # rotated upright and resized from the cached bytes
    imagegen.assert_quadrants(im)

    STATE.reset()
    third = _run(tmp_path, rows, "--download-cache", str(cache), name="third")
    without = _run(tmp_path, rows, name="without")
    assert parquet_hashes(third.root) == parquet_hashes(without.root) == parquet_hashes(first.root)


def test_corrupt_cache_entry_is_fetched_again(server, tmp_path):
    cache = tmp_path / "cache"
    rows = [row(f"r{i}", f"{server}/img/0/c{i}.jpg", key="image_url") for i in range(3)]
    _run(tmp_path, rows, "--download-cache", str(cache), name="first")

    def entry(url: str) -> Path:
        key = DownloadCache.key(url)
        return cache / key[:2] / key

    victim = f"{server}/img/0/c1.jpg"
    data = bytearray(entry(victim).read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the body
    entry(victim).write_bytes(bytes(data))
    entry(f"{server}/img/0/c2.jpg").write_bytes(b"")  # torn to nothing

    STATE.reset()
    o = _run(tmp_path, rows, "--download-cache", str(cache), name="second")
    assert len(o.by_id()) == 3
    assert STATE.hits == {"/img/0/c1.jpg": 1, "/img/0/c2.jpg": 1}
    assert o.stats["fetch"]["num_cache_corrupt"] == 2 and o.stats["fetch"]["num_cache_hits"] == 1
    assert DownloadCache(str(cache)).get(victim).data == GOOD  # rewritten whole


def test_cached_passthrough_rows_are_referenced_not_copied(server, tmp_path, part_bytes):
    """A pass-through row whose bytes a local download cache holds goes the way of a local file:
    its part references the cache entry, and the shard gets the server's bytes from there. So
    does a row fetched into the cache; without a cache the fetched bytes are in the part."""
    cache = tmp_path / "cache"
    rows = [row(f"n{i}", f"{server}/noise/{i}.jpg", key="image_url") for i in range(6)]
    total = sum(len(b) for b in NOISE)
    filled = _run(tmp_path, rows, "--download-cache", str(cache), name="fill")
    STATE.reset()
    cached = _run(tmp_path, rows, "--download-cache", str(cache), "--unit-rows", "2", name="cached")
    assert STATE.hits == {}
    without = _run(tmp_path, rows, name="without")
    for o in (filled, cached, without):
        assert o.rejects == []
        assert [o.by_id()[f"n{i}"]["image"]["bytes"] for i in range(6)] == NOISE  # the server's bytes
    assert cached.stats["fetch"]["num_cache_hits"] == 6
    assert cached.stats["num_passthrough"] == 6
    fill_parts, cached_parts, copied_parts = part_bytes
    assert copied_parts > total  # the fetched bytes are in the parts
    assert fill_parts < total / 10 and cached_parts < total / 10, part_bytes  # only references
    assert parquet_hashes(filled.root) == parquet_hashes(cached.root) == parquet_hashes(without.root)


def test_cache_entries_are_read_and_checked_in_the_unit_not_the_event_loop(server, tmp_path, monkeypatch):
    """Cache hits are read like local files, in the thread that decodes them (nothing goes
    through the event loop's executor); the check is made there, so a corrupt entry is still
    fetched again, and rewritten."""
    from engine.sources import cache as cache_module
    from engine.sources import http

    cache = tmp_path / "cache"
    rows = [row(f"r{i}", f"{server}/noise/{i}.jpg", key="image_url") for i in range(4)]
    _run(tmp_path, rows, "--download-cache", str(cache), name="first")
    victim = f"{server}/noise/2.jpg"
    key = DownloadCache.key(victim)
    entry = cache / key[:2] / key
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF
    entry.write_bytes(bytes(data))

    readers: list[str] = []
    real_read = cache_module.DownloadCache.read_local

    def read_local(path, max_body):
        readers.append(threading.current_thread().name)
        return real_read(path, max_body)

    def no_lookup(self, url):
        raise AssertionError(f"looked up on the event loop: {url}")

    monkeypatch.setattr(cache_module.DownloadCache, "read_local", staticmethod(read_local))
    monkeypatch.setattr(http.HttpClient, "_cache_get", no_lookup)
    STATE.reset()
    # the client's own lookup is patched: it runs in this process
    o = _run(
        tmp_path, rows, "--download-cache", str(cache), "--workers", "1", "--http-in-process", name="second"
    )
    assert STATE.hits == {"/noise/2.jpg": 1}
    assert [o.by_id()[f"r{i}"]["image"]["bytes"] for i in range(4)] == NOISE[:4]
    assert len(readers) == 4 and not any(name.startswith(("asyncio", "engine-http")) for name in readers)
    fetch = o.stats["fetch"]
    assert (fetch["num_cache_hits"], fetch["num_cache_corrupt"], fetch["num_requests"]) == (3, 1, 1)
    assert DownloadCache(str(cache)).get(victim).data == NOISE[2]


def test_a_cache_entry_removed_before_its_shard_stops_the_run(server, tmp_path, monkeypatch, capsys):
    """A referenced entry must stay in place until the run ends, like a local source file: one
    removed before its shard is written stops the run with one line naming it, and no shard."""
    import engine.driver

    cache = tmp_path / "cache"
    rows = [row(f"n{i}", f"{server}/noise/{i}.jpg", key="image_url") for i in range(3)]
    _run(tmp_path, rows, "--download-cache", str(cache), name="fill")
    key = DownloadCache.key(f"{server}/noise/1.jpg")
    entry = cache / key[:2] / key
    plan = engine.driver.plan_shards

    def then_remove(results, opts, store):
        entry.unlink()
        return plan(results, opts, store)

    monkeypatch.setattr(engine.driver, "plan_shards", then_remove)
    inp = write_input(tmp_path / "in-again", rows)
    capsys.readouterr()
    assert convert(inp, tmp_path / "again", "--download-cache", str(cache)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(entry) in err[0] and "cannot be read back" in err[0], err
    assert not list((tmp_path / "again").rglob("*.parquet"))


@pytest.mark.parametrize("where", ["child", "in-process"])
def test_a_run_the_cache_holds_whole_starts_no_http_client(server, tmp_path, monkeypatch, where):
    """Every row in a local cache: nothing is fetched, so no HTTP client is started (its start
    would take CPU from the planning, and a child process with it); one uncached row starts one."""
    from engine.sources import http, http_process

    cache = tmp_path / "cache"
    rows = [row(f"r{i}", f"{server}/noise/{i}.jpg", key="image_url") for i in range(4)]
    _run(tmp_path, rows, "--download-cache", str(cache), name="fill")
    started: list[str] = []
    for cls in (http.HttpClient, http_process.RemoteHttpClient):
        real_init = cls.__init__

        def init(self, *args, real_init=real_init, **kwargs):
            started.append(type(self).__name__)
            real_init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)
    STATE.reset()
    extra = ["--http-in-process"] if where == "in-process" else []
    # other fetch options than the first run's: another fetcher, with no client yet
    _run(tmp_path, rows, "--download-cache", str(cache), "--http-timeout", "29", *extra, name="cached")
    assert STATE.hits == {} and started == []
    more = [*rows, row("new", f"{server}/noise/5.jpg", key="image_url")]
    _run(tmp_path, more, "--download-cache", str(cache), "--http-timeout", "28", *extra, name="one-more")
    assert STATE.hits == {"/noise/5.jpg": 1}
    assert started == ["HttpClient" if where == "in-process" else "RemoteHttpClient"]


def test_a_sound_entry_is_kept_when_a_miss_is_stored(tmp_path):
    """An entry that appears between a miss and its store (another run filling the same cache)
    is kept, so a part file of that run that references it stays valid; a corrupt one is replaced."""
    cache = DownloadCache(str(tmp_path / "c"))
    cache.put("http://x/a", b"first")
    path = Path(cache.local_entry("http://x/a"))
    before = path.stat()
    size, mtime_ns = cache.put_local("http://x/a", b"second", replace=False)
    assert mtime_ns is None and cache.get("http://x/a").data == b"first"
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns
    size, mtime_ns = cache.put_local("http://x/b", b"new", replace=False)
    assert (
        cache.get("http://x/b").data == b"new"
        and mtime_ns == Path(cache.local_entry("http://x/b")).stat().st_mtime_ns
    )
    size, mtime_ns = cache.put_local("http://x/a", b"second")
    assert cache.get("http://x/a").data == b"second" and mtime_ns is not None
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_download_cache_on_fsspec(server, tmp_path):
    rows = [row(f"r{i}", f"{server}/img/0/m{i}.jpg", key="image_url") for i in range(3)]
    url = f"memory://engine-test-cache-{time.monotonic_ns()}"
    _run(tmp_path, rows, "--download-cache", url, name="first")
    STATE.reset()
    o = _run(tmp_path, rows, "--download-cache", url, "--max-size", "48", name="second")
    assert STATE.count("/img/") == 0 and len(o.by_id()) == 3
    assert DownloadCache(url).size_bytes() == o.stats["fetch"]["num_cache_bytes"]


def test_cache_entries_are_checked(tmp_path):
    cache = DownloadCache(str(tmp_path / "c"))
    assert cache.get("http://x/a").data is None and not cache.get("http://x/a").corrupt
    size = cache.put("http://x/a", b"abc")
    assert cache.get("http://x/a").data == b"abc" and size == cache.size_bytes()
    key = DownloadCache.key("http://x/a")
    path = tmp_path / "c" / key[:2] / key
    path.write_bytes(path.read_bytes()[:-1])  # torn
    assert cache.get("http://x/a").corrupt
    assert [p.name for p in path.parent.iterdir()] == [key]  # no temporary file left behind


def test_fetch_buffer_bounds_the_bytes_held(server):
    """With a buffer of 10 bodies, a process that takes none of its results starts few requests;
    once it takes them, the rest follow, in order, whole. Every request the server saw is one the
    fetcher counted (a retry after a connection error on a loaded machine is allowed, and counted)."""
    body = len(GOOD)
    fetcher = Fetcher(FetchOptions(buffer_bytes=10 * body, concurrency=64), max_bytes=1 << 20)
    futures = [fetcher.submit(f"{server}/img/0/b{i}.jpg") for i in range(60)]
    seen, deadline = -1, time.monotonic() + 10
    while STATE.count("/img/") != seen and time.monotonic() < deadline:  # until no more start
        seen = STATE.count("/img/")
        time.sleep(0.5)
    assert 1 <= STATE.count("/img/") <= 12, STATE.count("/img/")
    taken, requests = [], 0
    for future in futures:
        fetched = future.result(timeout=30)
        taken.append(fetched.data)
        requests += fetched.num_requests
        fetched.release()
    assert taken == [GOOD] * 60
    assert sorted(STATE.hits) == sorted(f"/img/0/b{i}.jpg" for i in range(60))
    assert STATE.count("/img/") == requests, STATE.hits


def test_large_bodies_are_read_a_few_at_a_time_per_host(server):
    """Bodies over LARGE_BODY_BYTES from one host are read LARGE_BODIES_AT_ONCE at a time (so the
    first photos arrive whole first; the others' transfers wait, paused); small ones are not held
    back, and every body arrives whole."""
    from engine.sources import http

    fetcher = Fetcher(FetchOptions(concurrency=64, in_process=True), max_bytes=8 << 20)
    futures = [fetcher.submit(f"{server}/big/{i}") for i in range(12)]
    small = [fetcher.submit(f"{server}/img/0/s{i}.jpg") for i in range(12)]
    assert [f.result(timeout=30).data for f in small] == [GOOD] * 12
    assert [f.result(timeout=30).data for f in futures] == [BIG[i % 3] for i in range(12)]
    assert STATE.max_in_flight > http.LARGE_BODIES_AT_ONCE  # they were all asked for at once
    assert 1 <= fetcher._http.max_large_at_once <= http.LARGE_BODIES_AT_ONCE
    assert STATE.count("/big/") == 12
    assert fetcher._http._large == {}  # a host's gate goes with its last large body


def test_dead_host_reason_names_the_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = Fetcher(FetchOptions(retries=0), 1 << 20).fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert isinstance(result, FetchFailure) and "ConnectionError" in result.reason


@pytest.mark.parametrize(
    "option,value",
    [
        ("--fetch-concurrency", "0"),
        ("--max-connections-per-host", "-1"),
        ("--max-requests-per-second-per-host", "-2"),
        ("--http-total-timeout", "0"),
        ("--user-agent", " "),
    ],
)
def test_bad_fetch_options_are_usage_errors(tmp_path, option, value, capsys):
    inp = write_input(tmp_path / "in", [row("a", "http://127.0.0.1:9/a.jpg", key="image_url")])
    assert convert(inp, tmp_path / "out", option, value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0], err


def test_fetch_options_do_not_define_the_output(tmp_path):
    from engine.config import ConvertOptions

    a = ConvertOptions(manifest=str(tmp_path / "m.jsonl"), out=str(tmp_path / "o"), config="c.json")
    b = ConvertOptions(
        manifest=str(tmp_path / "m.jsonl"),
        out=str(tmp_path / "o"),
        config="c.json",
        fetch=FetchOptions(cache=str(tmp_path / "cache"), concurrency=7, user_agent="x"),
    )
    assert a.output_defining() == b.output_defining()
    assert (
        hashlib.sha256(repr(a.output_defining()).encode()).digest()
        == hashlib.sha256(repr(b.output_defining()).encode()).digest()
    )


def test_progress_shows_downloaded_megabytes_per_second(server, capsys):
    from engine.progress import BarProgress

    bar = BarProgress()
    bar.start(4, "converting")
    fetcher = Fetcher(FetchOptions(), max_bytes=1 << 20)
    assert all(fetcher.fetch(f"{server}/img/0/p{i}.jpg") == GOOD for i in range(4))
    bar.advance(4, 0)
    assert "MB/s downloaded" in bar.postfix()
    bar.close()


def test_cache_folder_is_not_shown_in_the_card_command():
    from engine.cli import public_command

    assert (
        public_command(["convert", "--download-cache", "/home/me/secret/cache", "--out", "s3://b/o"])
        == "engine convert --download-cache cache --out s3://b/o"
    )


def test_download_cache_that_cannot_be_created_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    inp = write_input(tmp_path / "in", [row("a", "http://127.0.0.1:9/a.jpg", key="image_url")])
    assert convert(inp, tmp_path / "out", "--download-cache", str(tmp_path / "file" / "cache")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--download-cache" in err[0] and "Not a directory" in err[0], err


def test_rows_rejected_after_their_fetch_are_not_downloaded_again(server, tmp_path):
    """What a later retry of rejected rows relies on: a body that arrived whole is cached even
    when its row failed afterwards (here an HTML page with status 200, rejected at decode)."""
    cache = tmp_path / "cache"
    rows = [
        row("page", f"{server}/html/p.jpg", key="image_url"),
        row("ok", f"{server}/plain.jpg", key="image_url"),
    ]
    first = _run(tmp_path, rows, "--download-cache", str(cache), name="first")
    assert [r["stage"] for r in first.rejects] == ["decode"]
    STATE.reset()
    second = _run(tmp_path, rows, "--download-cache", str(cache), name="second")
    assert STATE.hits == {} and [r["stage"] for r in second.rejects] == ["decode"]
    assert DownloadCache(str(cache)).contains(f"{server}/html/p.jpg")


def test_ray_started_at_once_fetches_each_url_once(server, tmp_path):
    """With Ray started at once (ENGINE_RAY_START=eager), Ray's workers take the first units,
    so the driver does not fetch their rows early: the server sees each URL once, and every
    Ray worker fetches through a child process of its own."""
    import os
    import subprocess
    import sys
    import tempfile

    from conftest import REPO

    rows = [row(f"r{i}", f"{server}/img/20/{i}.jpg", key="image_url") for i in range(120)]
    inp = write_input(tmp_path / "in", rows)
    ray_tmp = Path(tempfile.mkdtemp(prefix="eng-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = dict(os.environ, ENGINE_RAY_START="eager", RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    argv = [sys.executable, "-m", "engine", "convert", "--manifest", str(inp.manifest), "--config"]
    argv += [
        str(inp.config),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "2",
        "--unit-rows",
        "10",
        "--quiet",
    ]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    o = Output(tmp_path / "out")
    assert len(o.by_id()) == 120 and o.rejects == []
    assert STATE.count("/img/") == 120 and all(n == 1 for n in STATE.hits.values()), STATE.count("/img/")

"""The HTTP client in a child process of its own (the default): the bodies that cross the pipe
arrive whole and in their own futures, even while the child is stopped and continued (as a
profiler attaching does); a dropped client's child ends; a child that dies fails the rows that
wait on it, with a reason, instead of hanging the run; a manifest of URLs starts one early."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import threading
import time

import imagegen
import pytest
from conftest import LoopbackServer, convert, row, write_input

from engine.config import FetchOptions
from engine.sources import http_process
from engine.sources.fetch import Fetcher, FetchFailure

BODIES = [imagegen.noise_jpeg((160, 120), seed=i) for i in range(8)]
# over the pipe's buffer: the child's write of one blocks until the parent reads, so a stop
# signal lands in the middle of it (a partial write, which must be carried on, not dropped)
LARGE = [bytes([i]) * (3 << 19) + os.urandom(64) for i in range(3)]


@pytest.fixture(scope="module")
def server():
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            i = int(self.path.rsplit("/", 1)[-1])
            body = LARGE[i % len(LARGE)] if "/large/" in self.path else BODIES[i % len(BODIES)]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = LoopbackServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _child_of(fetcher: Fetcher) -> subprocess.Popen:
    fetcher.submit("http://127.0.0.1:9/warm-up").result(timeout=30)  # port 9: refused at once
    return fetcher._http._link.proc


def test_bodies_arrive_whole_while_the_child_is_stopped_and_continued(server):
    fetcher = Fetcher(FetchOptions(concurrency=32), max_bytes=4 << 20)
    proc = _child_of(fetcher)
    stop = threading.Event()

    def stutter():  # what py-spy's sampling does to the process it reads
        while not stop.is_set():
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(0.002)
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.005)

    thread = threading.Thread(target=stutter, daemon=True)
    thread.start()
    try:
        got, want = [], []
        for start in range(0, 240, 60):
            kind = "large" if start % 120 else "img"
            futures = [fetcher.submit(f"{server}/{kind}/{i}") for i in range(start, start + 60)]
            want += [
                (LARGE if kind == "large" else BODIES)[i % (3 if kind == "large" else 8)]
                for i in range(start, start + 60)
            ]
            for future in futures:
                fetched = future.result(timeout=30)
                got.append(fetched.data)
                fetched.release()
    finally:
        stop.set()
        thread.join()
        os.kill(proc.pid, signal.SIGCONT)
    assert len(got) == len(want) and all(g == w for g, w in zip(got, want, strict=True))
    assert fetcher.max_in_flight >= 1


def test_a_dropped_client_ends_its_child(server):
    fetcher = Fetcher(FetchOptions(concurrency=8), max_bytes=1 << 20)
    proc = _child_of(fetcher)
    fetched = fetcher.submit(f"{server}/img/1").result(timeout=30)
    assert fetched.data == BODIES[1]
    del fetcher, fetched
    gc.collect()
    assert proc.wait(timeout=10) == 0


def test_rows_waiting_on_a_child_that_dies_fail_with_a_reason(server):
    fetcher = Fetcher(FetchOptions(concurrency=8), max_bytes=1 << 20)
    proc = _child_of(fetcher)
    os.kill(proc.pid, signal.SIGSTOP)  # so the requests below are still waiting when it dies
    futures = [fetcher.submit(f"{server}/img/{i}") for i in range(5)]
    proc.kill()
    for future in futures:
        fetched = future.result(timeout=30)
        assert isinstance(fetched.data, FetchFailure)
        assert "HTTP fetch process ended" in fetched.data.reason, fetched.data
    # and a request after its death fails too, at once
    late = fetcher.submit(f"{server}/img/9").result(timeout=30)
    assert isinstance(late.data, FetchFailure)


def test_a_manifest_of_urls_starts_its_child_before_the_run_needs_it(server, tmp_path, monkeypatch):
    spawned: list[subprocess.Popen] = []
    real = http_process._spawn

    def spawn():
        spawned.append(real())
        return spawned[-1]

    monkeypatch.setattr(http_process, "_spawn", spawn)
    rows = [row(f"r{i}", f"{server}/img/{i}", key="image_url") for i in range(6)]
    inp = write_input(tmp_path / "in", rows)
    # options no earlier test used: this run makes its own fetcher, so its own client
    assert convert(inp, tmp_path / "out", "--http-timeout", "27") == 0
    assert len(spawned) == 1 and http_process._SPARE == []  # the early child was the one used
    local = write_input(tmp_path / "in-local", [row("a", "a.jpg")], images={"a.jpg": BODIES[0]})
    assert convert(local, tmp_path / "out-local", "--http-timeout", "26") == 0
    assert len(spawned) == 1  # no URL in the manifest: no child


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_ctrl_c_ends_the_run_and_its_child_with_one_line(tmp_path, runner):
    """Ctrl-C reaches the whole process group: the engine says one line and exits 130 at once,
    not when its running units' requests time out (here 120 s: a wait blocks in steps, since
    the signal may land on any thread), and the child, which leaves the interrupt to its
    parent, ends with it without a traceback of its own."""
    import socket
    import sys

    import psutil
    from conftest import REPO

    listener = socket.socket()  # accepts, reads nothing, never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    rows = [row(f"r{i}", f"http://127.0.0.1:{port}/img/{i}", key="image_url") for i in range(400)]
    inp = write_input(tmp_path / "in", rows)
    # Python's own Ctrl-C handler, even where this test runs with SIGINT ignored (a background job)
    start = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    start += "runpy.run_module('engine', run_name='__main__')"
    argv = [sys.executable, "-c", start, "convert", "--manifest", str(inp.manifest), "--config"]
    argv += [str(inp.config), "--out", str(tmp_path / "out"), "--runner", runner, "--quiet"]
    argv += [
        "--http-total-timeout",
        "120",
        "--http-timeout",
        "120",
        "--http-retries",
        "0",
        "--unit-rows",
        "16",
    ]
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    conns = []
    try:
        listener.settimeout(60)
        conns.append(listener.accept()[0])  # a request is out: the child is fetching
        time.sleep(2)  # the units are waiting for their rows
        children = psutil.Process(proc.pid).children()
        assert [c.cmdline()[-1] for c in children] == ["engine.sources.http_process"]
        os.killpg(proc.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, err = proc.communicate(timeout=100)
        took = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        listener.close()
        for conn in conns:
            conn.close()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["engine: interrupted"], err
    assert took < 30, took  # the bound is a step of 0.25 s; generous slack for a busy machine
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_a_spare_child_the_run_never_needs_ends_quietly(server, tmp_path):
    """A manifest of URLs that a local download cache holds whole: the child started early is
    never given its options, and ends without a word when the run does."""
    import sys

    from conftest import REPO

    rows = [row(f"r{i}", f"{server}/img/{i}", key="image_url") for i in range(4)]
    inp = write_input(tmp_path / "in", rows)
    cache = tmp_path / "cache"
    assert convert(inp, tmp_path / "fill", "--download-cache", str(cache)) == 0
    argv = [sys.executable, "-m", "engine", "convert", "--manifest", str(inp.manifest), "--config"]
    argv += [str(inp.config), "--out", str(tmp_path / "out"), "--runner", "local", "--quiet"]
    argv += ["--download-cache", str(cache)]
    # the child's stderr is this pipe too: communicate() waits until the child has ended
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""

"""Hostile HTTP against a server on 127.0.0.1: redirect loops, connections reset before a
response, dead hosts, and a 5xx that never recovers. Each ends as a fetch failure with a reason,
after bounded retries, and never stalls the run."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler

import imagegen
import pytest
from conftest import LoopbackServer, Output, convert, row, write_input

from engine.config import FetchOptions
from engine.sources.fetch import Fetcher, FetchFailure

GOOD = imagegen.jpeg()


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/reset":  # close the connection without any response
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.connection.close()
        elif self.path == "/always503":
            self.send_response(503)
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(GOOD)


@pytest.fixture(scope="module")
def server():
    httpd = LoopbackServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.jpg"


OPTS = FetchOptions(timeout=2.0, retries=2, total_timeout=10.0)


def test_redirect_loop_is_a_failure(server):
    result = Fetcher(OPTS, 1 << 20).fetch(f"{server}/loop")
    assert isinstance(result, FetchFailure) and "redirect" in result.reason.lower()


def test_reset_connection_is_retried_then_fails(server):
    Handler.hits.pop("/reset", None)
    result = Fetcher(OPTS, 1 << 20).fetch(f"{server}/reset")
    assert isinstance(result, FetchFailure) and "gave up after 3 attempt(s)" in result.reason
    assert Handler.hits["/reset"] == 3  # the first try and exactly two retries


def test_persistent_5xx_is_retried_a_bounded_number_of_times(server):
    Handler.hits.pop("/always503", None)
    result = Fetcher(OPTS, 1 << 20).fetch(f"{server}/always503")
    assert isinstance(result, FetchFailure) and "503" in result.reason
    assert Handler.hits["/always503"] == 3


def test_dead_host_is_a_failure():
    result = Fetcher(OPTS, 1 << 20).fetch(_dead_url())
    assert isinstance(result, FetchFailure) and "ConnectionError" in result.reason


def test_hostile_urls_never_stop_the_run(server, tmp_path):
    rows = [
        row("loop", f"{server}/loop", key="image_url"),
        row("reset", f"{server}/reset", key="image_url"),
        row("dead", _dead_url(), key="image_url"),
        row("s503", f"{server}/always503", key="image_url"),
        row("good", f"{server}/good.jpg", key="image_url"),
    ]
    inp = write_input(tmp_path / "in", rows)
    out = tmp_path / "out"
    assert convert(inp, out, "--http-timeout", "2", "--http-retries", "1") == 0
    o = Output(out)
    assert list(o.by_id()) == ["good"]
    assert {r["image_id"]: r["stage"] for r in o.rejects} == {
        "loop": "fetch",
        "reset": "fetch",
        "dead": "fetch",
        "s503": "fetch",
    }

"""A loopback image server for the HTTP scenarios, run as its own process.

``python -m bench.http_server --root DIR --latency 0.2 --port-file PATH`` serves the files
under DIR (read into memory first) on 127.0.0.1, answering each request after ``--latency``
seconds, as a remote image server would. ``GET /__stats`` returns the number of image requests
and the most that were in flight at once (the concurrency a client reached); ``POST /__reset``
zeroes both. It exits when its parent process does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

# The server stands in for a remote one, whose CPU the client machine does not pay: so it is an
# asyncio protocol that answers from prebuilt bytes (about 40 us of CPU a request, where
# aiohttp's web framework took about 300 us of the same 2 cores; bench/GAP.md).
_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}
MAX_HEAD = 64 * 1024


def _load(root: Path) -> dict[str, bytes]:
    return {"/" + p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _head(status: int, length: int, content_type: bytes, close: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
        status,
        _REASONS[status],
        content_type,
        length,
        b"Connection: close\r\n" if close else b"",
    )


class _Images:
    """The files and the counts (requests, bytes, the most in flight at once)."""

    def __init__(self, root: Path, latency: float):
        self.files, self.latency = _load(root), latency
        self.state = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "bytes": 0}

    def stats(self) -> bytes:
        return json.dumps({**self.state, "cpu_seconds": round(time.process_time(), 3)}).encode()

    def reset(self) -> bytes:
        self.state.update(requests=0, max_in_flight=0, bytes=0)
        return json.dumps(self.state).encode()


class _Connection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests on one connection are answered in order."""

    def __init__(self, images: _Images):
        self.images, self.buf, self.transport = images, b"", None
        self.queue: list[list] = []  # [response or None while its latency runs, close after]

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.close()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            self._request(head)

    def _request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        method, target = (lines[0].split(b" ") + [b"", b""])[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        close = headers.get(b"connection", b"").lower() == b"close" or lines[0].endswith(b"HTTP/1.0")
        path = unquote(target.split(b"?", 1)[0].decode("latin-1"))
        images, slot = self.images, [None, close]
        self.queue.append(slot)
        if path in ("/__stats", "/__reset"):
            body = images.reset() if path == "/__reset" else images.stats()
            slot[0] = (_head(200, len(body), b"application/json", close), body)
            self._flush()
            return
        state = images.state
        state["requests"] += 1
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        body = images.files.get(path) if method in (b"GET", b"HEAD") else None
        status = 200 if body is not None else (404 if method in (b"GET", b"HEAD") else 405)
        if body is None:
            body = b"not found"
        elif method == b"GET":
            state["bytes"] += len(body)
        content_type = b"image/jpeg" if status == 200 else b"text/plain"
        response = (_head(status, len(body), content_type, close), body if method == b"GET" else b"")

        def answer() -> None:
            state["in_flight"] -= 1
            slot[0] = response
            self._flush()

        asyncio.get_running_loop().call_later(images.latency, answer)

    def _flush(self) -> None:
        while self.queue and self.queue[0][0] is not None:
            (head, body), close = self.queue.pop(0)
            if self.transport.is_closing():
                return
            self.transport.write(head)
            if body:
                self.transport.write(body)
            if close:
                self.transport.close()
                return


async def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    raise SystemExit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds before each answer")
    parser.add_argument("--port-file", type=Path, required=True, help="where the chosen port is written")
    args = parser.parse_args()
    parent = os.getppid()

    async def serve() -> None:
        images = _Images(args.root, args.latency)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(images), "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
        await _watch_parent(parent)

    asyncio.run(serve())


@contextmanager
def serving(root: Path, latency: float, workdir: Path):
    """Start the server in a child process; yield its base URL; stop it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"http-port-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.http_server",
            "--root",
            str(root),
            "--latency",
            str(latency),
            "--port-file",
            str(port_file),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bench HTTP server did not start (exit code {proc.poll()})")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{int(port_file.read_text())}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        port_file.unlink(missing_ok=True)


def server_stats(base_url: str, reset: bool = False) -> dict:
    import urllib.request

    req = urllib.request.Request(
        f"{base_url}/__{'reset' if reset else 'stats'}", method="POST" if reset else "GET"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


if __name__ == "__main__":
    main()

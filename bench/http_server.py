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

from aiohttp import web


def _load(root: Path) -> dict[str, bytes]:
    return {"/" + p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def make_app(root: Path, latency: float) -> web.Application:
    files = _load(root)
    state = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "bytes": 0}

    async def image(request: web.Request) -> web.StreamResponse:
        state["requests"] += 1
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            await asyncio.sleep(latency)
            body = files.get(request.path)
            if body is None:
                return web.Response(status=404, text="not found")
            state["bytes"] += len(body)
            return web.Response(body=body, content_type="image/jpeg")
        finally:
            state["in_flight"] -= 1

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**state, "cpu_seconds": round(time.process_time(), 3)})

    async def reset(request: web.Request) -> web.Response:
        state.update(requests=0, max_in_flight=0, bytes=0)
        return web.json_response(state)

    app = web.Application()
    app.router.add_get("/__stats", stats)
    app.router.add_post("/__reset", reset)
    app.router.add_get("/{tail:.*}", image)
    return app


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
        runner = web.AppRunner(make_app(args.root, args.latency), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
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

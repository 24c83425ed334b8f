"""Fetch mechanisms side by side: a thread pool of ``requests`` sessions, one asyncio event loop
with aiohttp, and libcurl's multi interface (pycurl, what the engine uses), fetching the same
URLs from the loopback latency server.

``python -m bench.fetch_mechanisms --n 1000 --latency 0.2 --size 150000`` prints, for each
mechanism and concurrency, the wall time, the requests per second and the client's CPU seconds
per request (what fetching takes away from decoding). The bodies are random bytes: nothing is
decoded, only fetched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.http_server import server_stats, serving


def _threads(urls: list[str], concurrency: int) -> int:
    import requests

    local = threading.local()

    def get(url: str) -> int:
        session = getattr(local, "s", None)
        if session is None:
            session = local.s = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4)
            session.mount("http://", adapter)
        with session.get(url, timeout=30, stream=True) as resp:
            return len(b"".join(resp.iter_content(1 << 16)))

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(get, urls))


def _aiohttp(urls: list[str], concurrency: int) -> int:
    import aiohttp

    async def run() -> int:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def get(url: str) -> int:
                async with session.get(url) as resp:
                    return len(await resp.read())

            return sum(await asyncio.gather(*(get(u) for u in urls)))

    return asyncio.run(run())


def _pycurl(urls: list[str], concurrency: int) -> int:
    import pycurl

    multi, free, pending, total = pycurl.CurlMulti(), [], list(reversed(urls)), 0
    multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, concurrency)
    for _ in range(concurrency):
        handle = pycurl.Curl()
        handle.setopt(pycurl.NOSIGNAL, 1)
        free.append(handle)
    active = 0
    while pending or active:
        while pending and free:
            handle, chunks = free.pop(), []
            handle.setopt(pycurl.URL, pending.pop())
            handle.setopt(pycurl.WRITEFUNCTION, chunks.append)
            handle.chunks = chunks
            multi.add_handle(handle)
            active += 1
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        queued, ok, failed = multi.info_read()
        for handle in ok + [f[0] for f in failed]:
            total += len(b"".join(handle.chunks))
            multi.remove_handle(handle)
            free.append(handle)
            active -= 1
        if not ok and not failed:
            multi.select(1.0)
    return total


MECHANISMS = {"threads+requests": _threads, "asyncio+aiohttp": _aiohttp, "pycurl multi": _pycurl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--size", type=int, default=150_000)
    parser.add_argument("--concurrency", default="64,256")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        for i in range(50):
            (root / f"{i}.bin").write_bytes(os.urandom(args.size))
        with serving(root, args.latency, Path(tmp)) as base:
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                for name, fn in MECHANISMS.items():
                    urls = [f"{base}/{i % 50}.bin?{i}" for i in range(args.n)]
                    server_stats(base, reset=True)
                    cpu, wall = time.process_time(), time.perf_counter()
                    fn(urls, concurrency)
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                    reached = server_stats(base)["max_in_flight"]
                    row = {
                        "mechanism": name,
                        "concurrency": concurrency,
                        "n": args.n,
                        "latency": args.latency,
                        "size": args.size,
                        "wall_seconds": round(wall, 3),
                        "requests_per_second": round(args.n / wall, 1),
                        "client_cpu_ms_per_request": round(1000 * cpu / args.n, 3),
                        "max_in_flight": reached,
                    }
                    results.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

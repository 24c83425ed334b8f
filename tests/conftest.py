"""Shared fixtures: in-memory images, manifest/config writers, the CLI driver, readers for an
output folder, a local HTTP server and a shared Ray instance.

Everything is built from fixed seeds at test time; no binary fixture is committed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Before anything imports datasets/huggingface_hub/ray: no network, no telemetry, and the
# repository importable from Ray worker processes too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
os.environ["no_proxy"] = os.environ["NO_PROXY"]
for _p in (str(REPO), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

import imagegen  # noqa: E402,F401  (re-exported for tests)
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from engine.config import ImageOptions  # noqa: E402
from engine.imaging import configure_pillow  # noqa: E402

# This process does image work as a run's would: Pillow configured once, before any test.
configure_pillow(ImageOptions().max_pixels)

SHARD_NAME = r"(?P<split>[\w.]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet"

SCHEMA = {
    "type": "object",
    "properties": {"price": {"type": "number"}, "currency": {"type": "string"}},
    "required": ["price"],
    "additionalProperties": False,
}
# Written with indentation and non-ASCII text, so a re-serialised copy is told from a byte copy.
CONFIG_BYTES = (
    json.dumps(
        {"instructions": "Extract the price tag — prix en €, s'il vous plaît.", "json_schema": SCHEMA},
        indent=2,
        ensure_ascii=False,
    )
    + "\n"
).encode()
GOOD_OUTPUT = {"price": 1.5, "currency": "EUR"}
GOOD_OUTPUT_COMPACT = '{"price":1.5,"currency":"EUR"}'


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: uses a real Ray instance (one per test module)")
    config.addinivalue_line("markers", "slow: slower end-to-end tests")


# ---------------------------------------------------------------------------------------------
# Input: a folder with images, a manifest and a config
# ---------------------------------------------------------------------------------------------


@dataclass
class InputSet:
    root: Path
    manifest: Path
    config: Path
    lines: list[str] = field(default_factory=list)


def write_input(
    root: Path,
    rows: list,
    images: dict[str, bytes] | None = None,
    config: bytes | dict | None = None,
    manifest_name: str = "manifest.jsonl",
) -> InputSet:
    """Write images (relative path -> bytes), a manifest and a config under `root`.

    A row is a dict (serialised as one JSON line) or a str (written verbatim: bad lines and
    blank lines)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in (images or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    manifest = root / manifest_name
    manifest.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    cfg = root / "config.json"
    if config is None:
        config = CONFIG_BYTES
    cfg.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    return InputSet(root=root, manifest=manifest, config=cfg, lines=lines)


def row(image_id: str, path: str, *, key: str = "image_path", output=GOOD_OUTPUT, **extra) -> dict:
    r = {"image_id": image_id, key: path}
    if output is not None:
        r["output"] = output
    r.update(extra)
    return r


# ---------------------------------------------------------------------------------------------
# Running the CLI
# ---------------------------------------------------------------------------------------------


def run_main(argv: list[str]) -> int:
    """Call engine.cli.main(argv) and return its exit code, whether returned or raised."""
    from engine.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse, --help
        code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def convert(inp: InputSet, out: Path, *extra: str, runner: str = "local", quiet: bool = True) -> int:
    argv = ["convert", "--manifest", str(inp.manifest), "--config", str(inp.config), "--out", str(out)]
    argv += ["--runner", runner]
    if quiet:
        argv.append("--quiet")
    argv += list(extra)
    return run_main(argv)


# ---------------------------------------------------------------------------------------------
# Reading an output folder
# ---------------------------------------------------------------------------------------------


@dataclass
class Output:
    root: Path

    @property
    def shard_files(self) -> list[Path]:
        return sorted((self.root / "data").glob("*.parquet"))

    def shards(self, split: str = "train") -> list[Path]:
        return sorted((self.root / "data").glob(f"{split}-*.parquet"))

    def table(self, split: str = "train"):
        import pyarrow as pa

        files = self.shards(split)
        assert files, f"no {split} shards under {self.root / 'data'}"
        return pa.concat_tables([pq.read_table(f) for f in files])

    def rows(self, split: str = "train") -> list[dict]:
        return self.table(split).to_pylist()

    def by_id(self, split: str = "train") -> dict[str, dict]:
        return {r["image_id"]: r for r in self.rows(split)}

    @property
    def stats(self) -> dict:
        return json.loads((self.root / "stats.json").read_text())

    @property
    def rejects(self) -> list[dict]:
        p = self.root / "rejects.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def rejects_by_id(self) -> dict:
        return {r.get("image_id"): r for r in self.rejects}

    def rejects_by_line(self) -> dict[int, dict]:
        return {r["line"]: r for r in self.rejects}


def parquet_hashes(out: Path) -> dict[str, str]:
    """sha256 of every Parquet shard under ``out/data``, by file name: byte-identity checks."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.parquet"))
    }


def decode(image_struct: dict) -> Image.Image:
    """The stored image of one row, decoded with Pillow (no EXIF transpose)."""
    assert image_struct is not None and image_struct.get("bytes"), f"row has no image bytes: {image_struct!r}"
    im = Image.open(io.BytesIO(image_struct["bytes"]))
    im.load()
    return im


def orientation_tag(im: Image.Image):
    return im.getexif().get(imagegen.ORIENTATION_TAG)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def part_bytes(monkeypatch):
    """The total size of the part files of each run, as its units reported it."""
    import engine.driver

    seen: list[int] = []
    plan = engine.driver.plan_shards

    def spy(results, opts, store):
        seen.append(sum(r.part_bytes for r in results))
        return plan(results, opts, store)

    monkeypatch.setattr(engine.driver, "plan_shards", spy)
    return seen


@pytest.fixture(scope="session")
def convert_help() -> str:
    """The text of `convert --help`, for tests whose option may not exist yet."""
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = run_main(["convert", "--help"])
    assert code == 0
    return buf.getvalue()


def supports(help_text: str, option: str) -> bool:
    import re

    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text) is not None


# --- local HTTP server -----------------------------------------------------------------------

SLOW_SECONDS = 6.0  # how long /slow/ waits before answering; tests pass a much smaller timeout


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder. /slow/<f> answers late, /flaky/<f> fails once with 503 then serves,
    /error500/<f> always answers 500, /redirect/<f> answers 302 to /<f>, /short/<f> sends half
    of <f> under a Content-Length for more; a missing file is a plain 404."""

    flaky_seen: set
    lock: threading.Lock
    requests: list

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        with self.lock:
            self.requests.append(self.path)
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_SECONDS)
            self.path = self.path[len("/slow") :]
        elif self.path.startswith("/error500/"):
            self.send_error(500, "test server error")
            return
        elif self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        elif self.path.startswith("/short/"):
            # promises more bytes than it sends, then closes: a transfer cut off mid-body
            body = (Path(self.directory) / self.path[len("/short/") :]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body) + 5000))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        elif self.path.startswith("/flaky/"):
            with self.lock:
                first = self.path not in self.flaky_seen
                self.flaky_seen.add(self.path)
            if first:
                self.send_error(503, "try again")
                return
            self.path = self.path[len("/flaky") :]
        try:
            super().do_GET()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


class LoopbackServer(ThreadingHTTPServer):
    """A test HTTP server on 127.0.0.1 with a listen backlog as real servers have (nginx: 511).
    http.server's default of 5 drops the handshakes of dozens of connections opened at once,
    and those requests then reach the server seconds later, after the client has retried."""

    request_queue_size = 1024
    daemon_threads = True


@dataclass
class HTTPFolder:
    root: Path
    base_url: str
    requests: list

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("http_root")
    handler = type("Handler", (_Handler,), {"flaky_seen": set(), "lock": threading.Lock(), "requests": []})
    server = LoopbackServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield HTTPFolder(
            root=root, base_url=f"http://127.0.0.1:{server.server_address[1]}", requests=handler.requests
        )
    finally:
        server.shutdown()
        server.server_close()


# --- S3 (moto's server on 127.0.0.1) -----------------------------------------------------------


def moto_s3(bucket: str):
    """A generator for a module-scoped fixture: moto's standalone S3 server on 127.0.0.1 with an
    empty ``bucket`` (moto keeps its buckets per process, so a bucket left by another module is
    emptied), the AWS variables pointing at it, and an s3fs filesystem. Skips without s3fs or moto."""
    import socket

    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)
    fs.mkdir(bucket)
    try:
        yield fs
    finally:
        try:
            fs.rm(bucket, recursive=True)
        except FileNotFoundError:
            pass
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def online(monkeypatch):
    """This machine may run with HF_HUB_OFFLINE=1, which makes datasets refuse every remote URL,
    even our own server on 127.0.0.1: allow them for the read-back only."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False, raising=False)


# --- Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    """One Ray instance for the whole module, with 2 CPUs; the engine reuses it."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # never another process's cluster on this machine
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()

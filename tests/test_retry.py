"""``engine update OUT --retry-rejected``: rows a loopback server failed (503, garbage bytes) in
the first run are fetched again and land at their original place, so the data files are
byte-identical to a fresh ``convert`` against a server that served everything; rows that fail
again stay rejected with an attempt count; exactly once; SIGKILL, then completion."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import imagegen
import pyarrow.parquet as pq
import pytest
from conftest import CONFIG_BYTES, REPO, LoopbackServer, Output, convert, row, run_main, write_input

try:  # object storage through the moto server the update tests use, where s3fs and moto are installed
    from test_update_s3 import s3  # noqa: F401  (a fixture)
except pytest.skip.Exception:
    s3 = None

OPTS = [
    "--shard-rows",
    "4",
    "--row-group-rows",
    "2",
    "--max-size",
    "64",
    "--http-retries",
    "0",
    "--http-timeout",
    "5",
]
DOWN = {"u1.jpg", "u4.jpg", "u7.jpg", "big.jpg"}  # answer 503 in the first run
GARBAGE = {"u9.jpg"}  # answer bytes that are no image in the first run (rejected at decode)


class _Server:
    def __init__(self):
        self.files = {f"u{i}.jpg": imagegen.jpeg((40 + i, 36)) for i in range(12)}
        self.files["big.jpg"] = imagegen.noise_jpeg((200, 150), seed=3)  # re-encoded (over --max-size)
        self.down: set[str] = set()
        self.garbage: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                if name in server.down:
                    self.send_error(503, "test: down for now")
                    return
                if name not in server.files:
                    self.send_error(404, "test: no such file")
                    return
                body = b"not an image at all" * 10 if name in server.garbage else server.files[name]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = LoopbackServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, name="test-retry-http", daemon=True).start()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()


@pytest.fixture(params=["parquet", "arrow"])
def layout(request):
    return request.param


def _rows(url: str) -> list[dict]:
    rows = []
    for i in range(12):
        r = row(
            f"id{i}",
            f"{url}/u{i}.jpg",
            key="image_url",
            output={"price": i + 0.5, "currency": "EUR"},
            barcode=f"{i:013d}",
        )
        if i % 3 == 0:
            r["split"] = "test"
        if i == 4:
            r["shelf"] = "top"  # an extra meta key only a retried row has
        rows.append(r)
    rows.insert(6, row("big", f"{url}/big.jpg", key="image_url"))
    rows.insert(2, row("local", "img/a.jpg"))
    rows.append(row("gone", f"{url}/nope.jpg", key="image_url"))  # 404 every time
    return rows


def _data_files(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and (
            p.suffix in (".parquet", ".arrow")
            or p.name in ("state.json", "dataset_info.json", "dataset_dict.json", "config.json")
        )
    }


def _folder(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _opts(layout: str) -> list[str]:
    return OPTS + (["--layout", "arrow"] if layout == "arrow" else [])


def _made(tmp_path: Path, server: _Server, layout: str):
    inp = write_input(tmp_path / "in", _rows(server.url), {"img/a.jpg": imagegen.jpeg((30, 30))})
    out = tmp_path / "ds"
    server.down, server.garbage = set(DOWN), set(GARBAGE)
    assert convert(inp, out, *_opts(layout)) == 0
    server.down, server.garbage = set(), set()
    return inp, out


def _fresh(tmp_path: Path, inp, layout: str, server: _Server) -> Path:
    """A convert of the same manifest in which every row that can succeed succeeded the first time."""
    server.down, server.garbage = set(), set()
    out = tmp_path / "fresh"
    assert convert(inp, out, *_opts(layout)) == 0
    return out


def _retry(out: Path, *args: str, quiet: bool = True) -> int:
    return run_main(
        ["update", str(out), "--retry-rejected", "--runner", "local", *(["--quiet"] if quiet else []), *args]
    )


def _ids(out: Path, layout: str) -> list[str]:
    if layout == "arrow":
        return [r["image_id"] for r in pq.read_table(out / "row_ids.parquet").to_pylist()]
    return [r["image_id"] for split in ("train", "test") for r in Output(out).rows(split)]


def _check_exactly_once(out: Path, layout: str, num_rows: int) -> None:
    ids = _ids(out, layout)
    rejected = [r["image_id"] for r in Output(out).rejects]
    assert len(ids) == len(set(ids))
    assert not set(ids) & set(rejected)
    stats = Output(out).stats
    assert stats["num_input_rows"] == stats["num_written"] + stats["num_rejected"] == num_rows
    assert stats["num_written"] == len(ids) and stats["num_rejected"] == len(rejected)


def test_retry_puts_rows_at_their_place_equal_to_a_fresh_convert(tmp_path, server, layout):
    inp, out = _made(tmp_path, server, layout)
    first = Output(out).rejects_by_id()
    assert {i for i, r in first.items() if r["stage"] == "fetch"} == {"id1", "id4", "id7", "big", "gone"}
    assert first["id9"]["stage"] == "decode"
    server.requests.clear()
    assert _retry(out, "--stages", "fetch,decode") == 0
    # only the rejected rows were fetched again
    assert sorted(server.requests) == sorted(["u1.jpg", "u4.jpg", "u7.jpg", "big.jpg", "u9.jpg", "nope.jpg"])
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, layout, server))
    rejects = Output(out).rejects
    assert [(r["image_id"], r["stage"], r["attempts"]) for r in rejects] == [("gone", "fetch", 2)]
    assert "404" in rejects[0]["reason"]
    _check_exactly_once(out, layout, 15)
    stats = Output(out).stats
    assert stats["rejected_by_reason"] == {"fetch": 1}
    entry = stats["updates"][-1]
    assert entry["counts"] == {"retried": 6, "written": 5, "rejected_again": 1}
    # stats.json "images" after the retry counts what a fresh convert counts ("big" resized on retry)
    fresh = Output(tmp_path / "fresh").stats["images"]
    assert {k: v for k, v in stats["images"].items() if k != "resized_ids"} == {
        k: v for k, v in fresh.items() if k != "resized_ids"
    }
    assert stats["images"]["resized_ids"] == ["big"] and fresh["resized_ids"] == ["big"]
    assert entry["inputs"]["manifest"]["sha256"] == hashlib.sha256(inp.manifest.read_bytes()).hexdigest()
    if layout == "parquet":  # the retried row's extra meta key is in the schema, its row's value in place
        assert Output(out).by_id("train")["id4"]["meta"]["shelf"] == "top"
    else:
        import datasets

        dd = datasets.load_from_disk(str(out))
        assert dd["train"].num_rows + dd["test"].num_rows == 14


def test_default_stage_is_fetch_and_a_row_failing_again_counts_attempts(tmp_path, server):
    inp, out = _made(tmp_path, server, "parquet")
    server.down = {"u4.jpg"}  # still down
    try:
        assert _retry(out) == 0
    finally:
        server.down = set()
    by_id = Output(out).rejects_by_id()
    assert by_id["id4"]["attempts"] == 2 and "503" in by_id["id4"]["reason"]
    assert "attempts" not in by_id["id9"]  # decode: not retried by default
    assert {"id1", "id7", "big"} <= set(Output(out).by_id("train")) | set(Output(out).by_id("test"))
    assert [r["image_id"] for r in Output(out).rejects] == ["id4", "id9", "gone"]  # line order kept
    _check_exactly_once(out, "parquet", 15)
    assert _retry(out) == 0
    assert Output(out).rejects_by_id().keys() == {"id9", "gone"}  # id4 is served now
    assert Output(out).rejects_by_id()["gone"]["attempts"] == 3  # a 404 row's count goes on
    assert _retry(out, "--stages", "decode") == 0
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, "parquet", server))


def test_nothing_left_to_retry_says_so_and_changes_nothing(tmp_path, server, layout, capsys):
    inp = write_input(tmp_path / "in", _rows(server.url)[:8], {"img/a.jpg": imagegen.jpeg((30, 30))})
    out = tmp_path / "ds"
    server.down = {"u1.jpg"}
    assert convert(inp, out, *_opts(layout)) == 0
    server.down = set()
    assert _retry(out) == 0
    assert Output(out).rejects == []
    before = _folder(out)
    capsys.readouterr()
    assert _retry(out, quiet=False) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert _folder(out) == before


def test_manifest_digest_is_checked_and_a_moved_copy_is_used(tmp_path, server, capsys):
    inp, out = _made(tmp_path, server, "parquet")
    moved = tmp_path / "elsewhere" / "m.jsonl"
    moved.parent.mkdir()
    shutil.copy(inp.manifest, moved)
    before = _folder(out)
    inp.manifest.write_text(inp.manifest.read_text() + json.dumps(row("late", "img/a.jpg")) + "\n")
    capsys.readouterr()
    assert _retry(out) == 2
    err = capsys.readouterr().err
    assert "SHA-256 differs" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    inp.manifest.unlink()
    assert _retry(out) == 2
    assert "--manifest" in capsys.readouterr().err
    assert _folder(out) == before
    assert _retry(out, "--manifest", str(moved)) == 0
    assert Output(out).rejects_by_id().keys() == {"id9", "gone"}
    assert _retry(out, "--stages", "manifest") == 2
    assert _retry(out, "--outputs", str(moved)) == 2
    assert run_main(["update", str(out), "--delete", str(moved), "--stages", "decode", "--quiet"]) == 2


def _retry_subprocess(out: Path, crash_at: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("ENGINE_CRASH_AT", None)
    if crash_at:
        env["ENGINE_CRASH_AT"] = crash_at
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "update",
            str(out),
            "--retry-rejected",
            "--stages",
            "fetch,decode",
            "--runner",
            "local",
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("point", ["update-first-shard", "update-committing"])
def test_sigkill_then_run_again(tmp_path, server, layout, point):
    inp, out = _made(tmp_path, server, layout)
    old = _folder(out)
    killed = _retry_subprocess(out, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _folder(out) == old  # the old dataset, untouched
    again = _retry_subprocess(out, None)
    assert again.returncode == 0, again.stderr
    assert _data_files(out) == _data_files(_fresh(tmp_path, inp, layout, server))
    _check_exactly_once(out, layout, 15)
    assert [r["image_id"] for r in Output(out).rejects] == ["gone"]
    assert not list(tmp_path.glob(".*engine-update*"))


def test_retry_after_a_delete_and_an_add(tmp_path, server, layout):
    """Rows an --add appended stay after the manifest's rows; a deleted row stays deleted."""
    inp, out = _made(tmp_path, server, layout)
    (tmp_path / "d.txt").write_text("id3\nid5\n")
    added = [row("new1", "img/a.jpg", output={"price": 9.0}), row("new2", "img/a.jpg", split="test")]
    add = tmp_path / "in" / "add.jsonl"
    add.write_text("".join(json.dumps(r) + "\n" for r in added))
    assert (
        run_main(["update", str(out), "--delete", str(tmp_path / "d.txt"), "--runner", "local", "--quiet"])
        == 0
    )
    assert run_main(["update", str(out), "--add", str(add), "--runner", "local", "--quiet"]) == 0
    assert _retry(out, "--stages", "fetch,decode") == 0
    rows = [r for r in _rows(server.url) if r["image_id"] not in ("id3", "id5")] + added
    final = write_input(tmp_path / "final", rows, {"img/a.jpg": imagegen.jpeg((30, 30))})
    fresh = tmp_path / "fresh"
    assert convert(final, fresh, *_opts(layout)) == 0
    assert _data_files(out) == _data_files(fresh)
    _check_exactly_once(out, layout, 15)


@pytest.fixture
def bucket(s3):  # noqa: F811
    """moto keeps its buckets per process, and test_s3 creates its bucket itself: leave none behind."""
    try:
        yield s3
    finally:
        import contextlib

        with contextlib.suppress(FileNotFoundError):
            s3.rm("bucket", recursive=True)
        with contextlib.suppress(FileNotFoundError, OSError):
            s3.rmdir("bucket")
        s3.invalidate_cache()


@pytest.mark.skipif(s3 is None, reason="needs s3fs and moto")
def test_retry_on_s3(bucket, server, tmp_path, online):
    s3 = bucket
    from conftest import parquet_hashes
    from test_s3 import _s3_hashes

    inp = write_input(tmp_path / "in", _rows(server.url), {"img/a.jpg": imagegen.jpeg((30, 30))})
    out = "s3://bucket/retry"
    server.down = set(DOWN)
    try:
        assert convert(inp, out, *OPTS) == 0  # type: ignore[arg-type]
    finally:
        server.down = set()
    assert _retry(out) == 0  # type: ignore[arg-type]
    assert not [k for k in s3.find("bucket/retry") if "/.engine" in k]
    assert _s3_hashes(s3, "bucket/retry") == parquet_hashes(_fresh(tmp_path, inp, "parquet", server))
    stats = json.loads(s3.cat_file("bucket/retry/stats.json"))
    assert stats["num_rejected"] == 1 and stats["num_input_rows"] == stats["num_written"] + 1


def test_with_a_download_cache_rows_fetched_before_are_not_downloaded_again(tmp_path, server):
    """A row whose bytes arrived (status 200) but failed later, at decode, is retried from the
    download cache; only the rows that failed at fetch reach the server again."""
    cache = tmp_path / "cache"
    inp = write_input(tmp_path / "in", _rows(server.url), {"img/a.jpg": imagegen.jpeg((30, 30))})
    out = tmp_path / "ds"
    server.down, server.garbage = set(DOWN), set(GARBAGE)
    try:
        assert convert(inp, out, *OPTS, "--download-cache", str(cache)) == 0
        assert Output(out).rejects_by_id()["id9"]["stage"] == "decode"
        server.requests.clear()
        server.down = set()  # the garbage answer stays what the cache holds for u9
        assert _retry(out, "--stages", "fetch,decode") == 0
    finally:
        server.down, server.garbage = set(), set()
    assert "u9.jpg" not in server.requests
    assert sorted(server.requests) == sorted(["u1.jpg", "u4.jpg", "u7.jpg", "big.jpg", "nope.jpg"])
    by_id = Output(out).rejects_by_id()
    assert by_id["id9"]["stage"] == "decode" and by_id["id9"]["attempts"] == 2
    _check_exactly_once(out, "parquet", 15)


def test_retry_refuses_inputs_that_are_not_jsonl(tmp_path, capsys):
    """Rows are rerun by their manifest line: a dataset converted from an image folder, tars, an
    existing dataset or LLaVA JSON gets one line naming why and what to do, exit 2."""
    import webdataset as wds

    good = {"price": 1.5, "currency": "EUR"}
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(imagegen.jpeg((40, 30)))
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.jpg", "output": good}) + "\n"
        + json.dumps({"file_name": "missing.jpg", "output": good}) + "\n"
    )  # fmt: skip
    tars = tmp_path / "shard-000.tar"
    with wds.TarWriter(str(tars)) as w:
        w.write({"__key__": "k0", "jpg": imagegen.jpeg((40, 30)), "json": {"image_id": "k0", "output": good}})
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "x", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}]}]))  # fmt: skip
    config = tmp_path / "config.json"
    config.write_bytes(CONFIG_BYTES)
    common = ["--runner", "local", "--quiet"]
    made = {}
    for kind, where, extra in (
        ("imagefolder", folder, ["--config", str(config)]),
        ("webdataset", tars, ["--config", str(config)]),
        ("llava", llava, ["--base-path", str(folder), "--layout", "arrow"]),
    ):
        made[kind] = tmp_path / f"out-{kind}"
        argv = ["convert", "--manifest", str(where), "--out", str(made[kind]), *extra, *common]
        assert run_main(argv) == 0, kind
    made["parquet"] = tmp_path / "out-parquet"
    argv = ["convert", "--manifest", str(made["imagefolder"]), "--out", str(made["parquet"])]
    assert run_main([*argv, "--config", str(config), *common]) == 0
    capsys.readouterr()
    for kind, out in made.items():
        before = (out / "stats.json").read_bytes()
        assert run_main(["update", str(out), "--retry-rejected", "--quiet"]) == 2, kind
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "reruns rows of a JSONL manifest" in err[0], (kind, err)
        assert f"converted from {kind} input" in err[0] and "convert it again" in err[0], err
        assert (out / "stats.json").read_bytes() == before

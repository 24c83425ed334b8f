"""Fetching images over HTTP from a local server on 127.0.0.1: successes, 404s, server
errors, a non-image answer, a retried transient failure and a timeout."""

from __future__ import annotations

import imagegen
import pytest
from conftest import GOOD_OUTPUT_COMPACT, Output, convert, decode, row, supports, write_input


def _first_supported(help_text: str, *options: str) -> str | None:
    return next((o for o in options if supports(help_text, o)), None)


@pytest.fixture(scope="module")
def fetch_opts(convert_help) -> list[str]:
    """Keep retries short when the CLI lets us (the 500 case retries)."""
    opt = _first_supported(convert_help, "--http-retries", "--retries")
    return [opt, "1"] if opt else []


@pytest.fixture(scope="module")
def served(http_server):
    files = {
        "plain.jpg": imagegen.jpeg(),
        "rot6.jpg": imagegen.oriented(6),
        "sub/dir/cmyk.jpg": imagegen.cmyk_jpeg(),
        "page.html": b"<html><body>not an image</body></html>\n",
    }
    for rel, data in files.items():
        p = http_server.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return http_server


@pytest.fixture(scope="module")
def converted(served, fetch_opts, tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    u = served.url
    rows = [
        row("plain", u("plain.jpg"), key="image_url", barcode="123"),  # 1
        row("rot6", u("rot6.jpg"), key="image_url"),  # 2
        row("missing", u("missing.jpg"), key="image_url"),  # 3
        row("err500", u("error500/plain.jpg"), key="image_url"),  # 4
        row("html", u("page.html"), key="image_url"),  # 5
        row("deep", u("sub/dir/cmyk.jpg"), key="image_url"),  # 6
    ]
    inp = write_input(root / "in", rows, {})
    out = root / "out"
    code = convert(inp, out, *fetch_opts)
    return code, Output(out)


def test_run_finishes(converted, served):
    code, out = converted
    assert code == 0
    assert sorted(out.by_id()) == ["deep", "plain", "rot6"]
    s = out.stats
    assert (s["num_input_rows"], s["num_written"], s["num_rejected"]) == (6, 3, 3)
    assert any(p.startswith("/plain.jpg") for p in served.requests), "the engine never asked the server"


def test_fetched_images_are_processed(converted):
    _, out = converted
    rows = out.by_id()
    for image_id in ("plain", "rot6", "deep"):
        im = decode(rows[image_id]["image"])
        assert im.size == imagegen.UPRIGHT_SIZE, (image_id, im.size)
        assert im.mode == "RGB"
        imagegen.assert_quadrants(im)
    assert rows["plain"]["output"] == GOOD_OUTPUT_COMPACT
    assert rows["plain"]["meta"]["barcode"] == "123"


def test_meta_image_url_and_path(converted, served):
    _, out = converted
    rows = out.by_id()
    assert rows["plain"]["meta"]["image_url"] == served.url("plain.jpg")
    assert rows["deep"]["meta"]["image_url"] == served.url("sub/dir/cmyk.jpg")
    for r in rows.values():
        path = r["image"]["path"]
        assert path is None or ("/" not in path and ":" not in path), (
            f"image.path must be a file name: {path!r}"
        )


@pytest.mark.parametrize(
    "line,image_id,stage",
    [(3, "missing", "fetch"), (4, "err500", "fetch"), (5, "html", "decode")],
)
def test_http_failures_rejected(converted, line, image_id, stage):
    _, out = converted
    rec = out.rejects_by_line().get(line)
    assert rec is not None, f"line {line} missing from rejects.jsonl: {out.rejects}"
    assert (rec["image_id"], rec["stage"]) == (image_id, stage), rec
    if image_id == "missing":
        assert "404" in rec["reason"], f"the reason should carry the HTTP status: {rec['reason']!r}"


def test_transient_error_is_retried(served, fetch_opts, tmp_path):
    """/flaky/ answers 503 once, then the file: a bounded retry must recover it."""
    inp = write_input(tmp_path / "in", [row("flaky", served.url("flaky/rot6.jpg"), key="image_url")], {})
    assert convert(inp, tmp_path / "out", *fetch_opts) == 0
    out = Output(tmp_path / "out")
    assert out.rejects == [], out.rejects
    im = decode(out.by_id()["flaky"]["image"])
    imagegen.assert_quadrants(im)
    assert served.requests.count("/flaky/rot6.jpg") >= 2


def test_timeout_rejected_as_fetch(served, fetch_opts, convert_help, tmp_path):
    opt = _first_supported(convert_help, "--http-timeout", "--timeout", "--fetch-timeout")
    if opt is None:
        pytest.skip(
            "convert has no HTTP timeout option; the engine's default timeout is too long for a unit test"
        )
    rows = [
        row("slow", served.url("slow/plain.jpg"), key="image_url"),
        row("fast", served.url("plain.jpg"), key="image_url"),
    ]
    inp = write_input(tmp_path / "in", rows, {})
    assert convert(inp, tmp_path / "out", opt, "0.5", *fetch_opts) == 0
    out = Output(tmp_path / "out")
    assert sorted(out.by_id()) == ["fast"]
    assert [(r["line"], r["image_id"], r["stage"]) for r in out.rejects] == [(1, "slow", "fetch")]


def test_redirect_and_encoded_urls(served, fetch_opts, tmp_path):
    (served.root / "with space é.jpg").write_bytes(imagegen.oriented(3))
    rows = [
        row("redirected", served.url("redirect/rot6.jpg"), key="image_url"),
        row("encoded", served.url("with%20space%20%C3%A9.jpg"), key="image_url"),
    ]
    inp = write_input(tmp_path / "in", rows, {})
    assert convert(inp, tmp_path / "out", *fetch_opts) == 0
    out = Output(tmp_path / "out")
    assert out.rejects == [], out.rejects
    for r in out.rows():
        im = decode(r["image"])
        assert im.size == imagegen.UPRIGHT_SIZE
        imagegen.assert_quadrants(im)
        path = r["image"]["path"]
        assert path is None or ("/" not in path and ":" not in path), path


def test_transfer_cut_off_mid_body_is_rejected(served, fetch_opts, tmp_path):
    rows = [
        row("short", served.url("short/rot6.jpg"), key="image_url"),
        row("ok", served.url("plain.jpg"), key="image_url"),
    ]
    inp = write_input(tmp_path / "in", rows, {})
    assert convert(inp, tmp_path / "out", *fetch_opts) == 0
    out = Output(tmp_path / "out")
    assert sorted(out.by_id()) == ["ok"], "a short read must never be stored as an image"
    assert [(r["line"], r["image_id"]) for r in out.rejects] == [(1, "short")]
    assert out.rejects[0]["stage"] in ("fetch", "decode"), out.rejects

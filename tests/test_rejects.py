"""Every bad input row ends in rejects.jsonl with its line, stage and reason; the run finishes
and writes the good rows."""

from __future__ import annotations

import json
import subprocess
import sys

import imagegen
import pytest
from conftest import GOOD_OUTPUT_COMPACT, Output, convert, decode, row, run_main, supports, write_input

GOOD_IDS = {"good_a", "good_b", "good_c", "good_d"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("rejects")
    inroot = root / "in"
    images = {
        "img/a.jpg": imagegen.jpeg(),
        "img/b.png": imagegen.png(),
        "img/truncated.jpg": imagegen.truncated_jpeg(),
        "img/empty.jpg": b"",
        "img/text.jpg": b"this is not an image, just some text\n" * 10,
        "img/corrupt.jpg": imagegen.corrupt_jpeg(),
        "img/bomb.png": imagegen.bomb_png(),
        "elsewhere/c.jpg": imagegen.oriented(3),
        "elsewhere/d.jpg": imagegen.oriented(8),
    }
    lines = [
        row("good_a", "img/a.jpg", barcode="first"),  # 1
        "",  # 2 blank
        "not json at all",  # 3
        "[1, 2, 3]",  # 4
        json.dumps({"image_path": "img/a.jpg", "output": {"price": 1}}),  # 5 no image_id
        row("missing", "img/does-not-exist.jpg"),  # 6
        row("truncated", "img/truncated.jpg"),  # 7
        row("empty", "img/empty.jpg"),  # 8
        row("text", "img/text.jpg"),  # 9
        row("corrupt", "img/corrupt.jpg"),  # 10
        row("bomb", "img/bomb.png"),  # 11
        row("bad_json", "img/a.jpg", output="{not json"),  # 12
        row("no_price", "img/a.jpg", output={"currency": "EUR"}),  # 13
        row("price_str", "img/a.jpg", output={"price": "cheap"}),  # 14
        row("good_a", "img/b.png", barcode="second"),  # 15 duplicate
        row("good_b", "img/b.png", output=json.dumps({"price": 1.5, "currency": "EUR"})),  # 16
        "   ",  # 17 whitespace only: blank
        row("good_c", str(inroot / "elsewhere/c.jpg")),  # 18 absolute path
        row("good_d", (inroot / "elsewhere/d.jpg").as_uri(), key="image_url"),  # 19 file:// URL
        '{"image_id": "cut", "image_path": ',  # 20 broken JSON
        "null",  # 21
        {"image_id": "no_location", "output": {"price": 2}},  # 22 nowhere to fetch from
    ]
    inp = write_input(inroot, lines, images)
    out = root / "out"
    code = convert(inp, out)
    return code, Output(out)


EXPECTED = {  # line -> (stage, image_id or None)
    3: ("manifest", None),
    4: ("manifest", None),
    5: ("manifest", None),
    6: ("fetch", "missing"),
    7: ("decode", "truncated"),
    8: ("decode", "empty"),
    9: ("decode", "text"),
    10: ("decode", "corrupt"),
    11: ("decode", "bomb"),
    12: ("validate", "bad_json"),
    13: ("validate", "no_price"),
    14: ("validate", "price_str"),
    15: ("duplicate", "good_a"),
    20: ("manifest", None),
    21: ("manifest", None),
}


def test_run_finishes_with_good_rows(converted):
    code, out = converted
    assert code == 0, "rejects under the default --max-reject-ratio 1.0 must not fail the run"
    assert set(out.by_id()) == GOOD_IDS


@pytest.mark.parametrize("line", sorted(EXPECTED))
def test_reject_stage_and_line(converted, line):
    _, out = converted
    rejects = out.rejects_by_line()
    assert line in rejects, f"line {line} is not in rejects.jsonl (rejected lines: {sorted(rejects)})"
    stage, image_id = EXPECTED[line]
    rec = rejects[line]
    assert rec["stage"] == stage, rec
    if image_id is not None:
        assert rec["image_id"] == image_id, rec
    else:
        assert rec.get("image_id") in (None, ""), rec
    assert isinstance(rec["reason"], str) and rec["reason"].strip(), rec


def test_row_without_location_is_rejected_not_dropped(converted):
    _, out = converted
    rec = out.rejects_by_line().get(22)
    assert rec is not None, "a row with no image_url/image_path must be rejected with its line"
    assert rec["image_id"] == "no_location"


def test_every_line_accounted_for(converted):
    _, out = converted
    rejected_lines = [r["line"] for r in out.rejects]
    assert rejected_lines == sorted(rejected_lines), "rejects.jsonl must be ordered by line"
    assert len(set(rejected_lines)) == len(rejected_lines)
    assert set(rejected_lines) == set(EXPECTED) | {22}
    assert 2 not in rejected_lines and 17 not in rejected_lines, "blank lines are not rows"


def test_stats_balance(converted):
    _, out = converted
    s = out.stats
    assert s["num_input_rows"] == 20, "22 lines of which 2 blank"
    assert s["num_written"] == len(GOOD_IDS)
    assert s["num_rejected"] == 16
    assert s["num_input_rows"] == s["num_written"] + s["num_rejected"]
    by_stage: dict[str, int] = {}
    for r in out.rejects:
        by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + 1
    assert s["rejected_by_reason"] == by_stage
    for key in ("seconds", "images_per_second", "options"):
        assert key in s


def test_duplicate_keeps_first(converted):
    _, out = converted
    first = out.by_id()["good_a"]
    assert first["meta"]["barcode"] == "first"
    assert decode(first["image"]).format == "JPEG", "the kept row must be line 1's image (a JPEG)"


def test_validate_reason_names_the_problem(converted):
    _, out = converted
    assert "price" in out.rejects_by_line()[13]["reason"], "validator message should name the missing field"


def test_good_outputs_are_compact_json(converted):
    _, out = converted
    rows = out.by_id()
    assert rows["good_a"]["output"] == GOOD_OUTPUT_COMPACT
    assert json.loads(rows["good_b"]["output"]) == {"price": 1.5, "currency": "EUR"}


def test_absolute_and_file_url_locations_are_upright(converted):
    _, out = converted
    rows = out.by_id()
    for image_id in ("good_c", "good_d"):
        im = decode(rows[image_id]["image"])
        assert im.size == imagegen.UPRIGHT_SIZE
        imagegen.assert_quadrants(im)


def test_image_path_is_a_bare_file_name(converted):
    _, out = converted
    for r in out.rows():
        path = r["image"]["path"]
        assert path is None or ("/" not in path and "\\" not in path and path.strip()), path


def test_max_reject_ratio_fails_run_but_writes_outputs(tmp_path):
    inp = write_input(
        tmp_path / "in",
        [row("ok1", "a.jpg"), row("gone1", "nope1.jpg"), row("ok2", "a.jpg"), row("gone2", "nope2.jpg")],
        {"a.jpg": imagegen.jpeg()},
    )
    out = tmp_path / "out"
    code = convert(inp, out, "--max-reject-ratio", "0.1")
    assert code == 1, f"50% rejects over --max-reject-ratio 0.1 must exit 1, got {code}"
    o = Output(out)
    assert set(o.by_id()) == {"ok1", "ok2"}
    assert o.stats["num_rejected"] == 2
    assert [r["line"] for r in o.rejects] == [2, 4]
    assert (out / "config.json").exists() and (out / "README.md").exists()


def test_all_rows_rejected_still_finishes(tmp_path):
    inp = write_input(tmp_path / "in", [row("x", "nope.jpg"), "garbage"], {})
    out = tmp_path / "out"
    assert convert(inp, out) == 0
    s = Output(out).stats
    assert (s["num_input_rows"], s["num_written"], s["num_rejected"]) == (2, 0, 2)
    assert [(r["line"], r["stage"]) for r in Output(out).rejects] == [(1, "fetch"), (2, "manifest")]


def test_max_pixels_option(tmp_path, convert_help):
    if not supports(convert_help, "--max-pixels"):
        pytest.skip("convert has no --max-pixels option")
    inp = write_input(
        tmp_path / "in",
        [row("big", "big.jpg"), row("small", "small.jpg")],
        {"big.jpg": imagegen.jpeg((200, 200)), "small.jpg": imagegen.jpeg((50, 50))},
    )
    out = tmp_path / "out"
    assert convert(inp, out, "--max-pixels", "10000") == 0
    o = Output(out)
    assert set(o.by_id()) == {"small"}
    assert [(r["line"], r["stage"], r["image_id"]) for r in o.rejects] == [(1, "decode", "big")]


# --- locations and manifest edge cases -------------------------------------------------------


def test_crlf_manifest(tmp_path):
    inp = write_input(tmp_path / "in", [], {"a.jpg": imagegen.jpeg()})
    lines = [json.dumps(row("a", "a.jpg")), "", "oops", json.dumps(row("b", "a.jpg"))]
    inp.manifest.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    assert convert(inp, tmp_path / "out") == 0
    out = Output(tmp_path / "out")
    assert sorted(out.by_id()) == ["a", "b"]
    assert [(r["line"], r["stage"]) for r in out.rejects] == [(3, "manifest")]
    assert out.stats["num_input_rows"] == 3


def test_manifest_starting_with_a_byte_order_mark(tmp_path):
    """Windows tools start UTF-8 files with a BOM: the first row is read, not rejected, and its id
    still counts for duplicates."""
    inp = write_input(tmp_path / "in", [], {"a.jpg": imagegen.jpeg()})
    lines = [json.dumps(row("a", "a.jpg")), json.dumps(row("b", "a.jpg")), json.dumps(row("a", "a.jpg"))]
    inp.manifest.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    assert convert(inp, tmp_path / "out") == 0
    out = Output(tmp_path / "out")
    assert sorted(out.by_id()) == ["a", "b"]
    assert [(r["line"], r["stage"]) for r in out.rejects] == [(3, "duplicate")]


def test_non_object_lines_name_their_json_type(converted):
    _, out = converted
    rejects = out.rejects_by_line()
    assert rejects[4]["reason"] == "line is an array, not a JSON object", rejects[4]
    assert rejects[21]["reason"] == "line is null, not a JSON object", rejects[21]


def test_unusual_file_names_and_locations(tmp_path, monkeypatch):
    """Spaces and non-ASCII in names; a file:// URL is percent-encoded; the manifest is given
    relative to a working directory other than its own folder."""
    inroot = tmp_path / "in"
    name = "dir with space/café 1.jpg"
    write_input(
        inroot,
        [
            row("rel", name),
            row("abs", str(inroot / name)),
            row("uri", (inroot / name).as_uri(), key="image_url"),
            row("dotdot", "dir with space/../dir with space/café 1.jpg"),
            row("dir", "dir with space"),
        ],
        {name: imagegen.oriented(2)},
    )
    assert "%20" in (inroot / name).as_uri()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = run_main(
        [
            "convert",
            "--manifest",
            "../in/manifest.jsonl",
            "--config",
            "../in/config.json",
            "--out",
            "out",
            "--runner",
            "local",
            "--quiet",
        ]
    )
    assert code == 0
    out = Output(elsewhere / "out")
    assert sorted(out.by_id()) == ["abs", "dotdot", "rel", "uri"]
    for r in out.rows():
        imagegen.assert_quadrants(decode(r["image"]))
        path = r["image"]["path"]
        assert path is None or "/" not in path
    assert [(r["line"], r["image_id"], r["stage"]) for r in out.rejects] == [(5, "dir", "fetch")]


def test_split_name_cannot_escape_the_data_folder(tmp_path):
    inp = write_input(
        tmp_path / "in",
        [row("ok", "a.jpg"), row("evil", "a.jpg", split="../../escaped")],
        {"a.jpg": imagegen.jpeg()},
    )
    out = tmp_path / "out"
    code = convert(inp, out)
    assert code == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet"))
    assert all(p.startswith("out/data/") for p in written), written
    o = Output(out)
    assert "ok" in o.by_id()
    assert [(r["line"], r["image_id"]) for r in o.rejects] == [(2, "evil")], (
        "a row whose split is not a valid split name must be rejected with its line"
    )


def test_duplicate_far_apart_keeps_first(tmp_path):
    """Duplicates are found across work units, not only inside one batch."""
    rows = [row(f"id_{i:03d}", "a.jpg", note=f"n{i}") for i in range(150)]
    rows.append(row("id_000", "a.jpg", note="late"))
    inp = write_input(tmp_path / "in", rows, {"a.jpg": imagegen.jpeg((8, 8))})
    assert convert(inp, tmp_path / "out") == 0
    out = Output(tmp_path / "out")
    assert len(out.rows()) == 150
    assert out.by_id()["id_000"]["meta"]["note"] == "n0"
    assert [(r["line"], r["stage"]) for r in out.rejects] == [(151, "duplicate")]


NOT_IMAGES = {
    "page.html": (b"\n  <!DOCTYPE html>\n<html><body>404</body></html>", "an HTML page"),
    "doc.pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "a PDF document"),
    "draw.svg": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG drawing"),
    "photo.avif": (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), "an AVIF image"),
    "photo.jxl": (b"\xff\x0a" + bytes(64), "a JPEG XL image"),
    "junk.bin": (b"\x00\x01\x02\x03" * 40, "unrecognised format"),
    "bad.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100), "HEIF container"),
}


def test_files_that_are_not_images_say_what_they_are(tmp_path):
    inp = write_input(
        tmp_path / "in",
        [row(name, name) for name in NOT_IMAGES],
        {name: data for name, (data, _) in NOT_IMAGES.items()},
    )
    assert convert(inp, tmp_path / "out") == 0
    out = Output(tmp_path / "out")
    assert out.stats["num_written"] == 0
    reasons = {r["image_id"]: (r["stage"], r["reason"]) for r in out.rejects}
    for name, (_, says) in NOT_IMAGES.items():
        stage, reason = reasons[name]
        assert stage == "decode" and reason.startswith("not an image (") and says in reason, (name, reason)


def test_heif_support_is_loaded_only_for_heif(tmp_path):
    """pillow-heif (50 ms to import) stays out of a run that meets no HEIF file."""
    code = (
        "import sys\n"
        "from engine.config import ImageOptions\n"
        "from engine.imaging import transform_image\n"
        f"assert transform_image({imagegen.jpeg()!r}, ImageOptions()).format == 'jpeg'\n"
        "assert transform_image(b'<html>', ImageOptions()).reason\n"
        "assert 'pillow_heif' not in sys.modules\n"
        f"assert transform_image({imagegen.oriented_heic(1)!r}, ImageOptions()).format == 'jpeg'\n"
        "assert 'pillow_heif' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

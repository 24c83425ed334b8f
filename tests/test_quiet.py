"""``--quiet`` prints nothing, even for files that make Pillow and libtiff complain.

The process's real stderr is captured (a subprocess), so messages written by C libraries, which
no Python-level capture sees, count too. The same messages are there with ``--verbose``, through
logging.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import imagegen
import pytest
from conftest import REPO, TESTS, Output, row, write_input

HOSTILE = TESTS / "data" / "hostile"


def _tiff_with_a_tag_past_its_end() -> bytes:
    """A 1x1 TIFF whose ImageDescription points past the end of the file: Pillow warns
    (``warnings.warn``) while reading its directory."""
    entries = [
        (256, 3, 1, 1),
        (257, 3, 1, 1),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (270, 2, 100, 10_000),
        (273, 4, 1, 0),
        (278, 3, 1, 1),
        (279, 4, 1, 1),
    ]
    pixels_at = 8 + 2 + 12 * len(entries) + 4
    body = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = pixels_at if tag == 273 else value
        body += struct.pack(
            "<HHII" if kind in (2, 4) else "<HHIHH", tag, kind, count, value, *([] if kind in (2, 4) else [0])
        )
    return b"II*\x00" + struct.pack("<I", 8) + body + b"\x00" * 4 + b"\x80"


def _input(tmp_path):
    images = {
        "libtiff.tif": (HOSTILE / "crash-0c7e0e8e11ce787078f00b5b0ca409a167f070e0.tif").read_bytes(),
        "pil-log.tif": (HOSTILE / "oom-225817ca0f8c663be7ab4b9e717b02c661e66834.tif").read_bytes(),
        "pil-warn.tif": _tiff_with_a_tag_past_its_end(),
        "good.jpg": imagegen.jpeg(),
    }
    return write_input(tmp_path / "in", [row(name, name) for name in images], images)


def _run(inp, out, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "engine",
        "convert",
        "--manifest",
        str(inp.manifest),
        "--config",
        str(inp.config),
        "--out",
        str(out),
        "--no-passthrough",
        *extra,
    ]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("runner", ["ray", "local", "ray-workers"])
def test_quiet_prints_nothing(tmp_path, runner):
    """The driver's threads (a small job never starts Ray), the local runner, and Ray's worker
    processes (whose output Ray forwards to the driver's stderr)."""
    inp = _input(tmp_path)
    env = dict(os.environ, ENGINE_RAY_START="eager") if runner == "ray-workers" else None
    proc = _run(inp, tmp_path / "out", "--quiet", "--runner", runner.split("-")[0], "--workers", "2", env=env)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", (proc.stdout, proc.stderr)
    out = Output(tmp_path / "out")
    if runner == "ray-workers":
        assert "driver" not in out.stats["units_by_node"], out.stats["units_by_node"]
    assert list(out.by_id()) == ["good.jpg"]
    assert sorted(r["image_id"] for r in out.rejects) == ["libtiff.tif", "pil-log.tif", "pil-warn.tif"]


def test_verbose_shows_the_libraries_messages_through_logging(tmp_path):
    proc = _run(_input(tmp_path), tmp_path / "out", "--verbose", "--runner", "local")
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG engine.libtiff: error TIFFFillStrip: Read error on strip 0" in proc.stderr, proc.stderr
    assert "DEBUG engine.pillow: UserWarning: " in proc.stderr, proc.stderr

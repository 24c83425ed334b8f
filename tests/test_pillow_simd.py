"""The install script builds Pillow-SIMD last; check that it is the PIL actually imported.

`.venv/pillow-build.txt` is written by the install script: `simd` when the build worked, or
`fallback: <reason>` when it fell back to stock Pillow, then `codecs: ...` and `missing: ...`.
Without the file (an environment made some other way) the running interpreter must still import
Pillow-SIMD.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest
from conftest import REPO

MARKER = REPO / ".venv" / "pillow-build.txt"


def _check_simd_is_imported() -> None:
    import PIL

    try:
        dist = md.distribution("pillow-simd")
    except md.PackageNotFoundError:
        pytest.fail("the pillow-simd distribution is not installed")
    assert dist.version, "pillow-simd has no version"
    pil_init = Path(PIL.__file__).resolve()
    owned = {Path(dist.locate_file(f)).resolve() for f in (dist.files or [])}
    assert pil_init in owned, (
        f"PIL is imported from {pil_init}, which pillow-simd {dist.version} does not own"
    )
    try:
        stock = md.distribution("pillow")
    except md.PackageNotFoundError:
        stock = None
    assert stock is None, (
        f"stock Pillow {stock.version} is installed too; it shares the PIL/ folder with Pillow-SIMD"
    )


def test_pillow_simd_is_the_imported_pil():
    if MARKER.exists():
        status = MARKER.read_text().splitlines()[0].strip()
        if status.startswith("fallback"):
            pytest.skip(
                f"install script fell back to stock Pillow: {status.partition(':')[2].strip() or status}"
            )
        assert status == "simd", f"unexpected {MARKER.name} content: {status!r}"
    _check_simd_is_imported()


def test_the_build_has_the_codecs_users_send_and_records_them():
    """LittleCMS (LAB TIFFs), OpenJPEG (JPEG 2000) and AVIF (native or pillow-avif-plugin) are
    built in, and pillow-build.txt and ``engine --version`` say what the build reads."""
    from engine.versions import codecs, version_line

    have, missing = codecs()
    assert {"jpeg", "png", "webp", "tiff", "jpeg2000", "lcms2", "heif", "avif"} <= set(have), (have, missing)
    assert "codecs: " + " ".join(have) in version_line()
    if MARKER.exists():
        lines = MARKER.read_text().splitlines()
        assert lines[1] == "codecs: " + " ".join(have) and lines[2].startswith("missing: "), lines

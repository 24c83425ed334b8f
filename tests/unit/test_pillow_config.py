"""configure_pillow: importing the engine's image code leaves Pillow's process-wide state alone;
one explicit call sets it (and calling again changes nothing); image work still comes out right
in a fresh process, the isolated re-check's included."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import imagegen

from engine.bounds import transform_isolated
from engine.config import ImageOptions
from engine.imaging import EncodedImage, ImageFailure

_FRESH = textwrap.dedent("""
    import io, json, logging, sys, warnings
    from PIL import Image, ImageFile, TiffImagePlugin

    def state():
        return {"load_truncated": ImageFile.LOAD_TRUNCATED_IMAGES, "max_pixels": Image.MAX_IMAGE_PIXELS,
                "tiff_warnings": type(TiffImagePlugin.warnings).__name__, \
"pil_level": logging.getLogger("PIL").level,
                "showwarning": warnings.showwarning.__module__, \
"filters": [repr(f) for f in warnings.filters]}

    ImageFile.LOAD_TRUNCATED_IMAGES = True  # a library user's own choice, which the import must keep
    pristine = state()
    import engine.imaging as imaging
    imported = state()
    import engine.bounds, engine.driver, engine.inspect.scan, engine.pipeline, engine.update.core
    engine_imported = state()
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    imaging.configure_pillow(500_000_000)
    configured = state()
    imaging.configure_pillow(1_000)  # never lowers the limit; the rest is set once
    imaging.configure_pillow()
    again = state()

    sys.path.insert(0, sys.argv[1])
    import imagegen
    from engine.config import ImageOptions
    rotated = imaging.transform_image(imagegen.oriented(6), ImageOptions(max_size=None))
    upright = Image.open(io.BytesIO(rotated.data))
    imagegen.assert_quadrants(upright)
    exif = Image.Exif()
    exif[imagegen.ORIENTATION_TAG] = 6
    exif[0x010F] = "engine-tests-maker-long-string"
    broken = imagegen.encode(imagegen.quadrant_image((64, 48)), "JPEG", exif=exif.tobytes()[:-4])
    warned = imaging.transform_image(broken, ImageOptions(max_size=None))
    print(json.dumps({"pristine": pristine, "imported": imported, "engine_imported": engine_imported,
                      "configured": configured, "again": again, "rotated": [rotated.width, rotated.height],
                      "rotated_flag": rotated.rotated, "warned": list(warned.warnings)}))
""")


def _fresh() -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(imagegen.__file__.rsplit("/", 1)[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_importing_the_engine_leaves_pillow_alone_and_configure_pillow_sets_it_once():
    doc, stderr = _fresh()
    pristine = doc["pristine"]
    assert doc["imported"] == pristine
    pillow_keys = ("load_truncated", "max_pixels", "tiff_warnings", "pil_level", "showwarning")
    assert {k: doc["engine_imported"][k] for k in pillow_keys} == {k: pristine[k] for k in pillow_keys}
    configured = doc["configured"]
    assert configured["load_truncated"] is False
    assert configured["max_pixels"] == 500_000_000
    assert configured["tiff_warnings"] == "_ThreadWarnings"
    assert (
        configured["pil_level"] == 50
    )  # logging.CRITICAL: Pillow's per-file errors repeat the reject reason
    assert configured["showwarning"] == "engine.libwarnings"
    added = [f for f in configured["filters"] if f not in doc["engine_imported"]["filters"]]
    assert any("DecompressionBombWarning" in f for f in added)
    assert any("image file could not be identified" in f for f in added)
    assert doc["again"] == configured  # idempotent: nothing added twice, the limit never lowered
    # image work in that fresh process: turned upright, and a broken EXIF block counted, not printed
    assert doc["rotated"] == list(imagegen.UPRIGHT_SIZE) and doc["rotated_flag"] is True
    assert doc["warned"] == ["exif_unreadable"]
    assert "Corrupt EXIF" not in stderr


def test_the_isolated_recheck_configures_its_own_process():
    """Its fresh interpreter raises Pillow's limit to the run's --max-pixels, as a unit does: an
    image over Pillow's default limit but under twice the run's gets the engine's own reason."""
    bomb = imagegen.bomb_png(15000)  # 225 Mpx: over twice Pillow's default (179 Mpx), under 2 x 200 Mpx
    result = transform_isolated(bomb, ImageOptions(max_pixels=200_000_000, timeout=30.0))
    assert isinstance(result, ImageFailure), result
    assert result.reason == "15000x15000 = 225,000,000 pixels is over the pixel limit of 200,000,000"
    small = transform_isolated(imagegen.encode(imagegen.quadrant_image(), "PNG"), ImageOptions(timeout=30.0))
    assert isinstance(small, EncodedImage)

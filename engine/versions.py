"""The versions a run records in ``stats.json`` and ``engine --version`` prints."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util

# PIL.features name -> (what users call the format, the library it needs).
_BUILT_IN = {
    "jpg": ("jpeg", "libjpeg"),
    "zlib": ("png", "zlib"),
    "webp": ("webp", "libwebp"),
    "libtiff": ("tiff", "libtiff"),
    "jpg_2000": ("jpeg2000", "OpenJPEG"),
    "littlecms2": ("lcms2", "LittleCMS: LAB TIFFs"),
}


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def codecs() -> tuple[list[str], dict[str, str]]:
    """What the installed Pillow reads (``jpeg``, ``jpeg2000``, ``heif``, ...) and, for each codec it
    lacks, the library that is missing."""
    from PIL import features

    have, missing = [], {}
    for feature, (name, library) in _BUILT_IN.items():
        if features.check(feature):
            have.append(name)
        else:
            missing[name] = f"Pillow built without {library}"
    if importlib.util.find_spec("pillow_heif") is not None:
        have.append("heif")
    else:
        missing["heif"] = "pillow-heif not installed"
    if features.check("avif"):
        have.append("avif")
    elif importlib.util.find_spec("pillow_avif") is not None:
        have.append("avif")  # through pillow-avif-plugin's own libavif
    else:
        missing["avif"] = "Pillow built without libavif and pillow-avif-plugin not installed"
    return have, missing


def versions() -> dict[str, str | bool | list[str] | None]:
    """The engine and the libraries that shape its output; ``pillow_simd`` tells whether
    Pillow-SIMD's build is installed, ``codecs`` what it decodes."""
    import PIL  # the package only, not Image

    return {
        "engine": _version("engine"),
        "pillow": PIL.__version__,
        "pillow_simd": _version("pillow-simd") is not None,
        "codecs": codecs()[0],
        "pyarrow": _version("pyarrow"),
        "datasets": _version("datasets"),
        "ray": _version("ray"),
    }


def version_line() -> str:
    v = versions()
    _, missing = codecs()
    pillow = f"{'Pillow-SIMD' if v['pillow_simd'] else 'Pillow'} {v['pillow']}"
    lacks = "; ".join(f"{name}: {why}" for name, why in missing.items()) or "none"
    return (
        f"engine {v['engine']} ({pillow}, pyarrow {v['pyarrow']}, datasets {v['datasets']}, ray {v['ray']}; "
        f"codecs: {' '.join(v['codecs'])}; missing: {lacks})"
    )

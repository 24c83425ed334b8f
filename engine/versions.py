"""The versions a run records in ``stats.json`` and ``engine --version`` prints."""

from __future__ import annotations

import importlib.metadata as md


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def versions() -> dict[str, str | bool | None]:
    """The engine and the libraries that shape its output; ``pillow_simd`` tells whether
    Pillow-SIMD's build is installed."""
    import PIL  # the package only, not Image

    return {"engine": _version("engine"), "pillow": PIL.__version__,
            "pillow_simd": _version("pillow-simd") is not None, "pyarrow": _version("pyarrow"),
            "datasets": _version("datasets"), "ray": _version("ray")}


def version_line() -> str:
    v = versions()
    pillow = f"{'Pillow-SIMD' if v['pillow_simd'] else 'Pillow'} {v['pillow']}"
    return (f"engine {v['engine']} ({pillow}, pyarrow {v['pyarrow']}, datasets {v['datasets']}, "
            f"ray {v['ray']})")

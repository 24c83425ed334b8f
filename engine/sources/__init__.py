"""Inputs: the Source seam (planning an input into small work-unit descriptors and reading them
back as rows), the sources registered behind it, and fetching images."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import UsageError
from engine.sources.base import ImageInput, InlineImage, ManifestRow, Row, Source, SourcePlan, Unit

if TYPE_CHECKING:
    from engine.config import ConvertOptions

__all__ = [
    "SOURCES",
    "ImageInput",
    "InlineImage",
    "ManifestRow",
    "Row",
    "Source",
    "SourcePlan",
    "Unit",
    "register",
    "source_for",
]

SOURCES: dict[str, type[Source]] = {}  # kind -> class, in registration order (the order detection tries)


def register(cls: type[Source]) -> type[Source]:
    """Add a Source class under its ``kind`` (usable as a class decorator)."""
    SOURCES[cls.kind] = cls
    return cls


def source_for(opts: ConvertOptions) -> Source:
    """The run's input: ``opts.input_format`` when set (a registry key), else the first
    registered class whose ``detect`` is true (those marked ``detect_last`` after the others)."""
    _load_builtin()
    where = opts.manifest
    kind = getattr(opts, "input_format", None)
    if kind:
        cls = SOURCES.get(kind)
        if cls is None:
            raise UsageError(f"--input-format must be one of {', '.join(SOURCES)}, not {kind!r}")
        return cls.from_options(opts)
    for cls in in_detection_order():
        if cls.detect(where):
            return cls.from_options(opts)
    expected = "; ".join(f"{c.expects or c.kind} ({c.kind})" for c in SOURCES.values())
    raise UsageError(
        f"cannot tell what kind of input {where} is; expected one of: {expected} "
        "(or name it with --input-format)"
    )


def detect_kind(where: str) -> str | None:
    """The registry key of the first source whose ``detect`` claims ``where``, or None."""
    _load_builtin()
    return next((cls.kind for cls in in_detection_order() if cls.detect(where)), None)


# Detection tries these first, in this order: tars first (img2dataset's folders also hold .parquet
# side files), then a dataset (its folder may hold a few images), an image folder, LLaVA JSON; other
# sources follow in registration order, detect_last (JSONL, any file) last.
DETECTION_ORDER = ("webdataset", "parquet", "imagefolder", "llava")


def in_detection_order() -> list[type[Source]]:
    rank = {kind: i for i, kind in enumerate(DETECTION_ORDER)}
    return sorted(SOURCES.values(), key=lambda c: (c.detect_last, rank.get(c.kind, len(rank))))


def source_kinds() -> list[str]:
    """The registry keys (the --input-format choices), in detection order."""
    _load_builtin()
    return [c.kind for c in in_detection_order()]


def _load_builtin() -> None:
    """Import the modules that register the built-in sources (not at package import: the
    fetch/http modules live here too and must stay cheap to import). Detection order is
    DETECTION_ORDER, not this order."""
    import engine.sources.dataset  # noqa: F401
    import engine.sources.imagefolder  # noqa: F401
    import engine.sources.jsonl  # noqa: F401
    import engine.sources.llava  # noqa: F401
    import engine.sources.webdataset  # noqa: F401

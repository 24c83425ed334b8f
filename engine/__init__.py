"""engine: streaming conversion of images + JSON annotations into vision-language training data."""

from engine.config import ConvertOptions, FetchOptions, ImageOptions, TaskConfig
from engine.errors import ConfigError, EngineError, UsageError

__all__ = [
    "ConfigError",
    "ConvertOptions",
    "EngineError",
    "FetchOptions",
    "ImageOptions",
    "TaskConfig",
    "UsageError",
    "convert",
]


def convert(opts: ConvertOptions):
    """Run a conversion (see :func:`engine.convert.convert`)."""
    from engine.driver import convert as _convert

    return _convert(opts)

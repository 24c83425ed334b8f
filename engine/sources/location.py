"""Where an input lives: local paths, file:// URLs, http(s):// URLs and any fsspec URL."""

from __future__ import annotations

import os
import posixpath
from urllib.parse import unquote, urlparse


def is_url(location: str) -> bool:
    return "://" in location


def local_path(location: str) -> str | None:
    """The local file path of ``location``, or None when it is remote."""
    if location.startswith("file://"):
        return unquote(urlparse(location).path)
    return None if is_url(location) else location


def parent(location: str) -> str:
    """The folder a location is in (a path or a URL)."""
    path = local_path(location)
    if path is not None:
        return os.path.dirname(os.path.abspath(path))
    return location.rsplit("/", 1)[0]


def resolve(location: str, base: str) -> str:
    """Resolve a manifest's image location against the manifest's folder."""
    if is_url(location) or os.path.isabs(location):
        return location
    if is_url(base):
        return posixpath.join(base, location)
    return os.path.join(base, location)


def open_binary(location: str, mode: str = "rb"):
    """Open a local path directly (fastest) or anything else through fsspec."""
    path = local_path(location)
    if path is not None:
        return open(path, mode)
    import fsspec

    return fsspec.open(location, mode).open()


def exists(location: str) -> bool:
    path = local_path(location)
    if path is not None:
        return os.path.exists(path)
    import fsspec

    fs, p = fsspec.core.url_to_fs(location)
    return fs.exists(p)

"""Safe file names derived from sample ids; they can never name a path outside their folder."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_STEM = 100


def safe_stem(image_id: str) -> str:
    """A file-name stem for ``image_id``: itself when already safe, else a cleaned form plus a
    short hash of the original, so distinct ids keep distinct names."""
    stem = _UNSAFE.sub("_", image_id).lstrip(".")[:MAX_STEM]
    if stem == image_id and stem not in ("", ".", ".."):
        return stem
    digest = hashlib.sha1(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{stem or 'id'}-{digest}"

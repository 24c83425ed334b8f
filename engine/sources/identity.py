"""Row identity, defined once: the id a row has (``row_id``) and which rows repeat an earlier
row's id (``duplicate_lines``). The JSONL planner and ``parse_row`` both use these, so the
duplicates found when planning are exactly the ids the rows turn out to have."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import polars as pl


def is_trainer(obj: dict[str, Any]) -> bool:
    """A trainer-style row (conversations or text + image modalities), not a labelr one."""
    return "modalities" in obj or "conversations" in obj or ("text" in obj and "output" not in obj)


def row_id(obj: dict[str, Any], line: int) -> str | None:
    """The row's id: ``image_id``, or for a trainer-style row without one its ``id`` (else
    ``line-N``); an integer becomes its decimal text. None when the row has no usable id (it is
    then rejected, and claims no id)."""
    image_id = obj.get("image_id")
    if image_id is None and is_trainer(obj):
        image_id = obj.get("id", f"line-{line}")
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        image_id = str(image_id)
    if not isinstance(image_id, str) or not image_id:
        return None
    return image_id


def duplicate_lines(lines: Sequence[int] | np.ndarray, ids: Sequence[str | None] | pl.Series) -> np.ndarray:
    """The sorted lines whose id an earlier line already has (the first occurrence wins; a None
    id claims nothing). ``lines`` need not be sorted, but are unique; ``ids`` may be a polars
    Series (what a planner keeps, rather than a Python object per row)."""
    import polars as pl  # the driver's planner only: workers never import it

    if not len(lines):
        return np.zeros(0, dtype=np.int64)
    ids = ids.rename("id") if isinstance(ids, pl.Series) else pl.Series("id", ids, dtype=pl.String)
    # Sorting 64-bit hashes takes a fraction of the memory of polars' hash tables of the ids;
    # only the few rows whose hash repeats are then compared by id, so a collision is no duplicate.
    hashes = ids.hash().to_numpy()
    order = np.argsort(hashes, kind="stable")
    same = hashes[order[1:]] == hashes[order[:-1]]
    repeats = np.zeros(len(order), dtype=bool)
    repeats[1:] = same
    repeats[:-1] |= same
    candidates = np.sort(order[repeats])
    candidates = candidates[ids.gather(candidates).is_not_null().to_numpy()]
    frame = pl.DataFrame(
        {"line": np.asarray(lines, dtype=np.int64)[candidates], "id": ids.gather(candidates)}
    )
    dup = frame.sort("line").filter(~pl.col("id").is_first_distinct()).get_column("line")
    return dup.to_numpy().astype(np.int64)

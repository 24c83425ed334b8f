"""Counters of a run: merged from the units, with images per second and the invariant
``num_input_rows == num_written + num_rejected``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.records import STAGES


@dataclass
class RunStats:
    num_input_rows: int = 0
    num_written: int = 0
    num_rejected: int = 0
    num_passthrough: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    units_by_node: Counter = field(default_factory=Counter)
    shards_by_node: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)  # kind -> count, from any stage that reports one
    seconds: float = 0.0
    # HTTP fetching, summed over the units (max_* taken as the maximum); empty without URLs
    fetch: dict[str, int] = field(default_factory=dict)

    def add_unit(self, result: Any) -> None:
        self.num_input_rows += result.num_rows
        self.num_written += result.num_written
        self.num_passthrough += result.num_passthrough
        self.rejected_by_reason.update(result.rejected)
        self.warnings.update(getattr(result, "warnings", None) or {})
        self.num_rejected += sum(result.rejected.values())
        self.units_by_node[result.node or "driver"] += 1
        for key, value in (getattr(result, "fetch", None) or {}).items():
            merged = self.fetch.get(key, 0)
            self.fetch[key] = max(merged, value) if key.startswith("max_") else merged + value

    def add_shard(self, result: Any) -> None:
        self.shards_by_node[result.node or "driver"] += 1

    @property
    def images_per_second(self) -> float:
        return self.num_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def reject_ratio(self) -> float:
        return self.num_rejected / self.num_input_rows if self.num_input_rows else 0.0

    def check(self) -> None:
        if self.num_input_rows != self.num_written + self.num_rejected:
            raise AssertionError(
                f"accounting broken: {self.num_input_rows} rows != "
                f"{self.num_written} written + {self.num_rejected} rejected"
            )

    def to_dict(self) -> dict[str, Any]:
        order = {s: i for i, s in enumerate(STAGES)}
        return {
            "num_input_rows": self.num_input_rows,
            "num_written": self.num_written,
            "num_rejected": self.num_rejected,
            "rejected_by_reason": dict(
                sorted(self.rejected_by_reason.items(), key=lambda kv: order.get(kv[0], 99))
            ),
            "num_passthrough": self.num_passthrough,
            "warnings": dict(sorted(self.warnings.items())),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "units_by_node": dict(self.units_by_node),
            "shards_by_node": dict(self.shards_by_node),
            **({"fetch": dict(self.fetch)} if self.fetch else {}),
        }

    def summary(self) -> str:
        parts = [f"{self.num_written:,} of {self.num_input_rows:,} rows written"]
        if self.num_rejected:
            stages = ", ".join(f"{k} {v}" for k, v in self.to_dict()["rejected_by_reason"].items())
            parts.append(f"{self.num_rejected:,} rejected ({stages})")
        parts.append(f"{self.seconds:.1f} s, {self.images_per_second:.1f} img/s")
        if self.fetch.get("num_requests") or self.fetch.get("num_cache_hits"):
            mb = self.fetch.get("num_bytes_downloaded", 0) / 1e6
            hits = (
                f", {self.fetch['num_cache_hits']:,} from the download cache"
                if self.fetch.get("num_cache_hits")
                else ""
            )
            parts.append(f"{mb:,.1f} MB downloaded in {self.fetch.get('num_requests', 0):,} requests{hits}")
        return "; ".join(parts)


# stats.json "images": what was done to each written image, counted per image (resized and
# rotated may both hold; reencoded is neither, a format or mode change), with the ids of the
# first images resized or rotated, in line order (image_id, or image_id[k] in a multi-image row).
IMAGE_KINDS = ("passthrough", "resized", "rotated", "reencoded")
LISTED_IMAGE_IDS = 100  # ids kept per list: enough to look at, small beside any dataset


class ImageTally:
    """The "images" counts of the rows a unit writes, added one row at a time (no bytes kept)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(IMAGE_KINDS, 0)
        self.ids: dict[str, list[str]] = {"resized": [], "rotated": []}

    def add(self, image_id: str, images: Sequence[Any]) -> None:
        for im in images:
            kinds = [k for k in ("resized", "rotated") if getattr(im, k)]
            for k in kinds or ["passthrough" if im.passthrough else "reencoded"]:
                self.counts[k] += 1
        for k, listed in self.ids.items():
            for i, im in enumerate(images):
                if len(listed) < LISTED_IMAGE_IDS and getattr(im, k):
                    listed.append(image_id if len(images) == 1 else f"{image_id}[{i}]")

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts, "resized_ids": self.ids["resized"], "rotated_ids": self.ids["rotated"]}


def merge_image_changes(docs: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Several "images" dicts (units in line order, or a dataset's and a retry's) as one."""
    merged: dict[str, Any] = {**dict.fromkeys(IMAGE_KINDS, 0), "resized_ids": [], "rotated_ids": []}
    for doc in docs:
        for k in IMAGE_KINDS:
            merged[k] += (doc or {}).get(k, 0)
        for k in ("resized_ids", "rotated_ids"):
            merged[k] = (merged[k] + list((doc or {}).get(k, [])))[:LISTED_IMAGE_IDS]
    return merged

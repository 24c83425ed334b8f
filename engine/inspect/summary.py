"""Counts per split and per shard, the first rejects of each stage, and the short text summary
that ``engine inspect`` prints."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import orjson

from engine.inspect.scan import IMAGE_PART, ScanResult
from engine.inspect.source import FS

REJECT_EXAMPLES = 3  # first reasons shown per stage
TEXT_LISTED = 5  # groups or ids the text summary names (the HTML report lists more)


@dataclass(frozen=True)
class FileCount:
    name: str
    split: str
    num_rows: int
    image_bytes: int
    file_bytes: int


@dataclass(frozen=True)
class SplitCount:
    name: str
    num_rows: int
    num_images: int
    image_bytes: int
    file_bytes: int
    files: list[FileCount]


@dataclass(frozen=True)
class Summary:
    layout: str
    num_rows: int
    num_images: int
    splits: list[SplitCount]
    reject_examples: dict[str, list[str]]


def summarise(result: ScanResult, fs: FS) -> Summary:
    ds = result.dataset
    splits = []
    for name, s in result.splits.items():
        files = [
            FileCount(_rel(loc, ds.root), name, c["num_rows"], c["image_bytes"], fs.size(loc))
            for loc, c in s.files.items()
        ]
        splits.append(
            SplitCount(name, s.num_rows, s.num_images, s.image_bytes, sum(f.file_bytes for f in files), files)
        )
    layout = ds.layout
    if layout == "arrow":
        layout = f"packed Arrow (save_to_disk{', ' + ds.variant if ds.variant else ''})"
    else:
        kind = "messages" if ds.variant == "messages" else "LLM image-extraction"
        layout = f"Parquet (engine {kind})" if ds.stats else "Parquet (Hugging Face)"
        if ds.variant == "messages" and not ds.stats:
            layout = "Parquet (Hugging Face, messages)"
    return Summary(
        layout=layout,
        num_rows=sum(s.num_rows for s in splits),
        num_images=sum(s.num_images for s in splits),
        splits=splits,
        reject_examples=_reject_examples(ds.stats, fs),
    )


def _rel(location: str, root: str) -> str:
    return location[len(root) + 1 :] if location.startswith(root + "/") else posixpath.basename(location)


def _reject_examples(stats: dict | None, fs: FS) -> dict[str, list[str]]:
    wanted = set((stats or {}).get("rejected_by_reason") or {})
    examples: dict[str, list[str]] = {}
    if not wanted or not fs.exists("rejects.jsonl"):
        return examples
    with fs.fs.open(posixpath.join(fs.path, "rejects.jsonl"), "rb") as f:
        for line in f:  # streamed: stop once every stage has its examples
            try:
                r = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            got = examples.setdefault(r.get("stage", "?"), [])
            if len(got) < REJECT_EXAMPLES:
                got.append(f"line {r.get('line')} {r.get('image_id') or ''}: {r.get('reason')}")
            if all(len(examples.get(s, [])) >= REJECT_EXAMPLES for s in wanted):
                break
    return examples


def image_changes(stats: dict | None, listed: int) -> list[tuple[str, int, list[str], int]]:
    """stats.json's "images" as (kind, count, first ids, ids not shown) for resized and rotated,
    then passthrough and reencoded (no ids); empty for a dataset without them."""
    images = (stats or {}).get("images")
    if not isinstance(images, dict):
        return []
    rows = []
    for kind in ("resized", "rotated", "passthrough", "reencoded"):
        count = int(images.get(kind, 0))
        ids = [str(i) for i in images.get(f"{kind}_ids", [])][:listed]
        rows.append((kind, count, ids, count - len(ids) if kind in ("resized", "rotated") else 0))
    return rows


def text_summary(result: ScanResult, summary: Summary) -> str:
    leak = result.leakage
    lines = [
        f"{result.dataset.root}: {summary.layout}, {summary.num_rows:,} rows, {summary.num_images:,} images"
    ]
    for s in summary.splits:
        lines.append(
            f"  {s.name}: {s.num_rows:,} rows in {len(s.files)} file(s), {s.file_bytes / 1e6:,.1f} MB"
        )
    lines.append("  formats: " + (", ".join(f"{k} {v:,}" for k, v in result.formats.most_common()) or "none"))
    if result.widths:
        lines.append(
            f"  sizes: width {min(result.widths)}-{max(result.widths)} px, height "
            f"{min(result.heights)}-{max(result.heights)} px"
        )
    if result.schema is not None:
        lines.append(
            f"  outputs: {result.num_invalid_outputs:,} of {result.num_outputs:,} invalid against the schema"
        )
    changes = image_changes(result.dataset.stats, TEXT_LISTED)
    if changes:
        lines.append(
            "  images at convert: " + ", ".join(f"{kind} {count:,}" for kind, count, _, _ in changes)
        )
        for kind, _count, ids, more in changes:
            if ids:
                lines.append(f"    {kind}: {', '.join(ids)}{f' and {more:,} more' if more else ''}")
    if result.num_undecodable:
        lines.append(f"  undecodable images: {result.num_undecodable:,}")
    if result.num_rotated:
        lines.append(f"  images with an EXIF orientation left: {result.num_rotated:,}")
    if result.attachment_token:
        what = "image-part" if result.attachment_token == IMAGE_PART else "attachment-token"
        lines.append(f"  {what} mismatches: {result.num_token_mismatches:,}")
    lines.append(
        f"  exact duplicates ({exact_basis(result)}): {len(leak.exact_cross):,} groups across splits, "
        f"{len(leak.exact_within):,} within a split"
    )
    lines += _listed(leak.exact_cross)
    if leak.near is not None:
        lines.append(f"  near duplicates: {len(leak.near):,} groups, {len(leak.near_cross):,} across splits")
        lines += _listed(leak.near_cross)
    if leak.has_ids:
        lines.append(f"  ids in two splits: {len(leak.shared_ids):,}")
        lines += [f"    {i}: {', '.join(s)}" for i, s in list(leak.shared_ids.items())[:TEXT_LISTED]]
    return "\n".join(lines)


def exact_basis(result: ScanResult) -> str:
    """How the exact duplicates were found, and how many distinct images were decoded for it."""
    if result.leakage.exact_by != "pixels":
        return "by stored bytes"
    if result.num_decoded >= result.num_distinct:
        return f"by pixels; all {result.num_distinct:,} distinct images decoded"
    return (
        f"by pixels; {result.num_decoded:,} of {result.num_distinct:,} distinct images decoded, "
        "the rest have a size no other image has, and no copy"
    )


def _listed(groups) -> list[str]:
    return [
        "    " + ", ".join(f"{s}/{k}" for s, k in g.members[:8]) + (" …" if len(g.members) > 8 else "")
        for g in groups[:TEXT_LISTED]
    ]

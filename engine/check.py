"""``engine check OUT``: is the dataset ready for the Hub and for training? Each problem is one
line naming the files or rows; none means exit 0 (FORMATS.md §3 for the Hub's limits)."""

from __future__ import annotations

import fnmatch
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from engine.errors import ConfigError
from engine.inspect.scan import IMAGE_PART, ScanResult, scan
from engine.inspect.source import FS, Dataset, open_dataset
from engine.progress import NullProgress, Progress

VIEWER_ROW_GROUP_BYTES = 300_000_000  # uncompressed; above it the viewer fails with TooBigContentError
HUB_FILE_BYTES = 20 * 10**9  # recommended maximum file size (50 GB is the hard limit)
HUB_FOLDER_ENTRIES = 10_000
HUB_REPO_FILES = 100_000
LISTED = 10  # rows or ids named per problem line


@dataclass
class CheckResult:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(
    root: str, *, allow_near_duplicates: bool = False, progress: Progress | None = None
) -> CheckResult:
    progress = progress or NullProgress()
    ds, fs = open_dataset(root)
    out = CheckResult()
    if ds.layout == "parquet":
        check_parquet_files(ds, fs, out)
        check_repository(fs, out)
        check_card(ds, fs, out)
    # TRL-style trainers read a messages dataset's own turns, not config.json
    check_config(ds, out, required=ds.layout == "parquet" and ds.variant != "messages")
    result = scan(
        ds,
        fs,
        decode=True,
        phash=True,
        decode_unique_sizes=True,  # "the images decode": every distinct image, none skipped by its size
        samples=0,
        start=lambda total: progress.start(total or 0, "checking", unit="row"),
        progress=lambda n: progress.advance(n, 0),
    )
    progress.close()
    check_training(result, out, allow_near_duplicates)
    return out


def _rel(location: str, fs: FS) -> str:
    return location[len(fs.root) + 1 :] if location.startswith(fs.root + "/") else location


def check_parquet_files(ds: Dataset, fs: FS, out: CheckResult) -> None:
    for f in ds.files:
        name = _rel(f.location, fs)
        with fs.open(f.location) as fh:
            meta = pq.ParquetFile(fh).metadata
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            if rg.total_byte_size > VIEWER_ROW_GROUP_BYTES:
                out.problems.append(
                    f"{name}: row group {i} is {rg.total_byte_size:,} bytes uncompressed, over "
                    f"the Hub viewer's limit of {VIEWER_ROW_GROUP_BYTES:,} (TooBigContentError)"
                )
            missing = [
                rg.column(j).path_in_schema
                for j in range(rg.num_columns)
                if not rg.column(j).has_offset_index
            ]
            if missing:
                out.problems.append(
                    f"{name}: row group {i} has no page index for column(s) {', '.join(missing)} "
                    "(the Hub viewer's scans are limited without one)"
                )
                break
        size = fs.size(f.location)
        if size > HUB_FILE_BYTES:
            out.problems.append(
                f"{name}: {size:,} bytes, over the Hub's recommended {HUB_FILE_BYTES:,} per file"
            )


def check_repository(fs: FS, out: CheckResult) -> None:
    files = [p for p in fs.find("") if not p.startswith(".")]
    if len(files) > HUB_REPO_FILES:
        out.problems.append(
            f"{fs.root}: {len(files):,} files, over the Hub's recommended {HUB_REPO_FILES:,} per repository"
        )
    per_folder = Counter(posixpath.dirname(p) for p in files)
    for folder, count in sorted(per_folder.items()):
        if count > HUB_FOLDER_ENTRIES:
            out.problems.append(
                f"{folder or '.'}/: {count:,} files, over the Hub's recommended "
                f"{HUB_FOLDER_ENTRIES:,} entries per folder"
            )


def check_card(ds: Dataset, fs: FS, out: CheckResult) -> None:
    if ds.card is None:
        out.warnings.append("README.md: no dataset card; the Hub will guess the splits from the file names")
        return
    from huggingface_hub import DatasetCard

    try:
        card = DatasetCard(ds.card, ignore_metadata_errors=False)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several types for bad YAML
        out.problems.append(f"README.md: the card's YAML does not parse: {str(exc).splitlines()[0]}")
        return
    configs = card.data.to_dict().get("configs")
    if not configs:
        out.warnings.append(
            "README.md: the card's YAML has no 'configs'; the Hub will guess the splits from the file names"
        )
        return
    files = {_rel(f.location, fs): f.split for f in ds.files}
    covered: set[str] = set()
    for config in configs:
        entries = config.get("data_files") or []
        if isinstance(entries, (str, dict)):
            entries = [entries]
        for entry in entries:
            split, patterns = (
                ("train", entry)
                if isinstance(entry, str)
                else (entry.get("split", "train"), entry.get("path"))
            )
            for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
                matched = [p for p in files if fnmatch.fnmatch(p, pattern)]
                if not matched:
                    out.problems.append(
                        f"README.md: config {config.get('config_name')!r} split {split!r}: "
                        f"{pattern!r} matches no data file"
                    )
                covered.update(matched)
    for path in sorted(set(files) - covered):
        out.problems.append(f"{path}: not named by any config in README.md, so the Hub ignores it")


def check_config(ds: Dataset, out: CheckResult, required: bool) -> None:
    import orjson

    from engine.config import parse_task_config

    if ds.config is None:
        if ds.config_error:
            out.problems.append(ds.config_error)
        elif required:
            out.problems.append(
                "config.json: missing (trainers read the instructions and json_schema from it)"
            )
        return
    try:
        parse_task_config(orjson.dumps(ds.config))
    except ConfigError as exc:
        out.problems.append(str(exc))


def _rows(items: list[tuple[str, str]], total: int) -> str:
    shown = "; ".join(f"{k}: {r}" for k, r in items[:LISTED])
    return shown + (f"; … ({total - LISTED:,} more)" if total > LISTED else "")


def _members(groups, limit: int = LISTED) -> str:
    shown = " | ".join(", ".join(f"{s}/{k}" for s, k in g.members[:6]) for g in groups[:limit])
    return shown + (f" | … ({len(groups) - limit:,} more groups)" if len(groups) > limit else "")


def check_training(result: ScanResult, out: CheckResult, allow_near_duplicates: bool) -> None:
    if result.num_invalid_outputs:
        out.problems.append(
            f"{result.num_invalid_outputs:,} outputs do not validate against the schema: "
            + _rows(result.invalid_outputs, result.num_invalid_outputs)
        )
    if result.num_undecodable:
        out.problems.append(
            f"{result.num_undecodable:,} images do not decode: "
            + _rows(result.undecodable, result.num_undecodable)
        )
    if result.num_rotated:  # datasets' Image feature applies it on decode, other readers may not
        out.warnings.append(
            f"{result.num_rotated:,} images still carry an EXIF orientation (readers rotate them "
            f"again): {', '.join(result.rotated[:LISTED])}"
        )
    if result.num_token_mismatches:
        out.problems.append(
            f"{result.num_token_mismatches:,} rows' "
            f"{'image parts' if result.attachment_token == IMAGE_PART else 'attachment tokens'} "
            "do not match their images: " + _rows(result.token_mismatches, result.num_token_mismatches)
        )
    leak = result.leakage
    if leak.exact_cross:
        out.problems.append(
            f"{len(leak.exact_cross):,} images are in more than one split (identical pixels): "
            + _members(leak.exact_cross)
        )
    if leak.shared_ids:
        ids = list(leak.shared_ids.items())
        shown = ", ".join(f"{i} ({'+'.join(s)})" for i, s in ids[:LISTED])
        out.problems.append(
            f"{len(ids):,} image_ids are in more than one split: {shown}"
            + (f", … ({len(ids) - LISTED:,} more)" if len(ids) > LISTED else "")
        )
    if leak.near_cross:
        line = (
            f"{len(leak.near_cross):,} groups of near-duplicate images span more than one split: "
            + _members(leak.near_cross)
        )
        (out.warnings if allow_near_duplicates else out.problems).append(line)
    if leak.exact_within:
        out.warnings.append(
            f"{len(leak.exact_within):,} groups of identical images within a split: "
            + _members(leak.exact_within)
        )
    if leak.repeated_ids:
        out.warnings.append(
            f"{len(leak.repeated_ids):,} image_ids repeated within a split: "
            + ", ".join(list(leak.repeated_ids)[:LISTED])
        )

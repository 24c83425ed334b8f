"""One check for every tool's output.

A tool's output is valid when its row count equals the corpus's number of valid images and
every sampled image decodes with its longest side at most ``max_size``. Whether the sampled
pixels are upright (their aspect matches the EXIF-corrected size) is recorded too, as
information: it is the bug this project exists to avoid, but it is not part of validity.

Layouts understood: Parquet under ``OUT/data/`` (engine, ``datasets``, Ray Data, img2dataset),
``save_to_disk`` Arrow streams (a folder with ``state.json``), and the ``limit`` tool's
``result.json`` + ``samples/``.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bench.corpora import Corpus

log = logging.getLogger(__name__)

NUM_SAMPLES = 20


@dataclass
class CheckResult:
    valid: bool
    num_rows: int
    expected_rows: int
    num_sampled: int = 0
    max_side: int = 0
    num_upright: int = 0
    num_upright_known: int = 0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _arrow_tables(out: Path) -> list[pa.Table]:
    tables = []
    for path in sorted(out.rglob("*.arrow")):
        with pa.memory_map(str(path)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return tables


def _parquet_tables(out: Path) -> list[pa.Table]:
    return [pq.read_table(path) for path in sorted((out / "data").rglob("*.parquet"))]


def _image_bytes(table: pa.Table) -> tuple[list[bytes | None], list[str | None]]:
    """Per row: the encoded image (None where the tool recorded a failure) and the id."""
    names = table.column_names
    ids = table.column("image_id").to_pylist() if "image_id" in names else [None] * len(table)
    if "modalities" in names:
        images, stems = [], []
        for mods in table.column("modalities").to_pylist():
            values = [m["value"] for m in mods or [] if m.get("type") == "image"]
            value = values[0] if values else None
            images.append(value.get("bytes") if isinstance(value, dict) else value)
            path = value.get("path") if isinstance(value, dict) else None
            stems.append(Path(path).stem if path else None)
        # the packed layout has no id column; its image path is named after the id
        return images, (ids if "image_id" in names else stems)
    if "jpg" in names:  # img2dataset: failed rows are kept with status != success
        images = table.column("jpg").to_pylist()
        if "status" in names:
            images = [
                img if status == "success" else None
                for img, status in zip(images, table.column("status").to_pylist())
            ]
        return images, ids
    column = table.column("image")
    if pa.types.is_struct(column.type):
        return [v["bytes"] if v else None for v in column.to_pylist()], ids
    return column.to_pylist(), ids


def _ids_in_line_order(out: Path, manifest: Path) -> list[str]:
    """The ids of the rows an engine wrote: its manifest's, in line order, less the lines in its
    rejects.jsonl. The packed raw-image rows carry no id (the trainer recipe's struct has no file
    name), and the engine writes rows in line order."""
    rejects = out / "rejects.jsonl"
    text = rejects.read_text() if rejects.exists() else ""
    rejected = {json.loads(line)["line"] for line in text.splitlines() if line.strip()}
    ids = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and number not in rejected:
            row = json.loads(line)
            ids.append(str(row.get("image_id", row.get("id"))))
    return ids


def _collect(out: Path, manifest: Path | None = None) -> tuple[int, list[tuple[str | None, bytes]]]:
    """Number of rows with an image, and up to NUM_SAMPLES (id, bytes) samples."""
    result = out / "result.json"
    if result.exists():  # the limit tool
        doc = json.loads(result.read_text())
        num_rows = doc["num_rows"]
        if "num_bytes_written" in doc:  # limit-write: what it says it wrote is on disk
            on_disk = sum(p.stat().st_size for p in (out / "written").iterdir())
            if on_disk != doc["num_bytes_written"] or (num_rows and not on_disk):
                raise ValueError(
                    f"written/ holds {on_disk:,} bytes, the tool reports {doc['num_bytes_written']:,}"
                )
        samples = [(p.stem, p.read_bytes()) for p in sorted((out / "samples").iterdir())]
        return num_rows, samples[:NUM_SAMPLES]
    tables = _arrow_tables(out) if any(out.rglob("state.json")) else _parquet_tables(out)
    images, ids = [], []
    for table in tables:
        table_images, table_ids = _image_bytes(table)
        images += table_images
        ids += table_ids
    if images and not any(ids) and manifest is not None and (out / "stats.json").exists():
        by_line = _ids_in_line_order(out, manifest)
        ids = by_line if len(by_line) == len(images) else ids
    present = [(i, img) for i, img in zip(ids, images) if img is not None]
    step = max(1, len(present) // NUM_SAMPLES)
    return len(present), present[::step][:NUM_SAMPLES]


def check_output(
    out: Path, corpus: Corpus, *, max_size: int = 1024, expected_rows: int | None = None
) -> CheckResult:
    expected = corpus.num_valid if expected_rows is None else expected_rows
    try:
        num_rows, samples = _collect(out, corpus.manifest)
    except Exception as err:  # noqa: BLE001 - an unreadable output is an invalid output
        return CheckResult(False, 0, expected, problems=[f"unreadable output: {err}"])
    check = CheckResult(True, num_rows, expected, num_sampled=len(samples))
    if num_rows != expected:
        check.problems.append(f"{num_rows} rows, expected {expected}")
    if not samples and expected:
        check.problems.append("no image could be sampled")
    for image_id, data in samples:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size = im.size
        except Exception as err:  # noqa: BLE001
            check.problems.append(f"{image_id}: does not decode: {err}")
            continue
        check.max_side = max(check.max_side, *size)
        if max(size) > max_size:
            check.problems.append(f"{image_id}: {size[0]}x{size[1]} exceeds {max_size}")
        upright = corpus.upright_sizes.get(image_id) if image_id else None
        if upright:
            check.num_upright_known += 1
            check.num_upright += (upright[0] >= upright[1]) == (size[0] >= size[1])
    check.valid = not check.problems
    if not check.valid:
        log.warning("invalid output in %s: %s", out, "; ".join(check.problems[:3]))
    return check

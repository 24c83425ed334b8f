"""``OUT/.engine``, the work folder of a conversion (or an update) in progress: its one owner.

It holds each unit's part file, rejects and result (the checkpoint a resumed run trusts), the
run's fingerprint (``run.json``), temporary files and ``engine update``'s edits. It exists from
the start of a run until the dataset's stats.json is written, so a folder with stats.json and no
work folder is a finished dataset.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from engine.config import ConvertOptions, FetchOptions, ImageOptions, TaskConfig
from engine.errors import UsageError
from engine.sources import location

if TYPE_CHECKING:
    from engine.sinks.store import Store

log = logging.getLogger(__name__)
WORK_DIR = ".engine"  # scratch space inside OUT: parts, checkpoints, temporary files
PARTS_DIR = f"{WORK_DIR}/parts"
TMP_DIR = f"{WORK_DIR}/tmp"  # where a local file is written before its rename into place
RUN_FILE = f"{WORK_DIR}/run.json"
EDITS_DIR = f"{WORK_DIR}/edits"  # engine update: the rewritten pieces of old shards
RETRY_MANIFEST = f"{WORK_DIR}/retry-manifest.jsonl"  # engine update --retry-rejected: the rows to redo


@dataclass(slots=True)
class UnitResult:
    """What one unit produced: its checkpoint (``to_json``), written last by the unit."""

    index: int
    num_rows: int
    num_written: int
    num_passthrough: int
    rejected: dict[str, int]
    meta_keys: tuple[str, ...]  # extra meta keys seen (beyond the fixed ones)
    text_columns: tuple[str, ...]  # packed layout: 'conversations' and/or 'text' seen
    sizes: dict[str, np.ndarray]  # split -> byte size of every written row, in line order
    part: str | None
    rejects: str | None
    seconds: float
    part_bytes: int | None = None  # sizes of the unit's files, checked when resuming
    rejects_bytes: int | None = None
    node: str | None = field(default=None)
    warnings: dict[str, int] = field(default_factory=dict)  # kind -> images written despite it
    fetch: dict[str, int] | None = None  # what fetching cost over HTTP (FetchTally), when it was used
    images: dict | None = None  # stats.json "images" of this unit (engine.stats.image_changes)

    def to_json(self) -> bytes:
        doc = {k: getattr(self, k) for k in self.__slots__}
        doc["sizes"] = {k: v.tolist() for k, v in self.sizes.items()}
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, raw: bytes) -> UnitResult:
        doc = orjson.loads(raw)
        doc["sizes"] = {k: np.asarray(v, dtype=np.int64) for k, v in doc["sizes"].items()}
        doc["meta_keys"], doc["text_columns"] = tuple(doc["meta_keys"]), tuple(doc["text_columns"])
        return cls(**doc)


def unit_paths(index: int) -> tuple[str, str, str]:
    """The unit's part file, its rejects, and its result (paths relative to OUT): the checkpoint a
    resumed run trusts."""
    stem = f"{PARTS_DIR}/unit-{index:06d}"
    return stem + ".arrow", stem + ".rejects.jsonl", stem + ".json"


def load_unit_result(store: Store, index: int) -> UnitResult | None:
    """The result of a unit that completed in an earlier run, or None (then it is redone).

    Scratch files are not fsynced (see ``Store.writing``), so after a power loss a checkpoint
    may be empty or name a part file that came back short: the checkpoint must parse and
    every file it names must have exactly the recorded size."""
    part, _, result = unit_paths(index)
    try:
        done = UnitResult.from_json(store.read_bytes(result))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):  # empty or torn checkpoint
        log.warning("unit %d: unreadable checkpoint; redoing the unit", index)
        return None
    recorded = {part: done.part_bytes}
    if done.rejects is not None:
        recorded[done.rejects] = done.rejects_bytes
    for path, size in recorded.items():
        if size is None or store.size(path) != size:
            log.warning("unit %d: %s missing or not the recorded size; redoing the unit", index, path)
            return None
    return done


def make(store: Store) -> None:
    """Create the work folder (and its parts folder)."""
    store.make_dirs(PARTS_DIR)


def remove(store: Store) -> None:
    """Drop the work folder: the run is complete (its stats.json is written)."""
    store.remove(WORK_DIR)


def in_progress(store: Store) -> bool:
    """A conversion or update started in this folder and has not finished."""
    return store.exists(WORK_DIR)


def prepare_out(store: Store, overwrite: bool, resume: bool) -> None:
    """Check the output folder is free (or may be replaced, or resumed), and make it so."""
    clear_out(store, check_out(store, overwrite, resume))


def check_out(store: Store, overwrite: bool, resume: bool) -> list[str]:
    """Check the output folder is free (or may be replaced, or resumed); returns the entries
    that ``clear_out`` removes (what --overwrite replaces)."""
    if not store.remote and os.path.exists(store.root) and not os.path.isdir(store.root):
        raise UsageError(f"--out {store.root} exists and is not a folder")
    entries = store.entries()
    if not entries or resume:
        if resume and entries and WORK_DIR not in entries:
            raise UsageError(f"cannot resume: {store.root} holds no interrupted run (no {WORK_DIR}/ folder)")
        return []
    if not overwrite:
        raise UsageError(
            f"output folder {store.root} is not empty; pass --overwrite to replace its contents, "
            "or --resume to finish an interrupted run"
        )
    return entries


def clear_out(store: Store, entries: list[str]) -> None:
    """Remove what ``check_out`` returned and create the work folder."""
    for entry in entries:
        store.remove(entry)
    make(store)


def is_finished(store: Store) -> bool:
    """stats.json is written last and the work folder removed after it: both say 'done'."""
    return store.is_file("stats.json") and not store.exists(WORK_DIR)


def run_state(
    store: Store, opts: ConvertOptions, task: TaskConfig | None, manifest_sha256: str, unit_rows: int
) -> int:
    """Record (or, when resuming, check) what this run produces; returns the unit size to use.

    A resumed run must produce the same dataset: same output-defining options, same manifest
    and config bytes. The unit size is kept, so completed units line up with the plan.
    """
    fingerprint = run_fingerprint(opts, task, manifest_sha256)
    if store.exists(RUN_FILE):
        previous = orjson.loads(store.read_bytes(RUN_FILE))
        if previous["fingerprint"] != fingerprint:
            changed = sorted(_differences(previous["fingerprint"], fingerprint))
            raise UsageError(
                f"cannot resume: this run differs from the interrupted one in {', '.join(changed)}; "
                "resuming would mix two datasets (use --overwrite to start again)"
            )
        return int(previous["unit_rows"])
    store.write_bytes(
        RUN_FILE,
        orjson.dumps({"fingerprint": fingerprint, "unit_rows": unit_rows}, option=orjson.OPT_INDENT_2),
    )
    return unit_rows


def run_fingerprint(opts: ConvertOptions, task: TaskConfig | None, manifest_sha256: str) -> dict[str, Any]:
    """What decides the dataset's content: the output-defining options and the inputs' bytes."""
    fingerprint = {
        "options": opts.output_defining(),
        "manifest_sha256": manifest_sha256,
        "config_sha256": hashlib.sha256(task.raw).hexdigest() if task else None,
    }
    return orjson.loads(orjson.dumps(fingerprint))


def check_finished_matches(
    store: Store, opts: ConvertOptions, task: TaskConfig | None, manifest_sha256: str | None = None
) -> dict[str, Any]:
    """``--resume`` on a finished output: its stats, if it is the dataset this run would make;
    otherwise a usage error naming what differs, so the user never takes the old dataset for
    the one they asked for. ``manifest_sha256``: the input's (``Source.sha256``), else the
    manifest file's bytes are hashed here."""
    stats = orjson.loads(store.read_bytes("stats.json"))
    if manifest_sha256 is None:
        digest = hashlib.sha256()
        with location.open_binary(opts.manifest) as f:
            while block := f.read(2**20):
                digest.update(block)
        manifest_sha256 = digest.hexdigest()
    fingerprint = run_fingerprint(opts, task, manifest_sha256)
    # an output from before fingerprints were kept in stats.json: compare its resolved options
    previous = stats.get("fingerprint") or {
        **fingerprint,
        "options": _output_defining(stats.get("options", {})),
    }
    for doc in (previous, fingerprint):  # a finished dataset may have been moved: still the same one
        doc["options"].pop("out", None)
    changed = sorted(_differences(previous, fingerprint))
    if changed:
        raise UsageError(
            f"cannot resume: {opts.out} is a finished dataset made with a different {', '.join(changed)}; "
            "use --overwrite to replace it"
        )
    return stats


def _output_defining(options: dict[str, Any]) -> dict[str, Any]:
    """The output-defining part of a stats.json's resolved options. An option the older engine
    did not have is None, so it shows as a difference: that engine wrote without it."""
    try:
        doc = ConvertOptions(
            **{
                **options,
                "image": ImageOptions(**options["image"]),
                "fetch": FetchOptions(**options["fetch"]),
            }
        ).output_defining()
    except (TypeError, KeyError, UsageError):  # options this engine cannot read
        return options
    for key, value in doc.items():
        if key not in options:
            doc[key] = None
        elif isinstance(value, dict):
            doc[key] = {k: v if k in options[key] else None for k, v in value.items()}
    return doc


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(root)"]

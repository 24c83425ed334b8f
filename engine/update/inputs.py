"""What an update is given: its options, the updates file, the ids to delete, and the digest
of all of it (recorded in the dataset's history, and how a re-run knows it was applied)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.errors import UsageError
from engine.sources import location
from engine.sources.jsonl import BOM


@dataclass(frozen=True, kw_only=True)
class UpdateOptions:
    out: str
    outputs: str | None = None  # JSONL of image_id + output
    delete: str | None = None  # ids, one a line, or JSONL with image_id
    add: str | None = None  # a manifest of new rows
    replace: bool = False  # --add rows whose id exists replace the old row
    config: str | None = None  # a new config.json
    drop_invalid: bool = False  # with --config: drop the rows the new schema refuses
    show_diff: bool = False
    split: str | None = None  # only this split's rows (and the default split of --add rows)
    resume: bool = False
    workers: int | None = None
    runner: str = "ray"
    quiet: bool = False
    retry_rejected: bool = False  # run the rejected rows at `stages` again
    stages: tuple[str, ...] = ("fetch",)
    manifest: str | None = None  # with --retry-rejected: a moved copy of the dataset's manifest

    def __post_init__(self) -> None:
        if self.retry_rejected:
            if self.outputs or self.delete or self.add or self.config or self.show_diff or self.split:
                raise UsageError("--retry-rejected runs alone: give the other changes in a separate update")
            return
        if self.manifest or self.stages != ("fetch",):
            raise UsageError("--manifest and --stages apply with --retry-rejected only")
        if not (self.outputs or self.delete or self.add or self.config):
            raise UsageError(
                "nothing to update: give --outputs, --delete, --add and/or --config, or --retry-rejected"
            )
        if self.drop_invalid and not self.config:
            raise UsageError("--drop-invalid applies with --config only")
        if self.replace and not self.add:
            raise UsageError("--replace applies with --add only")


@dataclass(frozen=True, slots=True)
class OutputLine:
    line: int
    image_id: str
    output: Any  # a string, or a JSON value serialised as convert does


@dataclass
class Inputs:
    outputs: dict[str, OutputLine] = field(default_factory=dict)  # last line per id
    outputs_repeated: int = 0  # lines overridden by a later line for the same id
    delete: list[str] = field(default_factory=list)
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> {path, sha256}
    digest: str = ""


def _read(path: str, what: str) -> bytes:
    try:
        with location.open_binary(path) as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _lines(raw: bytes):
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.strip()
        if line:
            yield number, line


def _image_id(obj: dict, where: str) -> str:
    image_id = obj.get("image_id")
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        image_id = str(image_id)
    if not isinstance(image_id, str) or not image_id:
        raise UsageError(f"{where}: no 'image_id' (a non-empty string)")
    return image_id


def parse_outputs(raw: bytes, name: str) -> tuple[dict[str, OutputLine], int]:
    """image_id + output lines; a malformed line is a usage error naming it. The last line per id wins."""
    found: dict[str, OutputLine] = {}
    repeated = 0
    for number, line in _lines(raw):
        where = f"{name} line {number}"
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where} is not a JSON object")
        image_id = _image_id(obj, where)
        if "output" not in obj:
            raise UsageError(f"{where}: no 'output'")
        repeated += image_id in found
        found[image_id] = OutputLine(number, image_id, obj["output"])
    return found, repeated


def parse_delete(raw: bytes, name: str) -> list[str]:
    ids = []
    for number, line in _lines(raw):
        if line.startswith(b"{"):
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise UsageError(f"{name} line {number} is not valid JSON: {exc}") from None
            ids.append(_image_id(obj, f"{name} line {number}"))
        else:
            try:
                ids.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise UsageError(f"{name} line {number} is not valid UTF-8") from None
    return ids


def read_inputs(opts: UpdateOptions) -> Inputs:
    """Read and check every input before anything is touched."""
    inputs = Inputs()
    digest = hashlib.sha256()
    for role, path in (
        ("outputs", opts.outputs),
        ("delete", opts.delete),
        ("add", opts.add),
        ("config", opts.config),
    ):
        if not path:
            continue
        raw = _read(
            path,
            {"outputs": "updates file", "delete": "ids file", "add": "manifest", "config": "config"}[role],
        )
        sha = hashlib.sha256(raw).hexdigest()
        inputs.files[role] = {
            "path": os.path.basename(path.rstrip("/")) if "://" not in path else path,
            "sha256": sha,
        }
        digest.update(f"{role}:{sha}\n".encode())
        name = os.path.basename(path)
        if role == "outputs":
            inputs.outputs, inputs.outputs_repeated = parse_outputs(raw, name)
        elif role == "delete":
            inputs.delete = parse_delete(raw, name)
        elif role == "add" and not any(True for _ in _lines(raw)):
            raise UsageError(f"manifest {path} has no rows")
    digest.update(
        orjson.dumps({"replace": opts.replace, "drop_invalid": opts.drop_invalid, "split": opts.split})
    )
    inputs.digest = digest.hexdigest()
    return inputs

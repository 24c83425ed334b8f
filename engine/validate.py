"""Validate each ``output`` against the task's JSON schema.

The schema is compiled once per worker process (``jsonschema-rs``: about 1.9 million checks/s
per core here, against about 8,500/s for a reused ``jsonschema`` validator). ``jsonschema``
(Python) is used once, on the driver, for its readable meta-schema errors.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
import orjson


def check_schema(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a usable JSON Schema, or None. Draft 2020-12 unless ``$schema`` says."""
    import jsonschema
    from jsonschema.validators import validator_for

    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"{exc.message} (at {where})"
    try:
        jsonschema_rs.validator_for(schema, validate_formats=True)
    except Exception as exc:  # noqa: BLE001 - e.g. an unparsable regex
        return str(exc).splitlines()[0]
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    output: str | None  # compact JSON when valid
    reason: str | None  # why not, when invalid


class OutputValidator:
    """A compiled validator; ``check`` serialises compactly and validates one output."""

    def __init__(self, schema: dict[str, Any]):
        self._validator = jsonschema_rs.validator_for(schema, validate_formats=True)

    def check(self, output: Any, max_bytes: int | None = None) -> Verdict:
        if output is None:
            return Verdict(None, "missing 'output'")
        if isinstance(output, str):
            if max_bytes is not None and len(output) > max_bytes:
                return Verdict(None, f"output is {len(output):,} characters, over the limit of {max_bytes:,}")
            try:
                value = _loads(output)
            except ValueError as exc:
                return Verdict(None, f"output is not valid JSON: {exc}")
        else:
            value = output
        text = _dumps(value)
        if max_bytes is not None and len(text) > max_bytes:
            return Verdict(None, f"output is {len(text):,} bytes, over the limit of {max_bytes:,}")
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.instance_path) or "(root)"
            return Verdict(None, f"schema violation at {where}: {error.message}")
        return Verdict(text, None)


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "64-bit" not in str(exc):
            raise ValueError(str(exc)) from None
        return json.loads(text)  # integers beyond 64 bits: the stdlib parser keeps them exact


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@functools.lru_cache(maxsize=8)
def _compiled(schema_json: str) -> OutputValidator:
    return OutputValidator(orjson.loads(schema_json))


def validator_for(schema_json: str) -> OutputValidator:
    """The validator of a schema, compiled once per process (cached by its canonical JSON)."""
    return _compiled(schema_json)

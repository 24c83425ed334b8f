"""The JSONL manifest's old module name: a re-export of :mod:`engine.sources.jsonl`."""

from engine.sources.jsonl import (  # noqa: F401
    BOM,
    ManifestPlan,
    ManifestRow,
    UnitSpec,
    build_meta,
    check_has_rows,
    parse_row,
    plan_manifest,
    read_unit_lines,
)

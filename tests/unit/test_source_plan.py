"""SourcePlan.coalesce: generic grouping, the source's own merge of its unit type."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sources.base import SourcePlan
from engine.sources.jsonl import ManifestPlan, UnitSpec


@dataclass(frozen=True, slots=True)
class _U:
    index: int
    num_rows: int
    duplicate_lines: tuple[int, ...] = ()


def _jsonl_units(n: int) -> list[UnitSpec]:
    return [
        UnitSpec(
            index=i,
            manifest="m",
            byte_start=100 * i,
            byte_end=100 * (i + 1),
            first_line=1 + 16 * i,
            num_rows=16,
            duplicate_lines=(16 * i + 3,) if i % 2 else (),
        )
        for i in range(n)
    ]


def test_coalesce_keeps_the_first_unit_small_and_merges_the_rest():
    plan = ManifestPlan(units=_jsonl_units(10), num_rows=160, num_duplicates=5, sha256="s", num_bytes=1000)
    merged = plan.coalesce(64)  # 4 grains per unit after the first
    assert [(u.index, u.first_line, u.byte_start, u.byte_end, u.num_rows) for u in merged.units] == [
        (0, 1, 0, 100, 16),
        (1, 17, 100, 500, 64),
        (2, 81, 500, 900, 64),
        (3, 145, 900, 1000, 16),
    ]
    assert [d for u in merged.units for d in u.duplicate_lines] == [
        d for u in plan.units for d in u.duplicate_lines
    ]
    assert (merged.num_rows, merged.num_duplicates, merged.sha256, merged.num_bytes) == (160, 5, "s", 1000)
    assert plan.coalesce(16) is plan


def test_a_plan_without_a_merge_keeps_its_units():
    plan = SourcePlan(units=[_U(i, 4) for i in range(8)], num_rows=32, num_duplicates=0, sha256="")
    assert plan.coalesce(256) is plan

"""The Layout protocol: what makes one output format, shaped like Ray Data's Datasink (a
start, one write per block = shard, a completion), plus the checks and names it decides.

A Layout is chosen once per run from the options (``engine.layouts.layout_for``); one small,
picklable instance rides in ``UnitContext`` (row checks, image names) and in every ``ShardSpec``
(the shard writer)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from engine.naming import safe_stem
from engine.records import Reject
from engine.validate import validator_for

if TYPE_CHECKING:
    from engine.config import ConvertOptions, TaskConfig
    from engine.sinks.shards import ShardResult, ShardSpec
    from engine.sinks.store import Finisher, Store
    from engine.sources.manifest import ManifestRow

MAX_OUTPUT_BYTES = 1 << 20  # an `output` larger than 1 MiB is rejected at the validate stage


@dataclass(frozen=True, slots=True)
class Checked:
    """A row that passed every check that needs no image: what its sample will hold."""

    row: ManifestRow
    output: str | None = None
    conversations: list[dict[str, str]] | None = None  # the turns as {role, content}
    text: str | None = None


@dataclass(frozen=True, slots=True)
class SeenColumns:
    """What the units saw that decides the output schema: extra meta keys, text columns."""

    meta_keys: frozenset[str] = frozenset()
    text_columns: frozenset[str] = frozenset()

    @classmethod
    def of(cls, results: Iterable[Any]) -> SeenColumns:
        """Merged from UnitResults (their ``meta_keys`` and ``text_columns``)."""
        results = list(results)
        return cls(
            frozenset(k for r in results for k in r.meta_keys),
            frozenset(c for r in results for c in r.text_columns),
        )


class Layout:
    """Base of every layout; a subclass sets ``name`` and is registered with ``register``."""

    name: ClassVar[str]
    # the layout stores no image_id column: OUT/row_ids.parquet keeps the ids for `engine update`
    keeps_row_ids: ClassVar[bool] = False
    # images are written as files under OUT (their paths stored), not embedded in the shards
    image_files: ClassVar[bool] = False
    # `engine update` knows how to read this layout's shards back as part rows
    updatable: ClassVar[bool] = False

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> Layout:
        return cls()

    # ---- rows (in the units) ---------------------------------------------------------------

    def check_row(self, row: ManifestRow, ctx: Any) -> Checked | Reject:
        """The manifest- and validate-stage checks of one parsed row."""
        raise NotImplementedError

    def user_content(self, task: TaskConfig | None) -> str | None:
        """The user turn built from the config, for layouts that make conversations."""
        return None

    def image_names(self, row: ManifestRow, extensions: Sequence[str]) -> list[str]:
        """The embedded file name of each image of ``row``, from safe_stem (no id escapes OUT)."""
        stem = safe_stem(row.image_id)
        suffixes = [""] if len(extensions) == 1 else [f"-{i}" for i in range(len(extensions))]
        return [f"{stem}{sfx}.{ext}" for sfx, ext in zip(suffixes, extensions)]

    # ---- schema and shards (on the driver) ---------------------------------------------------

    def features(self, seen: SeenColumns):
        """The output ``datasets.Features``, from what the units saw."""
        raise NotImplementedError

    def shard_path(self, split: str, index: int, count: int, num_splits: int) -> str:
        raise NotImplementedError

    def path_prefix(self, store: Store) -> str:
        """What goes before stored image paths (image_files layouts); nothing by default."""
        return ""

    def on_write_start(self, store: Store) -> None:
        """Before any shard is written; nothing by default."""

    def write_shard(self, spec: ShardSpec, finisher: Finisher | None) -> ShardResult:
        """Assemble and write one shard from its pieces (``sinks.shards.write_row_groups``)."""
        raise NotImplementedError

    def on_write_complete(
        self,
        store: Store,
        splits: dict[str, dict[str, Any]],
        shards: list[ShardResult],
        features,
        stats_doc: dict[str, Any],
        command: str,
        instructions: str | None,
        title: str | None = None,
    ) -> None:
        """What sits beside the shards (card, metadata); may add keys to ``stats_doc``."""


def prompt_turn(task: TaskConfig | None, template: str, token: str, position: str) -> str | None:
    """The user turn a labelr row gets in the conversation layouts: the rendered prompt and one
    attachment token, in ``position`` order (None without a config)."""
    if task is None:
        return None
    from engine.conversation import render_prompt, user_content

    return user_content(
        render_prompt(template, task.instructions, task.json_schema), token, position=position
    )


def validated_output(row: ManifestRow, ctx: Any) -> str | Reject:
    """A labelr row's ``output``, checked against the config's JSON schema (compact JSON)."""
    if ctx.schema_json is None:
        return Reject(
            row.line,
            row.image_id,
            "manifest",
            "a row with 'output' needs --config (instructions and JSON schema)",
        )
    verdict = validator_for(ctx.schema_json).check(row.output, MAX_OUTPUT_BYTES)
    if verdict.reason is not None:
        return Reject(row.line, row.image_id, "validate", verdict.reason)
    return verdict.output

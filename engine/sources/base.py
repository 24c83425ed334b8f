"""The Source protocol: what the generic loop needs of an input (a JSONL manifest today).

A Source plans its input into small picklable units on the driver, and a worker reads one
unit's rows back. Everything else (checks, fetching, transforms, layouts) sees only ``Row``s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias

if TYPE_CHECKING:
    from engine.config import ConvertOptions
    from engine.records import Reject, SourceRef


@dataclass(frozen=True, slots=True)
class InlineImage:
    """Image bytes the input itself holds (a Parquet cell, a tar member): fetched without I/O."""

    data: bytes
    name: str = ""  # its file name in the input, if any
    # where these bytes lie in a local file (a local tar's member), so a part file may reference them
    origin: SourceRef | None = None

    def __repr__(self) -> str:  # rows are logged and compared in tests: never print the bytes
        return f"InlineImage({self.name!r}, {len(self.data)} bytes)"


ImageInput: TypeAlias = str | InlineImage  # a location to fetch (local path or URL) or the bytes themselves


@dataclass(frozen=True, slots=True)
class Row:
    """One input row. ``kind`` is ``labelr`` (image + output) or ``trainer`` (conversations or
    text + image modalities, the packed trainer's own JSONL). ``line`` is the row's 1-based
    number in the whole input (a line number for JSONL), unique within it."""

    line: int
    kind: str
    image_id: str
    split: str
    locations: tuple[ImageInput, ...]  # paths/URLs resolved against the base folder, or inline bytes
    meta: dict[str, str | None]
    output: Any = None
    conversations: tuple[dict[str, str], ...] | None = None
    text: str | None = None


ManifestRow = Row  # its name before sources other than JSONL existed


class Unit(Protocol):
    """A small picklable work-unit descriptor; the generic loop needs only these attributes."""

    index: int
    num_rows: int
    duplicate_lines: tuple[int, ...]  # rows whose id an earlier row of the input already has


@dataclass(frozen=True)
class SourcePlan:
    """A source's units, in input order. Subclass it (adding fields) and override :meth:`merge`
    so :meth:`coalesce` can join consecutive units of your unit type."""

    units: list[Unit]
    num_rows: int
    num_duplicates: int
    # changes when the input changes: part of a run's fingerprint (JSONL: its bytes; a big
    # binary input may hash names, sizes and footers instead, and must say so)
    sha256: str

    def merge(self, index: int, group: Sequence[Unit]) -> Unit:
        """One unit numbered ``index`` that reads the consecutive ``group``'s rows in order."""
        raise NotImplementedError

    def coalesce(self, rows_per_unit: int) -> SourcePlan:
        """Merge consecutive units into units of about ``rows_per_unit`` rows, except the first,
        which stays small: the driver measures it to decide whether starting Ray pays. The output
        does not depend on unit boundaries, so this only tunes parallelism and load balance. A
        plan whose class does not override :meth:`merge` keeps its units."""
        grain = max((u.num_rows for u in self.units), default=1)
        k = max(1, rows_per_unit // max(grain, 1))
        if k == 1 or not self.units or type(self).merge is SourcePlan.merge:
            return self
        merged = []
        for i in [0] + list(range(1, len(self.units), k)):
            merged.append(self.merge(len(merged), self.units[i : i + k] if i else self.units[:1]))
        return dataclasses.replace(self, units=merged)


class Source:
    """An input, planned on the driver and read by the workers. Small and picklable: it rides in
    ``UnitContext``. Subclass it (a frozen dataclass with a ``where`` field, say), set ``kind``,
    and add the class to the registry with ``engine.sources.register``."""

    kind: ClassVar[str]  # the registry key and --input-format value: "jsonl", ...
    expects: ClassVar[str] = (
        ""  # what detection expected, for the error when nothing matched: "a JSONL manifest"
    )
    detect_last: ClassVar[bool] = False  # tried after every other source (JSONL: any file --manifest names)
    where: str  # the input's path/URL as the user gave it

    @classmethod
    def detect(cls, where: str) -> bool:
        """Whether ``where`` looks like this kind of input. Cheap (a suffix, a folder listing,
        the first bytes) and never raises: a missing input is ``check``'s to report."""
        return False

    @classmethod
    def from_options(cls, opts: ConvertOptions) -> Source:
        """This source for a convert's options (``opts.manifest`` is the input)."""
        return cls(opts.manifest)  # type: ignore[call-arg]

    def check(self) -> None:
        """Raise a one-line UsageError when the input is not there, unreadable, holds no rows
        or is not of this kind. Called before the output folder is touched."""

    def plan(self, grain: int) -> SourcePlan:
        """Units of about ``grain`` rows (the driver coalesces them later), and the duplicates."""
        raise NotImplementedError

    def read(self, unit: Unit, *, base: str, default_split: str) -> Iterator[Row | Reject]:
        """Every row of the unit, in order: a Row, or a stage-``manifest`` Reject saying why the
        row could not be read. ``base`` resolves relative image paths."""
        raise NotImplementedError

    def urls_after(self, unit: Unit, num_rows: int, *, base: str, default_split: str) -> Iterator[str]:
        """HTTP(S) image URLs of about ``num_rows`` rows after ``unit`` that no unit of this
        process has started yet: fetched ahead, so the next unit does not wait for them."""
        return iter(())

    def first_urls(self, num_rows: int, *, base: str, default_split: str) -> Iterator[str]:
        """HTTP(S) image URLs of about the first ``num_rows`` rows: fetched while the run starts
        (``engine.driver``), so its first units do not wait for them; ``urls_after`` goes on
        from the last row seen here."""
        return iter(())

    def default_base(self) -> str:
        """The folder relative image paths resolve against when --base-path is not given."""
        from engine.sources import location

        return location.parent(self.where)

    def sha256(self) -> str:
        """What ``plan(...).sha256`` gives, possibly without planning (checked by --resume on a
        finished dataset)."""
        return self.plan(1 << 20).sha256

    def close(self) -> None:
        """The run is over: drop whatever this process keeps for it (look-ahead state)."""


# ---- helpers every row-producing source shares ------------------------------------------------

JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def json_kind(value: Any) -> str:
    """How a reject reason names a JSON value that is not an object: "an array", "null", ..."""
    return JSON_KINDS.get(type(value), "a JSON value")


def as_text(value: Any) -> str | None:
    """A meta value as text: strings as they are, anything else as compact JSON."""
    if value is None or isinstance(value, str):
        return value
    import orjson

    return orjson.dumps(value).decode()


def build_meta(obj: dict[str, Any], url_keys: Sequence[str] = ("image_url",)) -> dict[str, str | None]:
    """barcode, off_image_id, image_url (the first of ``url_keys`` present), then every other
    non-reserved key, as strings."""
    from engine.records import META_FIXED, RESERVED_KEYS

    meta: dict[str, str | None] = {k: as_text(obj.get(k)) for k in META_FIXED}
    meta["image_url"] = as_text(next((obj[k] for k in url_keys if k in obj), None))
    for key, value in obj.items():
        if key not in RESERVED_KEYS and key not in META_FIXED and key not in url_keys:
            meta[key] = as_text(value)
    return meta

"""The Source seam end to end: a tiny in-test Source whose rows carry their images as
InlineImage bytes (no path to fetch) converts to the same dataset as the file-based manifest."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagegen
import pytest
from conftest import Output, convert, decode, row, write_input

from engine.errors import UsageError
from engine.records import Reject
from engine.sources import SOURCES, InlineImage, Row, Source, SourcePlan, jsonl, register, source_for
from engine.sources.identity import duplicate_lines, row_id
from engine.sources.jsonl import JsonlSource


@dataclass(frozen=True, slots=True)
class _Slice:
    index: int
    num_rows: int
    duplicate_lines: tuple[int, ...]
    start: int  # the 0-based number of its first row


@dataclass(frozen=True)
class _SlicePlan(SourcePlan):
    def merge(self, index: int, group: Sequence[_Slice]) -> _Slice:
        return _Slice(
            index,
            sum(u.num_rows for u in group),
            tuple(d for u in group for d in u.duplicate_lines),
            group[0].start,
        )


@dataclass(frozen=True)
class InlineTestSource(Source):
    """JSONL rows, from a file named *.inline-test, whose images the source holds itself (row N's
    in blobs/N.bin beside it) and hands over as bytes, the way a Parquet cell or a tar member
    would. Their image_path names no file: fetching it would reject the row."""

    kind = "inline-test"
    expects = "a *.inline-test file"
    where: str

    @classmethod
    def detect(cls, where: str) -> bool:
        return where.endswith(".inline-test")

    def _lines(self) -> list[bytes]:
        return [raw for raw in Path(self.where).read_bytes().split(b"\n") if raw.strip()]

    def plan(self, grain: int) -> _SlicePlan:
        import orjson

        lines = self._lines()
        dups = duplicate_lines(
            range(1, len(lines) + 1), [row_id(orjson.loads(raw), i + 1) for i, raw in enumerate(lines)]
        )
        units = [
            _Slice(k, len(lines[s : s + grain]), tuple(int(d) for d in dups if s < d <= s + grain), s)
            for k, s in enumerate(range(0, len(lines), grain))
        ]
        return _SlicePlan(
            units=units,
            num_rows=len(lines),
            num_duplicates=len(dups),
            sha256=hashlib.sha256(Path(self.where).read_bytes()).hexdigest(),
        )

    def read(self, unit: _Slice, *, base: str, default_split: str) -> Iterator[Row | Reject]:
        lines = self._lines()
        for i in range(unit.start, unit.start + unit.num_rows):
            parsed = jsonl.parse_row(i + 1, lines[i], base=base, default_split=default_split)
            if isinstance(parsed, Row):
                blob = Path(self.where).parent / "blobs" / f"{i + 1}.bin"
                parsed = dataclasses.replace(parsed, locations=(InlineImage(blob.read_bytes(), blob.name),))
            yield parsed


@pytest.fixture
def inline_source():
    register(InlineTestSource)
    yield InlineTestSource
    SOURCES.pop(InlineTestSource.kind)


def _input(root: Path):
    rows = [
        row("a", "a.jpg"),
        row("b", "b.png", split="validation"),
        row("c", "bad.jpg"),
        row("a", "b.png"),
        row("d", "big.jpg"),
        {"image_id": "e", "image_path": "a.jpg"},
    ]
    images = {
        "a.jpg": imagegen.jpeg(),
        "b.png": imagegen.png(mode="RGBA"),
        "bad.jpg": b"not an image",
        "big.jpg": imagegen.jpeg(size=(300, 200)),
    }
    inp = write_input(root, rows, images)
    (root / "blobs").mkdir()
    for i, r in enumerate(rows, start=1):
        (root / "blobs" / f"{i}.bin").write_bytes(images[r["image_path"]])
    inline = root / "rows.inline-test"
    inline.write_bytes(inp.manifest.read_bytes().replace(b'"image_path": "', b'"image_path": "gone/'))
    assert inline.read_bytes().count(b'"gone/') == len(rows)
    return inp, inline


@pytest.mark.parametrize("layout", [["--max-size", "64"], ["--layout", "arrow"]], ids=["parquet", "arrow"])
def test_inline_images_convert_like_the_files_they_came_from(tmp_path, inline_source, layout):
    inp, inline = _input(tmp_path / "in")
    assert convert(inp, tmp_path / "files", *layout) == 0
    assert convert(dataclasses.replace(inp, manifest=inline), tmp_path / "inline", *layout) == 0
    files, inlined = Output(tmp_path / "files"), Output(tmp_path / "inline")
    data = sorted(
        p.relative_to(tmp_path / "files")
        for p in (tmp_path / "files").rglob("*")
        if p.suffix in (".parquet", ".arrow")
    )
    assert data
    for rel in data:  # same rows, same image bytes: the data files are byte for byte the same
        assert (tmp_path / "inline" / rel).read_bytes() == (tmp_path / "files" / rel).read_bytes(), rel
    assert inlined.rejects == files.rejects
    assert [(r["line"], r["stage"]) for r in files.rejects] == [
        (3, "decode"),
        (4, "duplicate"),
        (6, "manifest"),
    ]
    if layout[0] == "--max-size":
        for split in ("train", "validation"):
            for a, b in zip(files.rows(split), inlined.rows(split)):
                assert decode(a["image"]).tobytes() == decode(b["image"]).tobytes()
                assert max(decode(b["image"]).size) <= 64


def test_the_fetcher_passes_inline_bytes_through_and_checks_their_size():
    from engine.config import FetchOptions
    from engine.sources.fetch import Fetcher, FetchFailure

    fetcher = Fetcher(FetchOptions(), max_bytes=4)
    image = InlineImage(b"1234", "a.jpg")
    assert Fetcher.is_local(image) and not Fetcher.is_http(image)
    read = fetcher.read(image)
    assert (read.data, read.origin) == (b"1234", None)
    assert fetcher.submit(image).result().data == b"1234"
    too_big = fetcher.fetch(InlineImage(b"12345"))
    assert isinstance(too_big, FetchFailure) and "over the limit of 4" in too_big.reason


def test_source_for_detects_and_names(tmp_path, inline_source):
    inline = str(tmp_path / "x.inline-test")
    assert isinstance(source_for(types.SimpleNamespace(manifest=inline)), InlineTestSource)
    # a registered source is tried before JSONL, which reads any other file as --manifest always did
    assert isinstance(source_for(types.SimpleNamespace(manifest=str(tmp_path / "m.txt"))), JsonlSource)
    assert isinstance(source_for(types.SimpleNamespace(manifest=inline, input_format="jsonl")), JsonlSource)
    with pytest.raises(UsageError, match="--input-format must be one of .*, not 'nope'") as refused:
        source_for(types.SimpleNamespace(manifest=inline, input_format="nope"))
    named = str(refused.value).split(" one of ", 1)[1].rsplit(", not", 1)[0].split(", ")
    assert {"jsonl", "inline-test"} <= set(named)  # every registered source (issue 22 adds more)


def test_the_look_ahead_state_of_a_run_goes_when_the_run_ends(tmp_path):
    inp, _ = _input(tmp_path / "in")
    gc.collect()  # source objects of earlier tests that are garbage already
    before = set(jsonl._RUNS)  # live objects of earlier tests may still hold theirs
    assert convert(inp, tmp_path / "out", "--unit-rows", "2") == 0
    assert set(jsonl._RUNS) <= before

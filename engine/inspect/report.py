"""Inspect a dataset end to end: open it, scan it, summarise it, write the HTML page."""

from __future__ import annotations

from dataclasses import dataclass

from engine.inspect.scan import ScanResult, scan
from engine.inspect.source import FS, open_dataset
from engine.inspect.summary import Summary, summarise, text_summary
from engine.progress import NullProgress, Progress


@dataclass(frozen=True)
class Inspection:
    result: ScanResult
    summary: Summary
    fs: FS

    @property
    def text(self) -> str:
        return text_summary(self.result, self.summary)


def inspect_dataset(
    root: str,
    *,
    samples: int = 12,
    seed: int = 0,
    decode: bool = True,
    phash: bool = True,
    progress: Progress | None = None,
) -> Inspection:
    progress = progress or NullProgress()
    ds, fs = open_dataset(root)
    result = scan(
        ds,
        fs,
        decode=decode,
        phash=phash,
        samples=samples,
        seed=seed,
        start=lambda total: progress.start(total or 0, "inspecting", unit="row"),
        progress=lambda n: progress.advance(n, 0),
    )
    progress.close()
    return Inspection(result, summarise(result, fs), fs)


def write_report(inspection: Inspection, path: str) -> str:
    """Write the HTML report to ``path`` (a local path or fsspec URL); returns the path."""
    from engine.inspect.report_html import render_html
    from engine.sources import location

    page = render_html(inspection.result, inspection.summary).encode()
    with location.open_binary(path, "wb") as f:
        f.write(page)
    return path

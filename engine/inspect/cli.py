"""The ``inspect`` and ``check`` subcommands: arguments in, one line per problem and an exit code out."""

from __future__ import annotations

import argparse
import sys


def add_commands(sub) -> None:
    i = sub.add_parser(
        "inspect",
        help="summarise a dataset; with --html, write a self-contained HTML report",
        description="Stream a dataset (any layout the engine writes, or any Hugging Face Parquet "
        "dataset with an image column, local or fsspec URL) and summarise it: counts, image sizes, "
        "outputs against config.json's schema, samples, duplicates and leakage across splits.",
    )
    i.add_argument("dataset", metavar="OUT", help="dataset folder, .parquet file or fsspec URL")
    i.add_argument("--html", metavar="FILE", help="write the report to FILE (one HTML file, images inline)")
    i.add_argument(
        "--samples",
        type=int,
        default=12,
        metavar="N",
        help="thumbnails in the report's sample grid (default: 12)",
    )
    i.add_argument("--seed", type=int, default=0, help="seed of the sample choice (default: 0)")
    i.add_argument(
        "--no-phash",
        dest="phash",
        action="store_false",
        help="skip the perceptual hash (no near-duplicate search)",
    )
    i.add_argument(
        "--no-decode",
        dest="decode",
        action="store_false",
        help="do not decode the images: sizes from their headers, exact duplicates by their stored "
        "bytes, no near duplicates (the fastest scan)",
    )
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.add_argument("--verbose", action="store_true", help="log debugging detail")
    c = sub.add_parser(
        "check",
        help="exit 0 only when a dataset is ready for the Hub and for training",
        description="Check a dataset for the Hub (row groups, page index, file counts, the card's "
        "configs, config.json) and for training (outputs valid, images decode, attachment tokens, "
        "no leakage across splits). One line per problem on stdout; exit 1 when there is one.",
    )
    c.add_argument("dataset", metavar="OUT", help="dataset folder, .parquet file or fsspec URL")
    c.add_argument(
        "--allow-near-duplicates",
        action="store_true",
        help="near-duplicate images across splits warn instead of failing",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar, no warnings")
    c.add_argument("--verbose", action="store_true", help="log debugging detail")


def _progress(quiet: bool):
    from engine.progress import BarProgress, NullProgress

    return NullProgress() if quiet else BarProgress()


def run_command(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except OSError as exc:  # an unreadable dataset file, or a report path that cannot be written
        where = f": {exc.filename}" if exc.filename else ""
        print(f"engine: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from engine.inspect.report import inspect_dataset, write_report

        inspection = inspect_dataset(
            args.dataset,
            samples=args.samples,
            seed=args.seed,
            decode=args.decode,
            phash=args.phash,
            progress=_progress(args.quiet),
        )
        print(inspection.text)
        if args.html:
            print(f"report: {write_report(inspection, args.html)}")
        return 0
    from engine.check import check_dataset

    result = check_dataset(
        args.dataset, allow_near_duplicates=args.allow_near_duplicates, progress=_progress(args.quiet)
    )
    for line in result.problems:
        print(line)
    if not args.quiet:
        for line in result.warnings:
            print(f"warning: {line}", file=sys.stderr)
        print(
            f"engine check: {len(result.problems)} problem(s), {len(result.warnings)} warning(s)",
            file=sys.stderr,
        )
    return 0 if result.ok else 1


def write_convert_report(out: str, quiet: bool) -> None:
    """``convert --report``: OUT/report.html, from the finished dataset."""
    from engine.inspect.report import inspect_dataset, write_report

    path = write_report(inspect_dataset(out, progress=_progress(quiet)), out.rstrip("/") + "/report.html")
    if not quiet:
        print(f"engine: report written to {path}", file=sys.stderr)

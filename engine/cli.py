"""Command line: arguments -> options; EngineError -> one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from engine.config import (
    ATTACHMENT_POSITIONS,
    DEFAULT_ATTACHMENT_TOKEN,
    DEFAULT_FORMATS,
    IMAGE_FORMATS,
    MODALITY_FEATURES,
    RUNNERS,
    ConvertOptions,
    FetchOptions,
    ImageOptions,
    parse_formats,
    parse_size,
)
from engine.errors import EngineError, ShardError, UsageError

PROG = "engine"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _VersionAction(argparse.Action):
    """``--version``: like argparse's own, but the libraries' versions are only looked up when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from engine.versions import version_line

        print(version_line())
        parser.exit()


class _InputFormats:
    """The --input-format choices, the registered sources: looked up only when used, so the CLI
    imports no source module (nor pyarrow) to print a usage error."""

    def __contains__(self, kind: object) -> bool:
        return kind in list(self)

    def __iter__(self):
        from engine.sources import source_kinds

        return iter(source_kinds())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Convert images + JSON annotations into training datasets: "
        "Hugging Face LLM image-extraction Parquet or packed Arrow (datasets.save_to_disk).",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the engine's version and those of Pillow, pyarrow, datasets and Ray",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    c = sub.add_parser(
        "convert",
        help="convert a JSONL manifest (+ config.json) into a dataset folder",
        description="Convert a JSONL manifest of images and expected outputs into a dataset "
        "folder. Every input row ends up written or in OUT/rejects.jsonl with its stage and reason.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = c.add_argument_group("input and output")
    io.add_argument(
        "--input",
        "--manifest",
        dest="manifest",
        required=True,
        metavar="PATH",
        help="the input: a JSONL manifest (one object per line with image_id, image_path or image_url, "
        "output; relative paths resolve against its folder), an existing dataset (a folder or file of "
        "HF Parquet, a save_to_disk folder), an image folder, ...: its kind is detected, or named "
        "with --input-format (--manifest is the same option)",
    )
    io.add_argument(
        "--input-format",
        choices=_InputFormats(),
        metavar="KIND",
        help="the kind of --input, when detection should not decide: %(choices)s",
    )
    io.add_argument(
        "--image-column",
        metavar="NAME",
        help="dataset input: the image column (default: the Image "
        "feature of the Parquet metadata, else the first struct<bytes, path> column)",
    )
    io.add_argument(
        "--id-column",
        metavar="NAME",
        help="dataset or image-folder input: the id column (default: "
        "image_id, then id; else each row's number, or for an image folder the file's path)",
    )
    io.add_argument(
        "--output-column",
        metavar="NAME",
        help="dataset or image-folder input: the column holding the expected output (default: output)",
    )
    io.add_argument(
        "--config",
        metavar="PATH",
        help="config.json with 'instructions' and 'json_schema'; copied into the output "
        "(required for manifests with 'output'; not for trainer-style JSONL)",
    )
    io.add_argument("--out", required=True, metavar="DIR", help="output dataset folder")
    io.add_argument(
        "--layout",
        default="parquet",
        metavar="{parquet,arrow,messages}",  # checked against the registry
        help="parquet: Hugging Face LLM image-extraction Parquet; arrow: packed Arrow shards "
        "(datasets.save_to_disk layout) with conversations + modalities; messages: Parquet of "
        "messages (text and image parts) + images, as TRL's vision SFT reads",
    )
    io.add_argument("--split", default="train", help="split of rows that have no 'split' key")
    io.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    io.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run in --out: completed work units are kept, the rest is "
        "redone; refused if the options, manifest or config differ from the interrupted run",
    )
    img = c.add_argument_group("images")
    img.add_argument(
        "--max-size",
        type=int,
        default=1024,
        metavar="PX",
        help="downscale so the longest side is at most PX pixels (0: keep the size)",
    )
    img.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default="jpeg",
        help="format of re-encoded images; keep: the source's format",
    )
    img.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality of re-encoded images")
    img.add_argument(
        "--no-passthrough",
        dest="passthrough",
        action="store_false",
        help="re-encode every image, even one that needs no change (by default such an image "
        "keeps its original bytes)",
    )
    img.add_argument(
        "--max-pixels",
        type=int,
        default=ImageOptions().max_pixels,
        help="reject images with more pixels than this (checked from the header, before decoding)",
    )
    img.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        metavar="LIST",
        help="image formats to decode, comma-separated; any other is rejected with a reason naming "
        "it. A list of names replaces the default; +NAME adds to it and -NAME removes from it "
        "(--formats +dds,+ico or --formats=-gif); 'all' is every format Pillow knows. Rarer "
        "formats' decoders are where fuzzing finds hangs and crashes, so widen it with care",
    )
    packed = c.add_argument_group(
        "packed Arrow layout (--layout arrow); the prompt options apply to --layout messages too"
    )
    packed.add_argument(
        "--images-as-paths",
        action="store_true",
        help="fs-image loader: write the images under OUT/images and store their paths "
        "(default: raw-image, bytes embedded in the shards)",
    )
    packed.add_argument(
        "--system-prompt", metavar="TEXT", help="add a system turn with TEXT before the user turn"
    )
    packed.add_argument(
        "--attachment-token",
        default=DEFAULT_ATTACHMENT_TOKEN,
        metavar="TOKEN",
        help="image placeholder in the user turn (one per image)",
    )
    packed.add_argument(
        "--prompt-template",
        default="plain",
        metavar="TEMPLATE",
        help="user prompt: 'plain' (the instructions), 'json-schema' (the instructions, then "
        "'Response must be formatted as JSON, and follow this JSON schema:' and the compact "
        "schema), or your own text with {instructions} and {json_schema} placeholders",
    )
    packed.add_argument(
        "--base-path",
        metavar="DIR",
        help="folder relative image paths resolve against (default: the manifest's folder)",
    )
    packed.add_argument(
        "--modality-feature",
        choices=MODALITY_FEATURES,
        default="recipe",
        help="raw-image modalities.value: recipe, the {path: null, bytes: binary} struct that "
        "the trainer's from_generator + save_to_disk recipe writes (concatenates with such "
        "datasets); image, a datasets Image() feature (decoded to PIL)",
    )
    packed.add_argument(
        "--attachment-position",
        choices=ATTACHMENT_POSITIONS,
        default="after",
        help="where the attachment token(s) go in a labelr row's user turn: after the prompt "
        "text (as labelr's trainer), or before it",
    )
    packed.add_argument(
        "--absolute-paths",
        action="store_true",
        help="fs-image: store absolute image paths (the trainer's base_path is then ignored)",
    )
    packed.add_argument(
        "--paths-relative-to",
        metavar="DIR",
        help="fs-image: store image paths relative to DIR (set the trainer's base_path to DIR), "
        "instead of relative to the output folder",
    )
    img.add_argument(
        "--image-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="reject an image whose decode, resize and encode need more than S seconds of CPU time, "
        "in any thread or worker; the same file is decided the same way under any load (0: no bound)",
    )
    out = c.add_argument_group("shards")
    out.add_argument("--shard-rows", type=int, metavar="N", help="at most N rows per output shard")
    out.add_argument(
        "--max-shard-size",
        default="500MB",
        metavar="SIZE",
        help="at most about SIZE of data per output shard (e.g. 500MB, 1GiB)",
    )
    out.add_argument(
        "--row-group-rows", type=int, default=100, metavar="N", help="at most N rows per Parquet row group"
    )
    run = c.add_argument_group("execution")
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="parallel workers (default: every core, or every CPU of the Ray cluster)",
    )
    run.add_argument(
        "--runner",
        choices=RUNNERS,
        default="ray",
        help="ray: threads in this process, then Ray workers when they pay (embedded), or the "
        "cluster of --ray-address; local: one item after another in this process",
    )
    run.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (default: $RAY_ADDRESS, else start Ray embedded)",
    )
    run.add_argument(
        "--unit-rows",
        type=int,
        metavar="N",
        help="rows per work unit (default: automatic, "
        "about 16 units per worker); affects parallelism and resume granularity, never the output",
    )
    run.add_argument(
        "--http-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="timeout of each HTTP request's connect, and of each wait for more of its bytes",
    )
    run.add_argument(
        "--http-retries",
        type=int,
        default=3,
        metavar="N",
        help="retries of a failed HTTP request (connection errors, 408/429/5xx), with exponential backoff",
    )
    net = c.add_argument_group("image URLs (http, https)")
    net.add_argument(
        "--http-total-timeout",
        type=float,
        default=FetchOptions().total_timeout,
        metavar="S",
        help="reject an image whose fetch takes longer than S seconds in all: its retries, their "
        "pauses and the whole body read included (a server that trickles its bytes is cut off)",
    )
    net.add_argument(
        "--fetch-concurrency",
        type=int,
        default=FetchOptions().concurrency,
        metavar="N",
        help="HTTP requests in flight per process (the driver's threads share them, and so do "
        "each Ray worker's); set it to about the images/s you expect times the server's latency",
    )
    net.add_argument(
        "--max-connections-per-host",
        type=int,
        default=0,
        metavar="N",
        help="at most N connections to one host (0: only --fetch-concurrency bounds them)",
    )
    net.add_argument(
        "--max-requests-per-second-per-host",
        type=float,
        default=0.0,
        metavar="R",
        help="start at most R requests per second to one host, per process (0: no limit)",
    )
    net.add_argument(
        "--user-agent",
        default=FetchOptions().user_agent,
        metavar="TEXT",
        help="User-Agent header of every request: name your application and a contact, as "
        "image servers such as Open Food Facts' ask",
    )
    net.add_argument(
        "--download-cache",
        metavar="DIR",
        help="keep every downloaded image here (a folder or an "
        "fsspec URL), by URL: a later run with other options fetches nothing again; a damaged "
        "entry is fetched again",
    )
    net.add_argument(
        "--http-in-process",
        action="store_true",
        help="run the HTTP client on a thread of each process instead of a child process of its "
        "own (the default, which keeps its Python work off the units' GIL): for a sandbox that "
        "forbids starting processes, or to profile the client with the units",
    )
    run.add_argument(
        "--max-reject-ratio",
        type=float,
        default=1.0,
        metavar="R",
        help="exit with code 1 when more than this fraction of rows is rejected",
    )
    run.add_argument(
        "--quiet", action="store_true", help="print nothing: no progress bar, summary or library messages"
    )
    run.add_argument("--verbose", action="store_true", help="log debugging detail")
    run.add_argument(
        "--report", action="store_true", help="write OUT/report.html (engine inspect's report) at the end"
    )
    add_update_parser(sub)
    from engine.inspect.cli import add_commands

    add_commands(sub)
    return parser


def add_update_parser(sub) -> None:
    u = sub.add_parser(
        "update",
        help="fix outputs, delete or add rows, or change the config of a finished dataset",
        description="Update a finished dataset without decoding its images: the data files come "
        "out as a fresh convert of the equivalent final manifest would write them. Atomic: a "
        "reader sees the old dataset or the new one; a crashed update is finished by running it again.",
    )
    u.add_argument("out", metavar="OUT", help="the dataset folder (local or an fsspec URL)")
    u.add_argument(
        "--outputs",
        metavar="PATH",
        help="JSONL of image_id + output: the new expected outputs "
        "(validated against the schema; the last line per id wins)",
    )
    u.add_argument(
        "--delete", metavar="PATH", help="ids of rows to delete: one a line, or JSONL with image_id"
    )
    u.add_argument(
        "--add", metavar="MANIFEST", help="a manifest of new rows, converted with the dataset's options"
    )
    u.add_argument(
        "--replace",
        action="store_true",
        help="--add rows whose id is in the dataset replace its row "
        "(default: they are rejected as duplicates)",
    )
    u.add_argument(
        "--config", metavar="PATH", help="a new config.json: every output is validated against its schema"
    )
    u.add_argument(
        "--drop-invalid",
        action="store_true",
        help="with --config: remove the rows its schema refuses (default: refuse the update)",
    )
    u.add_argument(
        "--show-diff", action="store_true", help="print the old and new outputs as a diff; change nothing"
    )
    u.add_argument(
        "--retry-rejected",
        action="store_true",
        help="run the rows rejected at --stages again, from the "
        "dataset's manifest; each that succeeds goes to its original place",
    )
    u.add_argument(
        "--stages",
        metavar="LIST",
        help="with --retry-rejected: the reject stages "
        "to retry (default: fetch; also decode, validate, write)",
    )
    u.add_argument(
        "--manifest",
        metavar="PATH",
        help="with --retry-rejected: a moved copy of the dataset's manifest "
        "(its SHA-256 must match the one in stats.json)",
    )
    u.add_argument(
        "--split",
        help="apply --outputs and --delete to this split only (and the default split of --add rows)",
    )
    u.add_argument(
        "--resume", action="store_true", help="finish an interrupted update (running it again does the same)"
    )
    u.add_argument(
        "--workers", type=int, metavar="N", help="parallel workers for --add and --retry-rejected rows"
    )
    u.add_argument(
        "--runner",
        choices=RUNNERS,
        default="ray",
        help="runner for --add and --retry-rejected rows (as for convert)",
    )
    u.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    u.add_argument("--verbose", action="store_true", help="log debugging detail")


def _check_download_cache(location: str | None) -> None:
    """A local cache folder must be creatable, before any work starts."""
    from engine.sources.location import local_path

    path = local_path(location) if location else None
    if path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--download-cache {location}: {exc.strerror or exc}") from None


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    image = ImageOptions(
        max_size=args.max_size or None,
        format=args.image_format,
        quality=args.quality,
        passthrough=args.passthrough,
        max_pixels=args.max_pixels,
        timeout=args.image_timeout or None,
        formats=parse_formats(args.formats),
    )
    fetch = FetchOptions(
        timeout=args.http_timeout,
        retries=args.http_retries,
        total_timeout=args.http_total_timeout,
        concurrency=args.fetch_concurrency,
        max_per_host=args.max_connections_per_host,
        max_rps_per_host=args.max_requests_per_second_per_host,
        user_agent=args.user_agent,
        cache=args.download_cache,
        in_process=args.http_in_process,
    )
    _check_download_cache(args.download_cache)
    return ConvertOptions(
        manifest=args.manifest,
        out=args.out,
        config=args.config,
        layout=args.layout,
        split=args.split,
        image=image,
        fetch=fetch,
        shard_rows=args.shard_rows,
        max_shard_bytes=parse_size(args.max_shard_size),
        row_group_rows=args.row_group_rows,
        workers=args.workers,
        runner=args.runner,
        ray_address=args.ray_address,
        overwrite=args.overwrite,
        resume=args.resume,
        unit_rows=args.unit_rows,
        quiet=args.quiet,
        max_reject_ratio=args.max_reject_ratio,
        images_as_paths=args.images_as_paths,
        system_prompt=args.system_prompt,
        attachment_token=args.attachment_token,
        prompt_template=args.prompt_template,
        base_path=args.base_path,
        modality_feature=args.modality_feature,
        attachment_position=args.attachment_position,
        absolute_paths=args.absolute_paths,
        paths_relative_to=args.paths_relative_to,
        input_format=args.input_format,
        image_column=args.image_column,
        id_column=args.id_column,
        output_column=args.output_column,
    )


PATH_OPTIONS = frozenset(
    {
        "--manifest",
        "--input",
        "--config",
        "--out",
        "--base-path",
        "--paths-relative-to",
        "--outputs",
        "--delete",
        "--add",
        "--download-cache",
    }
)


def public_command(argv: Sequence[str]) -> str:
    """The command line for the dataset card, with local paths cut to their last component, so a
    published card does not reveal the builder's folders."""
    shown, hide_next = [PROG], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if hide_next:
            arg, hide_next = (arg if "://" in arg else os.path.basename(arg.rstrip("/")) or arg), False
        elif eq and name in PATH_OPTIONS and "://" not in value:
            arg = f"{name}={os.path.basename(value.rstrip('/')) or value}"
        elif arg in PATH_OPTIONS:
            hide_next = True
        shown.append(arg)
    return shlex.join(shown)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        logging.basicConfig(
            level=logging.WARNING,
            format="%(relativeCreated)7.0f ms %(levelname)s %(name)s: %(message)s"
            if args.verbose
            else "%(levelname)s %(name)s: %(message)s",
        )
        if args.verbose:  # the engine's own detail, not every library's (Pillow logs each EXIF tag)
            logging.getLogger("engine").setLevel(logging.DEBUG)
        from engine.progress import BarProgress, NullProgress

        if args.command in ("inspect", "check"):
            from engine.inspect.cli import run_command

            return run_command(args)
        if args.command == "update":
            from engine.update.core import update
            from engine.update.inputs import UpdateOptions
            from engine.update.retry import parse_stages

            uopts = UpdateOptions(
                out=args.out,
                outputs=args.outputs,
                delete=args.delete,
                add=args.add,
                replace=args.replace,
                config=args.config,
                drop_invalid=args.drop_invalid,
                show_diff=args.show_diff,
                split=args.split,
                resume=args.resume,
                workers=args.workers,
                runner=args.runner,
                quiet=args.quiet,
                retry_rejected=args.retry_rejected,
                **({"stages": parse_stages(args.stages)} if args.stages else {}),
                manifest=args.manifest,
            )
            update(uopts, NullProgress() if args.quiet else BarProgress(), command=public_command(argv))
            return 0
        opts = options_from_args(args)
        if not opts.fetch.in_process and opts.ray_address is None:
            from engine.sources.http_process import prespawn

            prespawn(opts.manifest)  # its start overlaps the imports below
        from engine.driver import convert

        convert(opts, NullProgress() if opts.quiet else BarProgress(), command=public_command(argv))
        if args.report:
            from engine.inspect.cli import write_convert_report

            write_convert_report(opts.out, opts.quiet)
        return 0
    except EngineError as exc:
        hint = " (fix the cause, then finish the run with --resume)" if isinstance(exc, ShardError) else ""
        print(f"{PROG}: error: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, permissions, a vanished folder: the driver's own I/O
        where = f": {exc.filename}" if exc.filename else ""
        print(
            f"{PROG}: error: {exc.strerror or exc}{where} (the run can be finished with --resume)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point (also ``python -m engine``).

    When ``main`` returns, the run is over: every file is closed and committed, and Ray is shut
    down. The interpreter's own teardown (freeing pyarrow, polars, datasets and ray module by
    module) would only cost time, so it is skipped (bench/GAP.md, "Interpreter teardown").
    An unexpected exception still propagates and exits the usual way, with its traceback.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

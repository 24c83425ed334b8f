"""The task configuration (instructions + JSON schema) and the run options.

Both are frozen dataclasses, checked before any image is read.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.errors import ConfigError, UsageError

IMAGE_FORMATS = ("jpeg", "webp", "png", "keep")
RUNNERS = ("ray", "local")
SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")
DEFAULT_ATTACHMENT_TOKEN = "<|reserved_special_token_0|>"
MODALITY_FEATURES = ("recipe", "image")
ATTACHMENT_POSITIONS = ("after", "before")
# The formats decoded by default: what users really send. Every other Pillow plugin stays off,
# which keeps the fuzz-found decoder bugs of rarer formats (DDS, BLP, PSD, ...) out of reach.
DEFAULT_FORMATS = ("jpeg", "png", "webp", "gif", "tiff", "bmp", "heif", "avif", "jpeg2000")
_FORMAT_ALIASES = {
    "jpg": "jpeg",
    "jpe": "jpeg",
    "mpo": "jpeg",
    "tif": "tiff",
    "heic": "heif",
    "jp2": "jpeg2000",
    "j2k": "jpeg2000",
    "jpx": "jpeg2000",
    "j2c": "jpeg2000",
}


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """The contents of config.json: what the model is asked and the schema its answer follows."""

    instructions: str
    json_schema: dict[str, Any]
    raw: bytes = field(repr=False)  # the file as read, copied unchanged into every output

    @property
    def schema_json(self) -> str:
        return orjson.dumps(self.json_schema, option=orjson.OPT_SORT_KEYS).decode()


def parse_task_config(raw: bytes, source: str = "config.json") -> TaskConfig:
    """Parse and check config.json. Raises ConfigError with one line naming what is wrong."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source} must hold a JSON object, got {type(doc).__name__}")
    missing = [k for k in ("instructions", "json_schema") if k not in doc]
    if missing:
        raise ConfigError(f"{source} lacks the key(s) {', '.join(repr(k) for k in missing)}")
    if not isinstance(doc["instructions"], str) or not doc["instructions"].strip():
        raise ConfigError(f"{source}: 'instructions' must be a non-empty string")
    schema = doc["json_schema"]
    if not isinstance(schema, dict):
        raise ConfigError(f"{source}: 'json_schema' must be a JSON object, got {type(schema).__name__}")
    from engine.validate import check_schema  # local import: keeps config free of validator deps

    problem = check_schema(schema)
    if problem:
        raise ConfigError(f"{source}: 'json_schema' is not a valid JSON Schema: {problem}")
    return TaskConfig(instructions=doc["instructions"], json_schema=schema, raw=bytes(raw))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "ki": 2**10,
    "mib": 2**20,
    "mi": 2**20,
    "gib": 2**30,
    "gi": 2**30,
    "tib": 2**40,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '64MiB' -> 67_108_864, '1000' -> 1000."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"not a size: {text!r} (examples: 500MB, 64MiB, 1GB)")
    return int(float(m.group(1)) * _UNITS[unit])


def known_formats() -> list[str]:
    """Every --formats name: Pillow's registered formats, HEIF and AVIF (their plugins register late)."""
    from PIL import Image  # local import: config stays light for the CLI's usage errors

    Image.init()
    names = {("jpeg" if i == "MPO" else i.lower()) for i in Image.OPEN} | {"heif", "avif"}
    return sorted(names)


def parse_formats(text: str) -> tuple[str, ...]:
    """--formats: 'jpeg,png' sets the list; '+dds' adds to the default list and '-gif' removes from
    it (entries apply in order; 'all' is every format Pillow knows). Names are case-insensitive,
    with the usual aliases (jpg, tif, heic, jp2)."""
    known = known_formats()
    entries = [e.strip().lower() for e in str(text).split(",") if e.strip()]
    if not entries:
        raise UsageError("--formats needs at least one format (e.g. jpeg,png or +dds)")
    plain = [e for e in entries if e[0] not in "+-"]
    result: list[str] = [] if plain else list(DEFAULT_FORMATS)
    for entry in entries:
        sign, name = (entry[0], entry[1:].strip()) if entry[0] in "+-" else ("", entry)
        names = known if name == "all" else [_FORMAT_ALIASES.get(name, name)]
        for n in names:
            if n not in known:
                raise UsageError(f"--formats: unknown format {name!r} (known: all, {', '.join(known)})")
            if sign == "-":
                result = [f for f in result if f != n]
            elif n not in result:
                result.append(n)
    if not result:
        raise UsageError(f"--formats {text!r} leaves no format to decode")
    return tuple(result)


@dataclass(frozen=True, kw_only=True)
class ImageOptions:
    """How each image is transformed. Picklable; shipped to every worker."""

    max_size: int | None = 1024  # longest side; None keeps the size
    format: str = "jpeg"  # format of re-encoded images: jpeg, webp, png, keep (the source's)
    quality: int = 90
    passthrough: bool = True  # keep the original bytes when nothing needs changing
    max_pixels: int = 178_956_970  # decompression-bomb limit, checked from the header
    max_image_bytes: int = 256 * 2**20
    timeout: float | None = 60.0  # bound per image transform (decode ... encode), see pipeline.time_limit
    formats: tuple[str, ...] = DEFAULT_FORMATS  # --formats: the formats decoded (lower-case names)


DEFAULT_USER_AGENT = "engine/0.1 (image dataset converter)"


@dataclass(frozen=True, kw_only=True)
class FetchOptions:
    """How image bytes are fetched. None of it defines the output (see ``output_defining``)."""

    timeout: float = 30.0  # per request: connecting, and each wait for the next bytes
    retries: int = 3
    total_timeout: float = 120.0  # per image, retries, pauses and the whole body read included
    io_threads: int = 8  # local and fsspec reads (and download-cache I/O) per process
    concurrency: int = 512  # HTTP requests in flight per process, shared by its threads
    max_per_host: int = 0  # connections per host; 0: only the concurrency bounds them
    max_rps_per_host: float = 0.0  # requests started per second per host; 0: no limit
    user_agent: str = DEFAULT_USER_AGENT
    cache: str | None = None  # download cache folder or fsspec URL
    in_process: bool = False  # the HTTP client on a thread of this process, not a child process
    # Fetched bytes held per process (being read, or waiting for their unit): no new request
    # starts above it, so memory does not follow the concurrency times the image size.
    buffer_bytes: int = 256 * 2**20


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Everything a run needs, resolved and checked. Written to stats.json."""

    manifest: str
    out: str
    config: str | None = None
    layout: str = "parquet"
    split: str = "train"
    image: ImageOptions = field(default_factory=ImageOptions)
    fetch: FetchOptions = field(default_factory=FetchOptions)
    shard_rows: int | None = None  # cap on rows per output shard
    max_shard_bytes: int = 500 * 10**6
    row_group_rows: int = 100
    row_group_bytes: int = 100 * 10**6
    unit_rows: int | None = None  # rows per work unit (parallelism only, never output); None: automatic
    workers: int | None = None  # None: every core (or every CPU of the cluster)
    runner: str = "ray"
    ray_address: str | None = None
    overwrite: bool = False
    resume: bool = False  # finish an interrupted run in --out, reusing its completed units
    quiet: bool = False
    max_reject_ratio: float = 1.0
    # packed Arrow layout
    images_as_paths: bool = False  # fs-image loader: image files under OUT/images, paths in the rows
    system_prompt: str | None = None
    attachment_token: str = DEFAULT_ATTACHMENT_TOKEN
    prompt_template: str = "plain"  # plain | json-schema | a string with {instructions} / {json_schema}
    base_path: str | None = None  # folder relative image paths resolve against (default: the manifest's)
    modality_feature: str = "recipe"  # raw-image value: recipe ({path: null, bytes}) | image (Image())
    attachment_position: str = "after"  # the attachment token(s) after the prompt text (labelr), or before
    absolute_paths: bool = False  # fs-image: absolute image paths instead of paths relative to OUT
    paths_relative_to: str | None = None  # fs-image: image paths relative to this folder instead of OUT
    # the input (--input/--manifest): its kind (a Source registry key; None: detected) and, for
    # datasets and image folders, the columns that hold the image, the id and the output
    input_format: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    output_column: str | None = None

    def __post_init__(self) -> None:
        check = _check_options(self)
        if check:
            raise UsageError(check)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_defining(self) -> dict[str, Any]:
        """The options that decide the output's content (not how fast or where it runs): a run
        may only be resumed with the same ones."""
        doc = self.to_dict()
        for key in (
            "overwrite",
            "resume",
            "quiet",
            "workers",
            "runner",
            "ray_address",
            "unit_rows",
            "max_reject_ratio",
        ):
            doc.pop(key)
        doc.pop("fetch")  # timeouts and retries: a resume after network trouble may raise them
        for key in INPUT_OPTIONS:  # unset: as before these options existed, so older runs still match
            if doc[key] is None:
                doc.pop(key)
        doc["image"].pop("timeout")
        return doc


INPUT_OPTIONS = ("input_format", "image_column", "id_column", "output_column")


def _check_options(o: ConvertOptions) -> str | None:
    from engine.layouts import LAYOUTS  # the registry: a layout module registers its name

    if o.layout not in LAYOUTS:
        return f"--layout must be one of {', '.join(LAYOUTS)}, not {o.layout!r}"
    if o.runner not in RUNNERS:
        return f"--runner must be one of {', '.join(RUNNERS)}, not {o.runner!r}"
    if o.image.format not in IMAGE_FORMATS:
        return f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, not {o.image.format!r}"
    if not SPLIT_NAME.match(o.split):
        return f"--split {o.split!r} is not a valid split name (letters, digits, _ and .)"
    if o.image.max_size is not None and o.image.max_size < 1:
        return f"--max-size must be a positive number of pixels, not {o.image.max_size}"
    if not 1 <= o.image.quality <= 100:
        return f"--quality must be between 1 and 100, not {o.image.quality}"
    if o.image.timeout is not None and o.image.timeout <= 0:
        return "--image-timeout must be positive (or 0 for no bound)"
    if o.image.max_pixels < 1:
        return "--max-pixels must be positive"
    if not o.image.formats:
        return "--formats leaves no format to decode"
    for name, value in (("--shard-rows", o.shard_rows), ("--workers", o.workers)):
        if value is not None and value < 1:
            return f"{name} must be at least 1, not {value}"
    if o.max_shard_bytes < 1:
        return "--max-shard-size must be positive"
    if (o.unit_rows is not None and o.unit_rows < 1) or o.row_group_rows < 1 or o.row_group_bytes < 1:
        return "unit and row-group sizes must be positive"
    if not 0.0 <= o.max_reject_ratio <= 1.0:
        return f"--max-reject-ratio must be between 0 and 1, not {o.max_reject_ratio}"
    if o.fetch.timeout <= 0 or o.fetch.total_timeout <= 0 or o.fetch.retries < 0:
        return "--http-timeout and --http-total-timeout must be positive and --http-retries not negative"
    if o.fetch.concurrency < 1 or o.fetch.io_threads < 1 or o.fetch.buffer_bytes < 1:
        return f"--fetch-concurrency must be at least 1, not {o.fetch.concurrency}"
    if o.fetch.max_per_host < 0:
        return f"--max-connections-per-host must be at least 1 (or 0 for no cap), not {o.fetch.max_per_host}"
    if o.fetch.max_rps_per_host < 0:
        return (
            "--max-requests-per-second-per-host must be positive (or 0 for no limit), "
            f"not {o.fetch.max_rps_per_host:g}"
        )
    if not o.fetch.user_agent.strip() or any(c in o.fetch.user_agent for c in "\r\n"):
        return "--user-agent must be one non-empty line"
    if o.fetch.cache is not None and not o.fetch.cache.strip():
        return "--download-cache must name a folder or an fsspec URL"
    if o.resume and o.overwrite:
        return "--resume and --overwrite exclude each other"
    if o.images_as_paths and o.layout != "arrow":
        return "--images-as-paths applies to --layout arrow only"
    if not o.attachment_token:
        return "--attachment-token must not be empty"
    if o.layout == "parquet" and not o.config:
        return "--config is required for --layout parquet (it holds the instructions and JSON schema)"
    if o.prompt_template not in ("plain", "json-schema") and "{instructions}" not in o.prompt_template:
        return "--prompt-template must be plain, json-schema, or a text containing {instructions}"
    if o.modality_feature not in MODALITY_FEATURES:
        return f"--modality-feature must be one of {', '.join(MODALITY_FEATURES)}, not {o.modality_feature!r}"
    if o.attachment_position not in ATTACHMENT_POSITIONS:
        return (
            f"--attachment-position must be one of {', '.join(ATTACHMENT_POSITIONS)}, "
            f"not {o.attachment_position!r}"
        )
    if o.modality_feature != "recipe" and (o.layout != "arrow" or o.images_as_paths):
        return (
            "--modality-feature applies to the packed raw-image layout only "
            "(--layout arrow, no --images-as-paths)"
        )
    if (o.absolute_paths or o.paths_relative_to) and not o.images_as_paths:
        return "--absolute-paths and --paths-relative-to apply to --images-as-paths only"
    if o.absolute_paths and o.paths_relative_to:
        return "--absolute-paths and --paths-relative-to exclude each other"
    if (o.absolute_paths or o.paths_relative_to) and "://" in o.out:
        return (
            "--absolute-paths and --paths-relative-to need a local --out "
            "(the trainer opens the files by path)"
        )
    for name, value in (
        ("--image-column", o.image_column),
        ("--id-column", o.id_column),
        ("--output-column", o.output_column),
    ):
        if value is not None and not value.strip():
            return f"{name} must name a column"
    if "://" not in o.out and os.path.abspath(o.out) == os.path.abspath(
        o.manifest
    ):  # --overwrite would delete it
        return "--out must not be the input folder itself"
    if os.path.abspath(o.out) == os.path.abspath(os.path.dirname(os.path.abspath(o.manifest))):
        return "--out must not be the manifest's own folder"
    return None

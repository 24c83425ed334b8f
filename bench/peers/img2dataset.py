"""img2dataset over ``file://`` URLs, run from its own virtual environment.

The venv is ``$BENCH_IMG2DATASET_VENV`` (the harness creates it with ``pip install
img2dataset``). ``keep_ratio_largest`` bounds the *longest* side like every other tool
(img2dataset's ``keep_ratio`` bounds the shortest side, which would give 1365 px). img2dataset
decodes with OpenCV, which ignores the EXIF orientation. It has no packed Arrow writer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.peers.common import peer_args, read_manifest


def img2dataset_command(
    venv: Path,
    url_list: Path,
    out: Path,
    *,
    workers: int,
    num_rows: int,
    max_size: int,
    quality: int,
    passthrough: bool,
    thread_count: int = 16,
) -> list[str]:
    options = {
        "url_list": str(url_list),
        "input_format": "parquet",
        "url_col": "url",
        "save_additional_columns": json.dumps(["image_id"]),
        "output_format": "parquet",
        "output_folder": str(out),
        "image_size": max_size,
        "resize_mode": "keep_ratio_largest",
        "resize_only_if_bigger": True,
        "skip_reencode": passthrough,
        "encode_quality": quality,
        "processes_count": workers,
        "thread_count": thread_count,
        "number_sample_per_shard": max(1, math.ceil(num_rows / (workers * 2))),
        "enable_wandb": False,
        "compute_hash": "None",
        "disallowed_header_directives": "[]",
    }
    return [str(venv / "bin" / "img2dataset")] + [f"--{k}={v}" for k, v in options.items()]


def main() -> None:
    def url_options(parser):
        parser.add_argument(
            "--url-base",
            help="fetch BASE/<image_path> over HTTP instead of the files, with "
            "img2dataset's default of 256 threads per process",
        )

    args = peer_args(__doc__.splitlines()[0], url_options)
    if args.layout != "parquet":
        sys.exit("not applicable: img2dataset has no save_to_disk (packed Arrow) writer")
    venv = Path(
        os.environ.get(
            "BENCH_IMG2DATASET_VENV", Path(__file__).resolve().parents[1] / ".cache" / "img2dataset-venv"
        )
    )
    if not (venv / "bin" / "img2dataset").exists():
        sys.exit(f"not available: img2dataset is not installed in {venv}")
    rows = read_manifest(args.manifest)
    url_list = args.out / "urls.parquet"
    if args.url_base:
        base = args.manifest.parent.resolve()
        urls = [f"{args.url_base}/{Path(r.path).resolve().relative_to(base).as_posix()}" for r in rows]
    else:
        urls = [Path(r.path).resolve().as_uri() for r in rows]
    pq.write_table(pa.table({"url": urls, "image_id": [r.image_id for r in rows]}), url_list)
    command = img2dataset_command(
        venv,
        url_list,
        args.out / "data",
        workers=args.workers,
        num_rows=len(rows),
        max_size=args.max_size,
        quality=args.quality,
        passthrough=args.mode == "passthrough",
        thread_count=256 if args.url_base else 16,
    )
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()

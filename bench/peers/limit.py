"""The imaging floor: one process per core, no engine, Ray or datasets.

Resize mode: open → draft → thumbnail → EXIF transpose → JPEG encode into memory.
Pass-through mode: read bytes → parse the header.
With ``--write`` (the ``limit-write`` tool), each process also appends what it produced to its
own file under ``written/`` and fsyncs it after every chunk: the floor of a converter that
writes its output durably, as the engine does (the engine fsyncs every shard).
Writes ``result.json`` (counts and bytes written) and a few encoded images under ``samples/``
for the check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from contextlib import nullcontext
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from bench.peers.common import Row, fast_resize_encode, header_size, peer_args, read_manifest

NUM_SAMPLES = 20


def process_chunk(
    chunk: list[tuple[int, Row]],
    *,
    mode: str,
    max_size: int,
    quality: int,
    sample_every: int,
    write_dir: Path | None,
) -> tuple[int, int, dict[str, bytes]]:
    num_ok = num_written = 0
    samples: dict[str, bytes] = {}
    with open(write_dir / f"{os.getpid()}.bin", "ab") if write_dir else nullcontext() as sink:
        for index, row in chunk:
            data = Path(row.path).read_bytes()
            if mode == "passthrough":
                out = data if header_size(data) is not None else None
            else:
                out = fast_resize_encode(data, max_size, quality)
            if out is None:
                continue
            num_ok += 1
            if sink is not None:
                num_written += sink.write(out)
            if index % sample_every == 0:
                samples[row.image_id] = out
        if sink is not None:
            sink.flush()
            os.fsync(sink.fileno())
    return num_ok, num_written, samples


def _write_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--write",
        action="store_true",
        help="also write every output to disk (one file per process, fsynced per chunk)",
    )


def main() -> None:
    args = peer_args(__doc__.splitlines()[0], extra=_write_flag)
    rows = read_manifest(args.manifest)
    indexed = list(enumerate(rows))
    chunk_size = max(1, math.ceil(len(rows) / (args.workers * 8)))
    chunks = [indexed[i : i + chunk_size] for i in range(0, len(indexed), chunk_size)]
    write_dir = args.out / "written" if args.write else None
    if write_dir is not None:
        write_dir.mkdir()
    work = partial(
        process_chunk,
        mode=args.mode,
        max_size=args.max_size,
        quality=args.quality,
        sample_every=max(1, len(rows) // NUM_SAMPLES),
        write_dir=write_dir,
    )
    num_ok = num_written = 0
    samples_dir = args.out / "samples"
    samples_dir.mkdir(exist_ok=True)
    with Pool(args.workers) as pool:
        for ok, written, samples in pool.imap_unordered(work, chunks):
            num_ok += ok
            num_written += written
            for image_id, data in samples.items():
                (samples_dir / f"{image_id}.img").write_bytes(data)
    result = {"num_rows": num_ok}
    if write_dir is not None:
        result["num_bytes_written"] = num_written
    (args.out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

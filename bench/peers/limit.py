"""The imaging floor: one process per core, no engine, Ray or datasets.

Resize mode: open → draft → thumbnail → EXIF transpose → JPEG encode into memory.
Pass-through mode: read bytes → parse the header.
Writes ``result.json`` (counts) and a few encoded images under ``samples/`` for the check.
"""

from __future__ import annotations

import json
import math
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from bench.peers.common import Row, fast_resize_encode, header_size, peer_args, read_manifest

NUM_SAMPLES = 20


def process_chunk(chunk: list[tuple[int, Row]], *, mode: str, max_size: int, quality: int,
                  sample_every: int) -> tuple[int, dict[str, bytes]]:
    num_ok = 0
    samples: dict[str, bytes] = {}
    for index, row in chunk:
        data = Path(row.path).read_bytes()
        if mode == "passthrough":
            out = data if header_size(data) is not None else None
        else:
            out = fast_resize_encode(data, max_size, quality)
        if out is None:
            continue
        num_ok += 1
        if index % sample_every == 0:
            samples[row.image_id] = out
    return num_ok, samples


def main() -> None:
    args = peer_args(__doc__.splitlines()[0])
    rows = read_manifest(args.manifest)
    indexed = list(enumerate(rows))
    chunk_size = max(1, math.ceil(len(rows) / (args.workers * 8)))
    chunks = [indexed[i:i + chunk_size] for i in range(0, len(indexed), chunk_size)]
    work = partial(process_chunk, mode=args.mode, max_size=args.max_size, quality=args.quality,
                   sample_every=max(1, len(rows) // NUM_SAMPLES))
    num_ok = 0
    samples_dir = args.out / "samples"
    samples_dir.mkdir(exist_ok=True)
    with Pool(args.workers) as pool:
        for ok, samples in pool.imap_unordered(work, chunks):
            num_ok += ok
            for image_id, data in samples.items():
                (samples_dir / f"{image_id}.img").write_bytes(data)
    (args.out / "result.json").write_text(json.dumps({"num_rows": num_ok}))


if __name__ == "__main__":
    main()

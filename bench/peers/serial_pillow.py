"""The naive single-process script.

Full decode, ``ImageOps.exif_transpose``, ``thumbnail(..., LANCZOS)``, the PIL image put into a
``datasets`` ``Image`` feature (stored as PNG, since the image has no format any more),
``Dataset.from_generator``, then ``to_parquet`` (``save_to_disk`` for packed Arrow).
"""

from __future__ import annotations

from datasets import Dataset

from bench.peers.common import (
    hf_features,
    hf_record,
    load_rotate_resize,
    peer_args,
    read_instructions,
    read_manifest,
    write_hf,
)


def main() -> None:
    args = peer_args(__doc__.splitlines()[0])
    rows = read_manifest(args.manifest)
    instructions = read_instructions(args.config)

    def generate():
        for row in rows:
            image = load_rotate_resize(row.path, args.max_size)
            if image is not None:
                yield hf_record(args.layout, row.image_id, image, row.output, instructions)

    ds = Dataset.from_generator(generate, features=hf_features(args.layout))
    write_hf(ds, args)


if __name__ == "__main__":
    main()

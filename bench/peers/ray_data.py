"""Ray Data as a user would write it.

``ray.data.read_binary_files`` → ``map_batches`` (decode, ``exif_transpose``, thumbnail, JPEG
encode; or header check only in pass-through mode) → ``write_parquet``.
Ray Data has no ``save_to_disk`` layout, so the packed Arrow scenario does not apply.
"""

from __future__ import annotations

import os
import sys

import ray

from bench.peers.common import encode_jpeg, header_size, load_rotate_resize, peer_args, read_manifest


def main() -> None:
    args = peer_args(__doc__.splitlines()[0])
    if args.layout != "parquet":
        sys.exit("not applicable: Ray Data has no save_to_disk (packed Arrow) writer")
    rows = read_manifest(args.manifest)
    by_path = {os.path.abspath(row.path): row for row in rows}

    def convert(batch: dict) -> dict:
        out: dict[str, list] = {"image_id": [], "image": [], "output": []}
        for data, path in zip(batch["bytes"], batch["path"]):
            row = by_path["/" + str(path).lstrip("/")]
            if args.mode == "passthrough":
                encoded = data if header_size(data) is not None else None
            else:
                image = load_rotate_resize(bytes(data), args.max_size)
                encoded = None if image is None else encode_jpeg(image, args.quality)
            if encoded is None:
                continue
            out["image_id"].append(row.image_id)
            out["image"].append(bytes(encoded))
            out["output"].append(row.output)
        return out

    ray.init(num_cpus=args.workers, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_binary_files(list(by_path), include_paths=True)
    ds = ds.map_batches(convert, batch_size=16, batch_format="numpy")
    ds.write_parquet(str(args.out / "data"))
    ray.shutdown()


if __name__ == "__main__":
    main()

"""How users script it today with Hugging Face ``datasets``.

``Dataset.from_generator`` over the manifest, ``.map(load_rotate_resize, num_proc=cores)``
returning PIL images (full decode, ``ImageOps.exif_transpose``, thumbnail), cast to the
``Image`` feature, then ``to_parquet`` (or ``save_to_disk`` for packed Arrow).
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, Features, Value

from bench.peers.common import (
    hf_features,
    hf_record,
    load_rotate_resize,
    passthrough_bytes,
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
            yield {"image_id": row.image_id, "path": row.path, "output": row.output}

    def load_batch(batch: dict) -> dict:
        out: dict[str, list] = {name: [] for name in hf_features(args.layout)}
        for image_id, path, output in zip(batch["image_id"], batch["path"], batch["output"]):
            if args.mode == "passthrough":
                data = passthrough_bytes(path)
                image = None if data is None else {"bytes": data, "path": Path(path).name}
            else:
                image = load_rotate_resize(path, args.max_size)
            if image is None:
                continue
            for name, value in hf_record(args.layout, image_id, image, output, instructions).items():
                out[name].append(value)
        return out

    plain = Features({"image_id": Value("string"), "path": Value("string"), "output": Value("string")})
    ds = Dataset.from_generator(generate, features=plain)
    ds = ds.map(
        load_batch,
        batched=True,
        batch_size=16,
        num_proc=args.workers,
        remove_columns=ds.column_names,
        features=hf_features(args.layout),
    )
    ds = ds.cast(hf_features(args.layout))
    write_hf(ds, args)


if __name__ == "__main__":
    main()

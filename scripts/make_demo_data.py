"""Make a small demo dataset: price-tag-like photos (some EXIF-rotated), a labelr manifest with a
few bad rows, and config.json. Deterministic (seeded)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

ROTATE_FOR_TAG = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
CONFIG = {
    "instructions": "Extract the product name and the price from this price tag.",
    "json_schema": {
        "type": "object",
        "properties": {
            "product": {"type": "string", "description": "product name as printed"},
            "price": {"type": "number", "minimum": 0, "description": "price in the tag's currency"},
            "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        },
        "required": ["product", "price", "currency"],
        "additionalProperties": False,
    },
}


def price_tag(rng: np.random.Generator, product: str, price: float, size=(2000, 1500)) -> Image.Image:
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    base = rng.uniform(90, 200, 3)
    arr = base * (0.7 + 0.3 * x) * (0.8 + 0.2 * y) + rng.normal(0, 6, (h, w, 3))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.rectangle(
        [w * 0.15, h * 0.3, w * 0.85, h * 0.7], fill=(250, 250, 240), outline=(20, 20, 20), width=8
    )
    draw.text((w * 0.2, h * 0.36), product, fill=(0, 0, 0), font_size=int(h * 0.08))
    draw.text((w * 0.2, h * 0.5), f"{price:.2f} EUR", fill=(200, 0, 0), font_size=int(h * 0.12))
    return im


def main(folder: str, n: int = 40) -> None:
    rng = np.random.default_rng(7)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        product, price = f"Product {i:03d}", round(float(rng.uniform(0.5, 20)), 2)
        upright = price_tag(rng, product, price)
        tag = (1, 1, 6, 3, 8)[i % 5]
        stored = upright.transpose(ROTATE_FOR_TAG[tag]) if tag != 1 else upright
        exif = Image.Exif()
        exif[0x0112] = tag
        path = f"images/{i:03d}.jpg"
        stored.save(os.path.join(folder, path), quality=90, exif=exif.tobytes())
        barcode = f"{3000000000000 + i}"
        rows.append(
            {
                "image_id": f"{barcode}_1",
                "image_path": path,
                "barcode": barcode,
                "off_image_id": "1",
                "output": {"product": product, "price": price, "currency": "EUR"},
            }
        )
    with open(os.path.join(folder, "images", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    rows += [
        {
            "image_id": "dup",
            "image_path": "images/000.jpg",
            "output": {"product": "a", "price": 1, "currency": "EUR"},
        },
        {
            "image_id": "dup",
            "image_path": "images/001.jpg",
            "output": {"product": "b", "price": 2, "currency": "EUR"},
        },
        {
            "image_id": "broken",
            "image_path": "images/broken.jpg",
            "output": {"product": "c", "price": 3, "currency": "EUR"},
        },
        {
            "image_id": "missing",
            "image_path": "images/missing.jpg",
            "output": {"product": "d", "price": 4, "currency": "EUR"},
        },
        {
            "image_id": "bad-output",
            "image_path": "images/002.jpg",
            "output": {"product": "e", "price": -1, "currency": "EUR"},
        },
    ]
    with open(os.path.join(folder, "annotations.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write("this line is not JSON\n")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    print(f"demo data: {n} photos + 6 bad rows in {folder}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo/input")

"""Make an image set whose labels follow a known visual rule: which shape is drawn.

Four classes, one shape each (ring, filled square, horizontal bar, vertical bar), drawn at
a random place, size and colour on a noisy background of another colour, as PNG files in
class folders (`data.source = "images"`). No class can be told from colour or position,
only from the shape, and every shape looks like itself mirrored, so the left-right flip
augmentation keeps labels true. A model at chance has a loss of ln 4 = 1.386.

    python examples/imaging/make_data.py --out data/shapes --per-class 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("ring", "square", "hbar", "vbar")


def draw(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    colour = tuple(int(c) for c in (background + rng.choice([-1, 1], 3) * rng.integers(90, 160, 3)) % 256)
    d = ImageDraw.Draw(image)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
    if shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, r // 3))
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "hbar":
        d.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=colour)
    else:
        d.rectangle([cx - r // 3, cy - r, cx + r // 3, cy + r], fill=colour)
    return image


def make(out: Path, per_class: int, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for shape in CLASSES:
        (out / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(shape, size, rng).save(out / shape / f"{i:05d}.png")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/shapes", help="folder of class folders to write")
    parser.add_argument("--per-class", type=int, default=300, help="images of each class")
    parser.add_argument("--size", type=int, default=40, help="width and height in pixels")
    args = parser.parse_args()
    path = make(Path(args.out), args.per_class, args.size)
    print(f"{args.per_class * len(CLASSES)} images in {len(CLASSES)} classes: {path}")

"""`data.source = "images"`: a folder of class folders, or a CSV/Parquet of (path, label).

Images are decoded with Pillow when their batch is read (in loader worker processes with
`data.loader_workers` > 0), resized so the short side is 9/8 of `data.image_size`, cropped
to `image_size` (at random for training, centred for validation), flipped left-right half
the time (training, `data.augment`) and normalised; a batch is a [B, 3, H, W] float tensor.
The random crop and flip of a sample come from a generator seeded by (seed, epoch, sample
id), so a batch is the same whichever process reads it and however many do.

The validation split is a fixed pseudo-random `val_fraction` of the images (not the tail,
which in a class-folder listing would be the last class).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from shoal.config import ConfigError
from shoal.data.factory import BadRecord
from shoal.data.spec import DataSpec

log = logging.getLogger("shoal")

SUFFIXES = (".png", ".jpg", ".jpeg")
MEAN, STD = 0.5, 0.25
"""Pixel values in [0, 1] become (v - MEAN) / STD: centred, roughly unit scale."""


def list_images(path: str, label_column: str = "") -> tuple[list[tuple[str, int]], list[str]]:
    """([(file, class id)], class names) of a class-folder tree or a CSV/Parquet listing."""
    root = Path(path)
    if root.is_dir():
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        items = [(str(f), c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
                 if f.suffix.lower() in SUFFIXES]
        if not items:
            raise ConfigError(f"data.path: no class folders of .png/.jpg images under {root}")
        return items, classes
    label_column = label_column or "label"
    if root.suffix == ".csv":
        with open(root, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    elif root.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(root)
        fields, rows = table.column_names, table.to_pylist()
    else:
        raise ConfigError(f"data.path: {root} is neither a folder of class folders nor a .csv/.parquet listing")
    for column in ("path", label_column):
        if column not in fields:
            raise ConfigError(f"{root}: no '{column}' column (columns: {', '.join(fields)})")
    if not rows:
        raise ConfigError(f"{root}: lists no images")
    labels = [str(r[label_column]) for r in rows]
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    classes = sorted(set(labels), key=int if numeric else str)
    ids = {name: (int(name) if numeric else i) for i, name in enumerate(classes)}
    if numeric and min(ids.values()) < 0:
        raise ConfigError(f"{root}: labels must be class names or ids from 0")
    items = [(str(root.parent / r["path"]), ids[label]) for r, label in zip(rows, labels)]
    return items, [str(c) for c in range(max(ids.values()) + 1)] if numeric else classes


class ImageSet:
    """Images read by sample id: `get(ids, epoch)` -> ([B, 3, S, S] float, [B] class ids)."""

    def __init__(self, items: list[tuple[str, int]], size: int, *, train: bool, augment: bool, seed: int,
                 on_bad_record: str = "error"):
        self.items, self.size, self.seed = items, size, seed
        self.random = train and augment
        self.on_bad_record, self.bad_records = on_bad_record, 0

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, epoch: int) -> torch.Tensor:
        from PIL import Image
        path = self.items[i][0]
        with Image.open(path) as image:
            image = image.convert("RGB")
        scale = self.size * 9 / 8 / min(image.size)
        image = image.resize((max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))),
                             Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0  # H, W, 3
        h, w = pixels.shape[:2]
        if self.random:
            rng = np.random.default_rng([self.seed, epoch, i])
            top, left = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
            flip = bool(rng.integers(0, 2))
        else:
            top, left, flip = (h - self.size) // 2, (w - self.size) // 2, False
        crop = pixels[top:top + self.size, left:left + self.size]
        if flip:
            crop = crop[:, ::-1]
        return torch.from_numpy((np.ascontiguousarray(crop.transpose(2, 0, 1)) - MEAN) / STD)

    def get(self, ids: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for i in ids.tolist():
            try:
                images.append(self.load(i, epoch))
            except (OSError, ValueError, SyntaxError) as err:  # Pillow's errors for a corrupt or truncated file
                if self.on_bad_record == "error":
                    raise BadRecord(f"{self.items[i][0]}: not a readable image ({err}); data.on_bad_record = "
                                    f"'skip' drops such images") from None
                self.bad_records += 1
                log.warning("skipped %s (%s); %d bad images so far", self.items[i][0], err, self.bad_records)
                continue
            labels.append(self.items[i][1])
        if not images:
            raise BadRecord(f"data.path: every image of a batch was unreadable ({self.items[int(ids[0])][0]}, ...)")
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def build_images(cfg, seed: int = 0) -> tuple[object, ImageSet, DataSpec]:
    """(train, validation, spec) for data.source = 'images'."""
    from shoal.data.loader import wrap_for_training
    items, classes = list_images(cfg.path, cfg.label)
    missing = next((path for path, _ in items if not Path(path).is_file()), None)
    if missing:
        raise ConfigError(f"{cfg.path}: lists {missing}, which does not exist")
    if len(classes) < 2:
        raise ConfigError(f"data.path: {cfg.path} has {len(classes)} class; a classifier needs at least 2")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()  # fixed for the data set
    n_val = int(len(items) * cfg.val_fraction)
    train_items = [items[i] for i in order[:len(items) - n_val]]
    val_items = [items[i] for i in order[len(items) - n_val:]]
    train = ImageSet(train_items, cfg.image_size, train=True, augment=cfg.augment, seed=seed,
                     on_bad_record=cfg.on_bad_record)
    val = ImageSet(val_items, cfg.image_size, train=False, augment=False, seed=seed, on_bad_record=cfg.on_bad_record)
    spec = DataSpec(kind="classes", num_classes=len(classes), in_features=3 * cfg.image_size ** 2,
                    input_shape=(3, cfg.image_size, cfg.image_size))
    return wrap_for_training(train, cfg), val, spec

"""ImageFolder: your own images, one folder per class, with a JSON class-split file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from episodes.datasets.images import IMAGE_EXTENSIONS, decode_images
from episodes.datasets.registry import RawSplit, register_dataset, split_aliases

__all__ = ["load_imagefolder"]


@register_dataset(
    "imagefolder",
    "one folder per class + splits.json",
    options=("split_file", "image_size", "channels"),
)
def load_imagefolder(source: Path, split: str, options: dict) -> RawSplit:
    """``source/<class>/<image>`` with a class-split file (JSON ``{"train": [...], ...}``)."""
    split_file = Path(options.get("split_file") or source / "splits.json")
    if not split_file.is_file():
        raise FileNotFoundError(
            f"ImageFolder class-split file not found: {split_file} (a JSON object "
            '{"train": [class folders], "val": [...], "test": [...]}; pass split_file=)'
        )
    try:
        class_splits = json.loads(split_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{split_file}: not valid JSON: {error}") from error
    key = next((k for k in split_aliases(split) if k in class_splits), None)
    if key is None:
        raise ValueError(
            f"{split_file}: no class list for split {split!r} (keys {sorted(class_splits)})"
        )
    names = list(class_splits[key])
    if not names:
        raise ValueError(f"{split_file}: split {split!r} lists no classes")
    paths, labels = [], []
    for label, name in enumerate(names):
        folder = source / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"class folder {folder} (listed in {split_file.name}) not found"
            )
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"class folder {folder} holds no images ({IMAGE_EXTENSIONS})")
        paths += files
        labels += [label] * len(files)
    size = options.get("image_size")
    size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
    mode = {1: "L", 3: "RGB"}.get(int(options.get("channels", 3)))
    if mode is None:
        raise ValueError(f"ImageFolder: channels must be 1 or 3, got {options.get('channels')}")
    images = decode_images(paths, size, mode)
    return RawSplit(images, np.asarray(labels, dtype=np.int64), names)

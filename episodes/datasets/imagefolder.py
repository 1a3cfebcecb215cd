"""ImageFolder: your own images, one folder per class, in either common layout:

* ``root/{train,val,test}/<class>/*.png`` (split folders; detected, no split file needed;
  ``validation``/``valid`` accepted for ``val``), or
* ``root/<class>/*.png`` plus a JSON class-split file (``root/splits.json`` or
  ``split_file=``): ``{"train": [class folders], "val": [...], "test": [...]}``.

Channels follow the images unless ``channels`` is given: all grayscale → 1, else 3; the
choice is logged (logger ``episodes.datasets``) and visible in the split's image shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from episodes.datasets.images import IMAGE_EXTENSIONS, decode_images, image_mode
from episodes.datasets.registry import SPLITS, RawSplit, register_dataset, split_aliases

__all__ = ["load_imagefolder", "imagefolder_layout", "imagefolder_classes"]

log = logging.getLogger("episodes.datasets")


def _split_folder(source: Path, split: str) -> Path | None:
    return next((source / a for a in split_aliases(split) if (source / a).is_dir()), None)


def imagefolder_layout(source: Path, split_file: str | Path | None = None) -> str:
    """``"split-file"`` or ``"split-folders"``: which layout ``source`` holds (a split file,
    given or ``root/splits.json``, wins over split folders)."""
    if split_file is not None or (source / "splits.json").is_file():
        return "split-file"
    if all(_split_folder(source, split) is not None for split in SPLITS):
        return "split-folders"
    raise FileNotFoundError(
        f"{source}: no ImageFolder layout found. Expected either split folders "
        "train/, val/ (or validation/), test/, each holding one folder per class, or class "
        f"folders plus a class-split file {source / 'splits.json'} (a JSON object "
        '{"train": [class folders], "val": [...], "test": [...]}; pass split_file=)'
    )


def _class_folders_from_file(source: Path, split: str, split_file: Path) -> dict[str, Path]:
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
    for name in names:
        if not (source / name).is_dir():
            raise FileNotFoundError(
                f"class folder {source / name} (listed in {split_file.name}) not found"
            )
    return {name: source / name for name in names}  # the listed names are the class names


def imagefolder_classes(
    source: Path, split: str, split_file: str | Path | None = None
) -> list[tuple[str, list[Path]]]:
    """``[(class name, image files in name order), ...]`` of ``split`` in either layout."""
    if imagefolder_layout(source, split_file) == "split-file":
        folders = _class_folders_from_file(
            source, split, Path(split_file or source / "splits.json")
        )
    else:
        root = _split_folder(source, split)
        folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}
        if not folders:
            raise FileNotFoundError(f"split folder {root} holds no class folders")
    classes = []
    for name, folder in folders.items():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"class folder {folder} holds no images ({IMAGE_EXTENSIONS})")
        classes.append((name, files))
    return classes


def _mode(source: Path, options: dict) -> str:
    channels = options.get("channels")
    if channels in (None, "auto"):
        files = [
            path
            for split in SPLITS
            for _, paths in imagefolder_classes(source, split, options.get("split_file"))
            for path in paths
        ]
        mode = image_mode(files)
        log.info(
            "imagefolder %s: %s, so channels=%d (pass channels= to choose)",
            source,
            "every image is grayscale" if mode == "L" else "some images are in colour",
            1 if mode == "L" else 3,
        )
        return mode
    mode = {1: "L", 3: "RGB"}.get(int(channels)) if str(channels).isdigit() else None
    if mode is None:
        raise ValueError(f"ImageFolder: channels must be 1, 3 or 'auto', got {channels!r}")
    return mode


@register_dataset(
    "imagefolder",
    "one folder per class: train/val/test folders, or a splits.json",
    options=("split_file", "image_size", "channels"),
)
def load_imagefolder(source: Path, split: str, options: dict) -> RawSplit:
    """Split ``split`` of an image-folder dataset (see the module docstring). Options:
    ``split_file``, ``image_size`` (int or (H, W); resize, needed when sizes differ),
    ``channels`` (1, 3, or None/"auto" = follow the images)."""
    classes = imagefolder_classes(source, split, options.get("split_file"))
    paths = [path for _, files in classes for path in files]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(f) for _, f in classes])
    size = options.get("image_size")
    size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
    images = decode_images(paths, size, _mode(source, options))
    return RawSplit(images, labels, [name for name, _ in classes])

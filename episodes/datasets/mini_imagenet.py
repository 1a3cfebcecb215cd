"""Mini-ImageNet (Vinyals et al., 2016; the Ravi & Larochelle 64/16/20 class split) in its
three common layouts: the cache pickles, images + split CSVs, torchmeta's HDF5."""

from __future__ import annotations

import csv
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from episodes.datasets.images import decode_images
from episodes.datasets.registry import RawSplit, register_dataset

__all__ = ["detect_mini_imagenet_layout", "load_mini_imagenet", "MINI_IMAGENET_SHAPE"]

MINI_IMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}
MINI_IMAGENET_IMAGES_PER_CLASS = 600
MINI_IMAGENET_SHAPE = (84, 84, 3)
_PICKLE_NAMES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
_CSV_NAMES = {"train": ("train.csv",), "val": ("val.csv", "validation.csv"), "test": ("test.csv",)}


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def detect_mini_imagenet_layout(source: str | os.PathLike) -> str:
    """Which Mini-ImageNet layout ``source`` holds: ``"pickle"``, ``"csv"`` or ``"hdf5"``."""
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"Mini-ImageNet source folder not found: {folder}")
    if any(folder.glob("mini-imagenet-cache-*.pkl")):
        return "pickle"
    if any(_first_existing(folder, names) for names in _CSV_NAMES.values()):
        return "csv"
    if any(folder.glob("*_data.hdf5")):
        return "hdf5"
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise FileNotFoundError(
        f"{folder} holds no Mini-ImageNet layout. Expected one of: (1) cache pickles "
        "mini-imagenet-cache-{train,val|validation,test}.pkl; (2) images/ plus "
        "train.csv/val.csv/test.csv; (3) torchmeta {split}_data.hdf5 plus {split}_labels.json. "
        f"Found: {found}"
    )


def _unpickle(path: Path) -> object:
    try:
        with path.open("rb") as handle:
            # latin1 lets Python 2 pickles (numpy arrays inside) load too; harmless for Python 3.
            return pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, ImportError) as error:
        raise ValueError(
            f"cannot read pickle {path} (truncated or not a pickle?): {error}"
        ) from error


def _str_keys(mapping: object, path: Path) -> dict:
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(mapping).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in mapping.items()}


def _load_mini_imagenet_pickle(folder: Path, split: str) -> RawSplit:
    path = _first_existing(folder, _PICKLE_NAMES[split])
    if path is None:
        raise FileNotFoundError(
            f"missing Mini-ImageNet pickle for split {split!r} in {folder}: tried "
            f"{', '.join(_PICKLE_NAMES[split])}"
        )
    data = _str_keys(_unpickle(path), path)
    missing = [key for key in ("image_data", "class_dict") if key not in data]
    if missing:
        raise ValueError(
            f"{path}: missing key(s) {missing}; expected 'image_data' (N×84×84×3 uint8) and "
            f"'class_dict' (wnid -> row indices), found {sorted(data)}"
        )
    images = np.asarray(data["image_data"])
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{path}: 'image_data' must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    class_dict = _str_keys(data["class_dict"], path)
    names = sorted(class_dict)
    # A class's images in class_dict's order (rows no class lists are dropped, as the source
    # libraries do).
    class_rows = [np.asarray(class_dict[name], dtype=np.int64).reshape(-1) for name in names]
    for name, rows in zip(names, class_rows):
        if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
            raise ValueError(
                f"{path}: class_dict[{name!r}] has row indices outside 0..{len(images) - 1}"
            )
    labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(r) for r in class_rows])
    return RawSplit(images[np.concatenate(class_rows)], labels, names)


def _load_mini_imagenet_csv(folder: Path, split: str) -> RawSplit:
    path = _first_existing(folder, _CSV_NAMES[split])
    if path is None:
        raise FileNotFoundError(
            f"missing Mini-ImageNet CSV for split {split!r} in {folder}: tried "
            f"{', '.join(_CSV_NAMES[split])}"
        )
    image_folder = folder / "images"
    if not image_folder.is_dir():
        raise FileNotFoundError(
            f"missing Mini-ImageNet image folder {image_folder} (next to {path.name})"
        )
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["filename", "label"]:
            raise ValueError(f"{path}: expected the header 'filename,label', got {header}")
        rows = [row for row in reader if row]
    for line, row in enumerate(rows, start=2):
        if len(row) != 2:
            raise ValueError(f"{path}, line {line}: expected 2 fields (filename,label), got {row}")
    names = sorted({label for _, label in rows})
    label_of = {name: i for i, name in enumerate(names)}
    images = decode_images(
        [image_folder / filename for filename, _ in rows], MINI_IMAGENET_SHAPE[:2], "RGB"
    )
    labels = np.array([label_of[label] for _, label in rows], dtype=np.int64)
    return RawSplit(images, labels, names)


def _load_mini_imagenet_hdf5(folder: Path, split: str) -> RawSplit:
    data_path = folder / f"{split}_data.hdf5"
    labels_path = folder / f"{split}_labels.json"
    for path in (data_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(f"missing torchmeta Mini-ImageNet file {path}")
    try:
        import h5py
    except ImportError as error:
        raise ImportError(
            "reading torchmeta's HDF5 files needs h5py: pip install 'fewshot-nsl[hdf5]'"
        ) from error
    try:
        names = json.loads(labels_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{labels_path}: not valid JSON: {error}") from error
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{labels_path}: expected a JSON list of class names (wnids)")
    try:
        with h5py.File(data_path, "r") as handle:
            if "datasets" not in handle:
                raise ValueError(f"{data_path}: no 'datasets' group (found {list(handle)})")
            group = handle["datasets"]
            missing = [n for n in names if n not in group]
            if missing:
                raise ValueError(
                    f"{data_path}: classes {missing[:5]} of {labels_path.name} are missing"
                )
            blocks = [np.asarray(group[n][()], dtype=np.uint8) for n in names]
    except OSError as error:
        raise ValueError(f"cannot read HDF5 file {data_path}: {error}") from error
    shapes = {block.shape[1:] for block in blocks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"{data_path}: class datasets must all be (n, H, W, 3), got {shapes}")
    labels = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, b in enumerate(blocks)])
    return RawSplit(np.concatenate(blocks), labels, list(names))


def _check_mini_imagenet(splits: dict[str, RawSplit]) -> list[str]:
    problems = []
    for split, raw in splits.items():
        want = MINI_IMAGENET_CLASSES[split]
        if len(raw.class_names) != want:
            problems.append(f"split {split!r} has {len(raw.class_names)} classes (expected {want})")
        counts = np.bincount(raw.labels, minlength=len(raw.class_names))
        wrong = [
            f"{raw.class_names[c]}: {counts[c]}"
            for c in np.flatnonzero(counts != MINI_IMAGENET_IMAGES_PER_CLASS)
        ]
        if wrong:
            problems.append(
                f"split {split!r}: {len(wrong)} class(es) do not have "
                f"{MINI_IMAGENET_IMAGES_PER_CLASS} images ({', '.join(wrong[:5])}"
                f"{', ...' if len(wrong) > 5 else ''})"
            )
        if tuple(raw.images.shape[1:]) != MINI_IMAGENET_SHAPE:
            problems.append(
                f"split {split!r}: images are {raw.images.shape[1:]} "
                f"(expected {MINI_IMAGENET_SHAPE})"
            )
    return problems


@register_dataset(
    "mini-imagenet",
    "Ravi & Larochelle split, 64/16/20 × 600, 84×84",
    checker=_check_mini_imagenet,
)
def load_mini_imagenet(source: Path, split: str, options: dict) -> RawSplit:
    layout = detect_mini_imagenet_layout(source)
    loader = {
        "pickle": _load_mini_imagenet_pickle,
        "csv": _load_mini_imagenet_csv,
        "hdf5": _load_mini_imagenet_hdf5,
    }[layout]
    return loader(source, split)

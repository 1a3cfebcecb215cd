"""Few-shot datasets: the registry behind `build_split`, the canonical cache, the converters.

Every real dataset is read by a *loader* ``(source, split, options) -> RawSplit`` from the files
users hold, then either

* written once to the **canonical cache** by :func:`prepare_dataset` /
  :func:`prepare_mini_imagenet`: ``{split}.npy`` (uint8 ``(N, H, W, C)``, images ordered class
  by class, memory-mappable) plus ``index.json`` (class names, counts, image shape, train
  mean/std, per-split content fingerprints), written to a temp folder and renamed; or
* read directly by ``build_split(name, split, root=<source folder>)`` (decodes every time).

``build_split(name, split, root=<cache folder>)`` reads the cache (memory-mapped by default).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from episodes.cifar import read_cifar_split
from episodes.split import ImageSplit, channel_mean_std, content_fingerprint

__all__ = [
    "SPLITS",
    "RawSplit",
    "build_split",
    "list_datasets",
    "load_cache",
    "prepare_dataset",
    "prepare_mini_imagenet",
    "detect_mini_imagenet_layout",
    "CIFAR_FS_SPLITS",
    "FC100_SUPERCLASS_SPLITS",
    "CIFAR100_SUPERCLASSES",
]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}
CACHE_FORMAT = "fewshot-nsl-cache"
CACHE_VERSION = 1
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _canonical_split_name(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


@dataclass
class RawSplit:
    """A split as a loader returns it: uint8 ``(N, H, W, C)`` images, labels, class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def canonical(self) -> RawSplit:
        """Classes sorted by name, images class by class (source order kept within a class).

        Every layout of a dataset converts to this order, so their caches are identical.
        """
        order_of_names = sorted(range(len(self.class_names)), key=lambda c: self.class_names[c])
        new_label = np.empty(len(self.class_names), dtype=np.int64)
        new_label[order_of_names] = np.arange(len(order_of_names))
        labels = new_label[np.asarray(self.labels, dtype=np.int64)]
        rows = np.argsort(labels, kind="stable")
        return RawSplit(
            images=np.ascontiguousarray(self.images[rows]),
            labels=labels[rows],
            class_names=[self.class_names[c] for c in order_of_names],
        )


# --------------------------------------------------------------------------- image decoding


def _decode_image(path: Path, size: tuple[int, int] | None, mode: str) -> np.ndarray:
    """One image file as uint8 ``(H, W, C)``; resized (bilinear) to ``size`` = (H, W) if given."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here, naming the file
            image = image.convert(mode)
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def decode_images(
    paths: Sequence[Path], size: tuple[int, int] | None, mode: str = "RGB"
) -> np.ndarray:
    """Decode image files (threads: Pillow releases the GIL) into uint8 ``(N, H, W, C)``.

    Without ``size`` every image must have the size of the first; otherwise the first one
    that differs is named in a ``ValueError``.
    """
    if not paths:
        raise ValueError("no image files to decode")
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda p: _decode_image(Path(p), size, mode), paths))
    first = decoded[0].shape
    for path, pixels in zip(paths, decoded):
        if pixels.shape != first:
            raise ValueError(
                f"image {path} is {pixels.shape[1]}x{pixels.shape[0]}, but {paths[0]} is "
                f"{first[1]}x{first[0]}: pass image_size= to resize them all"
            )
    return np.stack(decoded)


# --------------------------------------------------------------------------- Mini-ImageNet

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


def _load_mini_imagenet(source: Path, split: str, options: dict) -> RawSplit:
    layout = detect_mini_imagenet_layout(source)
    loader = {
        "pickle": _load_mini_imagenet_pickle,
        "csv": _load_mini_imagenet_csv,
        "hdf5": _load_mini_imagenet_hdf5,
    }[layout]
    return loader(source, split)


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


# --------------------------------------------------------------------------- Omniglot

#: Character counts of the Vinyals et al. (2016) Omniglot split as used by ProtoNets
#: (train 1028, val 172, test 423 characters; ×4 rotations each). The contiguous ranges
#: below give the published lists (ProtoNets data/omniglot/splits/vinyals, torchmeta
#: assets/omniglot) once the 5 validation alphabets of images_background are moved between
#: train and test (see `_vinyals_order`).
OMNIGLOT_SPLIT_SIZES = {"train": 1028, "val": 172, "test": 423}
#: The background alphabets that make up the Vinyals validation split (172 characters).
OMNIGLOT_VAL_ALPHABETS = frozenset(
    {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
)
OMNIGLOT_IMAGES_PER_CHARACTER = 20


def _omniglot_characters(source: Path) -> list[tuple[str, list[Path]]]:
    """(name, image paths) of every character: images_background first, then images_evaluation."""
    roots = [source / part for part in ("images_background", "images_evaluation")]
    roots = [root for root in roots if root.is_dir()]
    if not roots:
        raise FileNotFoundError(
            f"{source}: no images_background/ or images_evaluation/ folder (the standard Omniglot "
            "layout: images_background/<alphabet>/<character>/*.png)"
        )
    characters = []
    for root in roots:
        for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
            for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                files = sorted(p for p in character.iterdir() if p.suffix.lower() == ".png")
                if not files:
                    raise FileNotFoundError(f"Omniglot character folder {character} holds no .png")
                characters.append((f"{alphabet.name}/{character.name}", files))
    return characters


def _omniglot_split_ranges(total: int, strict: bool) -> dict[str, range]:
    full = sum(OMNIGLOT_SPLIT_SIZES.values())
    if total == full:
        sizes = dict(OMNIGLOT_SPLIT_SIZES)
    elif strict:
        raise ValueError(
            f"Omniglot: found {total} characters, expected {full} (use strict=False for a subset)"
        )
    else:  # a subset: the same proportions, at least one character per split
        if total < 3:
            raise ValueError(f"Omniglot: need at least 3 characters for 3 splits, found {total}")
        val = max(1, round(total * OMNIGLOT_SPLIT_SIZES["val"] / full))
        test = max(1, round(total * OMNIGLOT_SPLIT_SIZES["test"] / full))
        sizes = {"train": total - val - test, "val": val, "test": test}
    start_val = sizes["train"]
    start_test = start_val + sizes["val"]
    return {
        "train": range(0, start_val),
        "val": range(start_val, start_test),
        "test": range(start_test, total),
    }


def _vinyals_order(
    characters: list[tuple[str, list[Path]]],
) -> list[tuple[str, list[Path]]]:
    """Reorder the full character list so the contiguous split ranges give the Vinyals split.

    The published split is train = the first 1028 non-validation characters (background then
    evaluation, sorted), val = the 5 validation alphabets, test = the remaining 423.
    """
    is_val = [name.split("/", 1)[0] in OMNIGLOT_VAL_ALPHABETS for name, _ in characters]
    val = [c for c, v in zip(characters, is_val) if v]
    rest = [c for c, v in zip(characters, is_val) if not v]
    if len(val) != OMNIGLOT_SPLIT_SIZES["val"]:
        raise ValueError(
            f"Omniglot: the validation alphabets {sorted(OMNIGLOT_VAL_ALPHABETS)} hold "
            f"{len(val)} characters, expected {OMNIGLOT_SPLIT_SIZES['val']}"
        )
    n_train = OMNIGLOT_SPLIT_SIZES["train"]
    return rest[:n_train] + val + rest[n_train:]


def _load_omniglot(source: Path, split: str, options: dict) -> RawSplit:
    strict = options.get("strict", True)
    size = int(options.get("image_size", 28))
    rotations = bool(options.get("rotations", True))
    characters = _omniglot_characters(source)
    if len(characters) == sum(OMNIGLOT_SPLIT_SIZES.values()):
        characters = _vinyals_order(characters)
    chosen = [characters[i] for i in _omniglot_split_ranges(len(characters), strict)[split]]
    paths = [path for _, files in chosen for path in files]
    images = decode_images(paths, (size, size), "L")
    counts = [len(files) for _, files in chosen]
    base_labels = np.repeat(np.arange(len(chosen)), counts)
    names = [name for name, _ in chosen]
    if not rotations:
        return RawSplit(images, base_labels, names)
    blocks, labels, all_names = [], [], []
    for quarter in range(4):  # quarter turns counter-clockwise: each a class of its own
        blocks.append(np.rot90(images, k=quarter, axes=(1, 2)))
        labels.append(base_labels + quarter * len(names))
        all_names += [f"{name}/rot{90 * quarter:03d}" for name in names]
    return RawSplit(np.concatenate(blocks), np.concatenate(labels), all_names)


def _check_omniglot(splits: dict[str, RawSplit]) -> list[str]:
    problems = []
    for split, raw in splits.items():
        counts = np.bincount(raw.labels, minlength=len(raw.class_names))
        wrong = np.flatnonzero(counts != OMNIGLOT_IMAGES_PER_CHARACTER)
        if len(wrong):
            problems.append(
                f"split {split!r}: {len(wrong)} class(es) do not have "
                f"{OMNIGLOT_IMAGES_PER_CHARACTER} images (e.g. {raw.class_names[wrong[0]]}: "
                f"{counts[wrong[0]]})"
            )
    return problems


# --------------------------------------------------------------------------- CIFAR-FS, FC100

#: CIFAR-100's 20 superclasses and their fine classes (the dataset's own grouping).
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

#: FC100 (Oreshkin et al., 2018): split by superclass, 12/4/4 superclasses = 60/20/20 classes.
#: All three lists checked against torchmeta's datasets/assets/cifar100/fc100/*.json.
FC100_SUPERCLASS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip

_CIFAR_FS_VAL = (
    "otter", "motorcycle", "television", "lamp", "crocodile", "shark", "butterfly", "beaver",
    "beetle", "tractor", "flatfish", "maple_tree", "camel", "crab", "sea", "cattle",
)  # fmt: skip
_CIFAR_FS_TEST = (
    "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain",
    "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe",
    "whale", "woman", "worm",
)  # fmt: skip
_ALL_CIFAR100 = sorted(name for names in CIFAR100_SUPERCLASSES.values() for name in names)

#: CIFAR-FS (Bertinetto et al., 2019): 64/16/20 CIFAR-100 fine classes. All three lists
#: checked against torchmeta's datasets/assets/cifar100/cifar-fs/{train,val,test}.json.
CIFAR_FS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": tuple(n for n in _ALL_CIFAR100 if n not in _CIFAR_FS_VAL + _CIFAR_FS_TEST),
    "val": _CIFAR_FS_VAL,
    "test": _CIFAR_FS_TEST,
}


def _load_cifar100_classes(source: Path, class_names: Sequence[str]) -> RawSplit:
    """The images of ``class_names`` (CIFAR-100 fine classes), train and test halves pooled
    (600 per class), relabelled ``0..len(class_names)-1`` in that order."""
    parts = [read_cifar_split(source, "cifar100", part, strict=False) for part in ("train", "test")]
    fine_names = parts[0][2]
    missing = [n for n in class_names if n not in fine_names]
    if missing:
        meta = source / "cifar-100-python" / "meta"
        meta = meta if meta.is_file() else source / "meta"
        raise ValueError(
            f"{meta}: fine_label_names lacks {missing[:5]}: not CIFAR-100's class names"
        )
    all_images = np.concatenate([images for images, _, _ in parts])
    all_labels = np.concatenate([labels for _, labels, _ in parts])
    new_label = np.full(len(fine_names), -1, dtype=np.int64)
    new_label[[fine_names.index(n) for n in class_names]] = np.arange(len(class_names))
    mapped = new_label[all_labels]
    keep = mapped >= 0
    return RawSplit(np.ascontiguousarray(all_images[keep]), mapped[keep], list(class_names))


def _load_cifar_fs(source: Path, split: str, options: dict) -> RawSplit:
    return _load_cifar100_classes(source, CIFAR_FS_SPLITS[split])


def _load_fc100(source: Path, split: str, options: dict) -> RawSplit:
    names = [n for sc in FC100_SUPERCLASS_SPLITS[split] for n in CIFAR100_SUPERCLASSES[sc]]
    return _load_cifar100_classes(source, names)


def _check_cifar(splits: dict[str, RawSplit]) -> list[str]:
    problems = []
    for split, raw in splits.items():
        counts = np.bincount(raw.labels, minlength=len(raw.class_names))
        wrong = np.flatnonzero(counts != 600)
        if len(wrong):
            problems.append(
                f"split {split!r}: {len(wrong)} class(es) do not have 600 images "
                f"(e.g. {raw.class_names[wrong[0]]}: {counts[wrong[0]]})"
            )
    return problems


# --------------------------------------------------------------------------- ImageFolder


def _load_imagefolder(source: Path, split: str, options: dict) -> RawSplit:
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
    key = next((k for k in (split, *[a for a, v in _SPLIT_ALIASES.items() if v == split])
                if k in class_splits), None)  # fmt: skip
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
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"class folder {folder} holds no images ({_IMAGE_EXTENSIONS})")
        paths += files
        labels += [label] * len(files)
    size = options.get("image_size")
    size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
    mode = {1: "L", 3: "RGB"}.get(int(options.get("channels", 3)))
    if mode is None:
        raise ValueError(f"ImageFolder: channels must be 1 or 3, got {options.get('channels')}")
    images = decode_images(paths, size, mode)
    return RawSplit(images, np.asarray(labels, dtype=np.int64), names)


# --------------------------------------------------------------------------- registry

Loader = Callable[[Path, str, dict], RawSplit]
Checker = Callable[[dict[str, RawSplit]], list[str]]


@dataclass(frozen=True)
class _DatasetEntry:
    loader: Loader | None  # None: generated, no files (synthetic)
    checker: Checker | None  # the published sizes, enforced when strict
    description: str
    options: frozenset[str] = frozenset({"strict"})  # what the loader reads

    def check_options(self, name: str, options: dict) -> None:
        unknown = sorted(set(options) - self.options)
        if unknown:
            raise ValueError(
                f"dataset {name!r} does not take option(s) {unknown}; it takes "
                f"{sorted(self.options)}"
            )


def _synthetic_split(split: str, options: dict) -> ImageSplit:
    from episodes.synthetic import SyntheticGlyphs

    return SyntheticGlyphs(**options).split(split)


_REGISTRY: dict[str, _DatasetEntry] = {
    "synthetic": _DatasetEntry(None, None, "procedural Omniglot-like glyphs, no files"),
    "mini-imagenet": _DatasetEntry(
        _load_mini_imagenet, _check_mini_imagenet, "Ravi & Larochelle split, 64/16/20 × 600, 84×84"
    ),
    "omniglot": _DatasetEntry(
        _load_omniglot,
        _check_omniglot,
        "1028/172/423 characters ×4 rotations, 28×28",
        frozenset({"strict", "image_size", "rotations"}),
    ),
    "cifar-fs": _DatasetEntry(_load_cifar_fs, _check_cifar, "CIFAR-100, 64/16/20 classes, 32×32"),
    "fc100": _DatasetEntry(_load_fc100, _check_cifar, "CIFAR-100 by superclass, 60/20/20, 32×32"),
    "imagefolder": _DatasetEntry(
        _load_imagefolder,
        None,
        "one folder per class + splits.json",
        frozenset({"strict", "split_file", "image_size", "channels"}),
    ),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_split` and :func:`prepare_dataset`."""
    return list(_REGISTRY)


def _entry(name: str) -> _DatasetEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}: known datasets are {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_split(
    name: str, split: str, root: str | os.PathLike | None = None, **options
) -> ImageSplit:
    """One split of dataset ``name`` (see :func:`list_datasets`).

    * ``"synthetic"``: no ``root``; options are :class:`~episodes.synthetic.SyntheticGlyphs`'s
      (``num_classes``, ``images_per_class``, ``image_size``, ``channels``, ``seed``, ...).
    * any other: ``root`` is either a canonical cache folder (has ``index.json``; option
      ``mmap=True`` memory-maps, ``False`` loads into memory) or the dataset's source files,
      decoded on the fly (options as for :func:`prepare_dataset`; ``strict`` defaults to False
      here). The split's ``mean``/``std`` are always the train split's.
    """
    entry = _entry(name)
    split = _canonical_split_name(split)
    if entry.loader is None:
        if root is not None:
            raise ValueError(f"dataset {name!r} is generated and takes no root (got {root})")
        return _synthetic_split(split, options)
    if root is None:
        raise ValueError(
            f"dataset {name!r} needs root= (a cache from prepare_dataset, or the source files)"
        )
    root = Path(root)
    if (root / "index.json").is_file():
        mmap = options.pop("mmap", True)
        if options:
            raise ValueError(
                f"{root} is a prepared cache: options {sorted(options)} apply when preparing "
                "it (prepare_dataset), only mmap= applies when reading it"
            )
        return load_cache(root, split, mmap=mmap, expect_dataset=name)
    if not root.exists():
        raise FileNotFoundError(f"dataset root not found: {root}")
    options = {"strict": False, **options}
    entry.check_options(name, options)
    raw = entry.loader(root, split, options).canonical()
    train = raw if split == "train" else entry.loader(root, "train", options)
    mean, std = channel_mean_std(train.images)
    return ImageSplit(
        images=raw.images,
        labels=raw.labels,
        class_names=raw.class_names,
        name=name,
        split=split,
        mean=mean,
        std=std,
        fingerprint=content_fingerprint(raw.images, raw.labels, raw.class_names),
    )


# --------------------------------------------------------------------------- canonical cache


def _read_index(root: Path) -> dict:
    path = root / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"cache index not found: {path} (write it with prepare_dataset)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: format is {index.get('format')!r}, expected {CACHE_FORMAT!r}")
    return index


def load_cache(
    root: str | os.PathLike, split: str, mmap: bool = True, expect_dataset: str | None = None
) -> ImageSplit:
    """One split of a canonical cache folder; memory-mapped unless ``mmap=False``."""
    root = Path(root)
    split = _canonical_split_name(split)
    index = _read_index(root)
    if expect_dataset is not None and index["dataset"] != expect_dataset:
        raise ValueError(
            f"{root}: the cache holds dataset {index['dataset']!r}, not {expect_dataset!r}"
        )
    if split not in index["splits"]:
        raise ValueError(
            f"{root}: the cache has no split {split!r} (has {sorted(index['splits'])})"
        )
    meta = index["splits"][split]
    path = root / meta["file"]
    if not path.is_file():
        raise FileNotFoundError(f"cache file missing: {path} (listed in {root / 'index.json'})")
    try:
        images = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"cache file {path} is unreadable (truncated?): {error}") from error
    counts = np.asarray(meta["counts"], dtype=np.int64)
    expected = (int(counts.sum()), *index["image_shape"])
    if images.dtype != np.uint8 or tuple(images.shape) != expected:
        raise ValueError(
            f"cache file {path} holds {images.dtype} {images.shape}, but index.json says uint8 "
            f"{expected}"
        )
    return ImageSplit(
        images=images,
        labels=np.repeat(np.arange(len(counts), dtype=np.int64), counts),
        class_names=list(meta["class_names"]),
        name=index["dataset"],
        split=split,
        mean=tuple(index["mean"]),
        std=tuple(index["std"]),
        fingerprint=meta["fingerprint"],
    )


def prepare_dataset(
    name: str, source: str | os.PathLike, out: str | os.PathLike, strict: bool = True,
    overwrite: bool = False, **options,
) -> Path:  # fmt: skip
    """Convert dataset ``name`` from ``source`` into a canonical cache at ``out``; return ``out``.

    ``strict`` checks the published split sizes and image shapes (Mini-ImageNet 64/16/20 ×
    600 × 84×84×3, Omniglot 1623 characters × 20, CIFAR 600 per class) and raises one
    ``ValueError`` listing every difference. The cache is written to a temp folder next to
    ``out`` and renamed into place, so ``out`` is either complete or absent. An existing
    ``out`` is replaced only with ``overwrite=True``.
    """
    entry = _entry(name)
    if entry.loader is None:
        raise ValueError(f"dataset {name!r} is generated on the fly; there is nothing to prepare")
    options = {"strict": strict, **options}
    entry.check_options(name, options)
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{name} source not found: {source}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        splits = {split: entry.loader(source, split, options).canonical() for split in SPLITS}
        problems = entry.checker(splits) if (strict and entry.checker) else []
        shapes = {split: raw.images.shape[1:] for split, raw in splits.items()}
        if len(set(shapes.values())) != 1:
            problems.append(f"image shapes differ between splits: {shapes}")
        if problems:
            raise ValueError(
                f"{name} at {source} does not match the published dataset "
                f"(use strict=False / --no-strict for a subset):\n  - " + "\n  - ".join(problems)
            )
        mean, std = channel_mean_std(splits["train"].images)
        index = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "dataset": name,
            "source": str(source),
            "image_shape": list(splits["train"].images.shape[1:]),
            "mean": list(mean),
            "std": list(std),
            "splits": {},
        }
        for split, raw in splits.items():
            np.save(tmp / f"{split}.npy", raw.images, allow_pickle=False)
            index["splits"][split] = {
                "file": f"{split}.npy",
                "class_names": raw.class_names,
                "counts": np.bincount(raw.labels, minlength=len(raw.class_names)).tolist(),
                "fingerprint": content_fingerprint(raw.images, raw.labels, raw.class_names),
            }
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        if out.exists():  # overwrite: move the old cache aside first, drop it after the rename
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "cache")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prepare_mini_imagenet(
    source: str | os.PathLike, out: str | os.PathLike, strict: bool = True, overwrite: bool = False
) -> Path:
    """Convert Mini-ImageNet from any of its three layouts (see
    :func:`detect_mini_imagenet_layout`) into the canonical cache at ``out``."""
    return prepare_dataset("mini-imagenet", source, out, strict=strict, overwrite=overwrite)

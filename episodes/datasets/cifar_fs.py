"""CIFAR-FS (Bertinetto et al., 2019) and FC100 (Oreshkin et al., 2018): few-shot class
splits of CIFAR-100, read from the CIFAR-100 python pickles (``episodes.cifar``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from episodes.cifar import read_cifar_split
from episodes.datasets.registry import RawSplit, register_dataset

__all__ = ["CIFAR100_SUPERCLASSES", "CIFAR_FS_SPLITS", "FC100_SUPERCLASS_SPLITS"]

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


@register_dataset("cifar-fs", "CIFAR-100, 64/16/20 classes, 32×32", checker=_check_cifar)
def load_cifar_fs(source: Path, split: str, options: dict) -> RawSplit:
    return _load_cifar100_classes(source, CIFAR_FS_SPLITS[split])


@register_dataset("fc100", "CIFAR-100 by superclass, 60/20/20, 32×32", checker=_check_cifar)
def load_fc100(source: Path, split: str, options: dict) -> RawSplit:
    names = [n for sc in FC100_SUPERCLASS_SPLITS[split] for n in CIFAR100_SUPERCLASSES[sc]]
    return _load_cifar100_classes(source, names)

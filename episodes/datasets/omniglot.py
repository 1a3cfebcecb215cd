"""Omniglot (Lake et al., 2015): 1623 handwritten characters of 50 alphabets, 20 drawers
each; the Vinyals et al. (2016) character split, each quarter-turn rotation a class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from episodes.datasets.images import decode_images
from episodes.datasets.registry import RawSplit, register_dataset

__all__ = ["OMNIGLOT_SPLIT_SIZES", "OMNIGLOT_VAL_ALPHABETS", "load_omniglot"]

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


@register_dataset(
    "omniglot",
    "1028/172/423 characters ×4 rotations, 28×28",
    checker=_check_omniglot,
    options=("image_size", "rotations"),
)
def load_omniglot(source: Path, split: str, options: dict) -> RawSplit:
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

"""Omniglot (Lake et al., 2015): 1623 handwritten characters of 50 alphabets, 20 drawers
each. Two protocols: the Vinyals et al. (2016) character split of the full data, and Lake et
al.'s reduced-experience one (small background sets, the 20 one-shot runs as the test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from episodes.datasets.images import ImageRef, decode_images
from episodes.datasets.omniglot_files import Character, find_part
from episodes.datasets.omniglot_runs import (
    LAKE_RUNS,
    LAKE_WAY,
    LakeRunsEpisodes,
    find_runs,
    read_runs,
)
from episodes.datasets.registry import RawSplit, register_dataset

__all__ = [
    "OMNIGLOT_SPLIT_SIZES",
    "OMNIGLOT_VAL_ALPHABETS",
    "LAKE_CHARACTERS",
    "LAKE_RUNS_MANIFEST",
    "load_omniglot",
]

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
#: Distinct characters of the official small background sets (Lake et al., 2015): small1
#: 136, small2 156, both 242 (Greek and Latin are in both).
LAKE_CHARACTERS = {"small1": 136, "small2": 156, "both": 242}
LAKE_PROTOCOLS = ("lake", "minimal")
#: The frozen 20 runs in a lake-protocol cache folder (an episodes.manifest file).
LAKE_RUNS_MANIFEST = "lake_runs.json"


def _omniglot_characters(source: Path) -> list[Character]:
    """(name, image files) of every character: images_background first, then
    images_evaluation (folders or the official zips)."""
    parts = [find_part(source, name) for name in ("images_background", "images_evaluation")]
    parts = [part for part in parts if part is not None]
    if not parts:
        small = any(find_part(source, f"images_background_small{i}") for i in (1, 2))
        hint = "; it holds the small background sets: pass protocol='lake'" if small else ""
        raise FileNotFoundError(
            f"{source}: no images_background or images_evaluation (folder or .zip; the "
            "standard Omniglot layout: images_background/<alphabet>/<character>/*.png)" + hint
        )
    return [character for part in parts for character in part.characters()]


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


def _vinyals_order(characters: list[Character]) -> list[Character]:
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


def _lake_characters(source: Path, background: str) -> list[Character]:
    """The characters of the chosen small background sets, each counted once (Greek and Latin
    are in both small sets with the same files)."""
    names = {"small1": ("small1",), "small2": ("small2",), "both": ("small1", "small2")}
    if background not in names:
        raise ValueError(f"omniglot: background must be one of {sorted(names)}, got {background!r}")
    characters: dict[str, list[ImageRef]] = {}
    for which in names[background]:
        part = find_part(source, f"images_background_{which}")
        if part is None:
            raise FileNotFoundError(
                f"{source}: no images_background_{which} (folder or .zip), needed by the lake "
                f"protocol with background={background!r}"
            )
        for name, files in part.characters():
            if name in characters:
                seen = [_file_name(f) for f in characters[name]]
                if seen != [_file_name(f) for f in files]:
                    raise ValueError(
                        f"{part}: character {name} is also in another small set, with other "
                        "files; cannot count it once"
                    )
                continue
            characters[name] = files
    return sorted(characters.items())


def _file_name(ref: ImageRef) -> str:
    return ref.name


def _lake_split(characters: list[Character], val_fraction: float) -> dict[str, list[Character]]:
    """Train/val characters: in each alphabet the last ``round(n * val_fraction)`` characters
    (at least one, when the alphabet has two or more) are held out for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"omniglot: val_fraction must lie in (0, 1), got {val_fraction}")
    by_alphabet: dict[str, list[Character]] = {}
    for character in characters:
        by_alphabet.setdefault(character[0].split("/", 1)[0], []).append(character)
    out: dict[str, list[Character]] = {"train": [], "val": []}
    for members in by_alphabet.values():
        held = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        out["train"] += members[: len(members) - held]
        out["val"] += members[len(members) - held :]
    return out


def _as_raw_split(chosen: list[Character], size: int, rotations: bool) -> RawSplit:
    """Decode (grayscale, resized to ``size``), each character a class; with ``rotations``
    each quarter turn of a character is a class of its own."""
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
        is_runs = bool(raw.class_names) and raw.class_names[0].startswith("run")
        want = 2 if is_runs else OMNIGLOT_IMAGES_PER_CHARACTER
        wrong = np.flatnonzero(counts != want)
        if len(wrong):
            problems.append(
                f"split {split!r}: {len(wrong)} class(es) do not have {want} images (e.g. "
                f"{raw.class_names[wrong[0]]}: {counts[wrong[0]]})"
            )
        if is_runs and len(raw.class_names) != LAKE_RUNS * LAKE_WAY:
            problems.append(
                f"split {split!r}: {len(raw.class_names)} run classes, expected "
                f"{LAKE_RUNS} runs × {LAKE_WAY}"
            )
    return problems


def _write_runs_manifest(folder: Path, options: dict) -> None:
    """In a lake-protocol cache, ``lake_runs.json``: the 20 runs as a frozen test manifest."""
    if options.get("protocol", "vinyals") not in LAKE_PROTOCOLS:
        return
    from episodes.datasets.cache import load_cache  # the cache is complete in ``folder`` now
    from episodes.manifest import save_manifest

    test = load_cache(folder, "test")
    runs = LakeRunsEpisodes(test)
    save_manifest(folder / LAKE_RUNS_MANIFEST, list(runs), LAKE_RUNS, split=test, seed=0)


@register_dataset(
    "omniglot",
    "1028/172/423 characters ×4 rotations, 28×28 (protocol='lake': small sets + the 20 runs)",
    checker=_check_omniglot,
    options=("image_size", "rotations", "protocol", "background", "val_fraction"),
    extras=_write_runs_manifest,
)
def load_omniglot(source: Path, split: str, options: dict) -> RawSplit:
    """Split ``split`` of Omniglot under ``options["protocol"]``:

    * ``"vinyals"`` (default): the full data (images_background + images_evaluation), the
      Vinyals et al. (2016) character split; a subset (``strict=False``) is split in the
      same proportions.
    * ``"lake"`` (alias ``"minimal"``): the reduced-experience protocol of Lake et al.
      (2015): train and val from the small background sets (``background``: ``"small1"``,
      ``"small2"`` or ``"both"``, each character once), val = the last ``val_fraction``
      (default 0.2) of each alphabet's characters; test = the 20 one-shot runs
      (:mod:`episodes.datasets.omniglot_runs`), never rotated.

    ``image_size`` (default 28, as MAML and ProtoNets; Lake et al. used 105) resizes
    (bilinear); ``rotations`` (default True) makes each quarter turn a class (train/val).
    """
    strict = options.get("strict", True)
    size = int(options.get("image_size", 28))
    rotations = bool(options.get("rotations", True))
    protocol = options.get("protocol", "vinyals")
    if protocol in LAKE_PROTOCOLS:
        if split == "test":
            runs = find_runs(source)
            if runs is None:
                raise FileNotFoundError(
                    f"{source}: no all_runs.zip (or unpacked runNN/ folders): the lake "
                    "protocol's test split is the 20 one-shot runs"
                )
            return _as_raw_split(read_runs(runs), size, rotations=False)
        characters = _lake_characters(source, options.get("background", "both"))
        expected = LAKE_CHARACTERS[options.get("background", "both")]
        if strict and len(characters) != expected:
            raise ValueError(
                f"Omniglot small sets at {source}: {len(characters)} distinct characters, "
                f"expected {expected} (use strict=False for a subset)"
            )
        chosen = _lake_split(characters, float(options.get("val_fraction", 0.2)))[split]
        return _as_raw_split(chosen, size, rotations)
    if protocol != "vinyals":
        raise ValueError(
            f"omniglot: protocol must be 'vinyals' or 'lake' (alias 'minimal'), got {protocol!r}"
        )
    characters = _omniglot_characters(source)
    if len(characters) == sum(OMNIGLOT_SPLIT_SIZES.values()):
        characters = _vinyals_order(characters)
    chosen = [characters[i] for i in _omniglot_split_ranges(len(characters), strict)[split]]
    return _as_raw_split(chosen, size, rotations)

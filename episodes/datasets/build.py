"""`build_split` and `prepare_dataset`: a dataset's split from the cache, from its source
files, or generated; and the one-time conversion of source files into the cache."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from episodes.datasets.cache import is_cache, load_cache, write_cache
from episodes.datasets.registry import SPLITS, canonical_split_name, dataset_entry
from episodes.fileio import check_writable
from episodes.split import ImageSplit, channel_mean_std, content_fingerprint

__all__ = ["build_split", "prepare_dataset", "prepare_mini_imagenet"]


def build_split(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    *,
    verify: str = "sampled",
    **options,
) -> ImageSplit:
    """One split of dataset ``name`` (see :func:`~episodes.list_datasets`).

    * ``"synthetic"``: no ``root``; options are :class:`~episodes.synthetic.SyntheticGlyphs`'s
      (``num_classes``, ``images_per_class``, ``image_size``, ``channels``, ``seed``, ...).
    * any other: ``root`` is either a canonical cache folder (has ``index.json``; option
      ``mmap=True`` memory-maps, ``False`` loads into memory) or the dataset's source files,
      decoded on the fly (options as for :func:`prepare_dataset`; ``strict`` defaults to False
      here). The split's ``mean``/``std`` are always the train split's.

    ``normalize="mean_std" | "unit" | "unit_inverted"`` (any dataset, also a cache) sets how
    the default transform scales pixels (:attr:`~episodes.ImageSplit.normalization`); the
    data and its fingerprint do not change.

    ``verify="sampled" | "full"``: how much of a cache's images is checked against the content
    hashes stored in its ``index.json`` (:func:`~episodes.datasets.cache.load_cache`; a
    difference raises :class:`~episodes.fileio.ContentMismatch`). Source files and generated
    data have no stored hashes: nothing to check.
    """
    normalize = options.pop("normalize", "mean_std")
    split_data = _build_split(name, split, root, options, verify)
    if normalize != "mean_std":
        split_data = dataclasses.replace(split_data, normalize=normalize)
    return split_data


def _build_split(
    name: str, split: str, root: str | os.PathLike | None, options: dict, verify: str
) -> ImageSplit:
    entry = dataset_entry(name)
    split = canonical_split_name(split)
    if entry.generate is not None:
        if root is not None:
            raise ValueError(f"dataset {name!r} is generated and takes no root (got {root})")
        return entry.generate(split, options)
    if root is None:
        raise ValueError(
            f"dataset {name!r} needs root= (a cache from prepare_dataset, or the source files)"
        )
    root = Path(root)
    if is_cache(root):
        mmap = options.pop("mmap", True)
        if options:
            raise ValueError(
                f"{root} is a prepared cache: options {sorted(options)} apply when preparing "
                "it (prepare_dataset), only mmap= applies when reading it"
            )
        return load_cache(root, split, mmap=mmap, expect_dataset=name, verify=verify)
    if not root.exists():
        raise FileNotFoundError(f"dataset root not found: {root}")
    options = {"strict": False, **options}
    entry.check_options(options)
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


def prepare_dataset(
    name: str,
    source: str | os.PathLike,
    out: str | os.PathLike,
    strict: bool = True,
    overwrite: bool = False,
    **options,
) -> Path:
    """Convert dataset ``name`` from ``source`` into a canonical cache at ``out``; return ``out``.

    ``strict`` checks the published split sizes and image shapes (Mini-ImageNet 64/16/20 ×
    600 × 84×84×3, Omniglot 1623 characters × 20, CIFAR 600 per class) and raises one
    ``ValueError`` listing every difference. The cache is written to a temp folder next to
    ``out`` and renamed into place, so ``out`` is either complete or absent. An existing
    ``out`` is replaced only with ``overwrite=True``.
    """
    entry = dataset_entry(name)
    if entry.loader is None:
        raise ValueError(f"dataset {name!r} is generated on the fly; there is nothing to prepare")
    options = {"strict": strict, **options}
    entry.check_options(options)
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{name} source not found: {source}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    check_writable(out.parent)  # before decoding every image, not after
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
    extras = None
    if entry.extras is not None:

        def extras(folder: Path) -> None:
            entry.extras(folder, options)

    return write_cache(out, name, source, splits, overwrite, extras)


def prepare_mini_imagenet(
    source: str | os.PathLike, out: str | os.PathLike, strict: bool = True, overwrite: bool = False
) -> Path:
    """Convert Mini-ImageNet from any of its three layouts (see
    :func:`~episodes.datasets.mini_imagenet.detect_mini_imagenet_layout`) into the canonical
    cache at ``out``."""
    return prepare_dataset("mini-imagenet", source, out, strict=strict, overwrite=overwrite)

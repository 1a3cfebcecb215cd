"""The canonical cache: ``{split}.npy`` (uint8 ``(N, H, W, C)``, class by class, memory-mappable)
plus ``index.json`` (class names, counts, image shape, train mean/std, per-split content
fingerprints and content hashes), written to a temp folder and renamed
(:func:`episodes.fileio.atomic_folder`), so a cache is complete or absent.

Reading a split checks its images against the hashes stored when it was written
(:func:`episodes.fileio.verify_content`): ``verify="sampled"`` (64 evenly spaced rows, cheap
enough for every load) or ``"full"`` (every byte). The fingerprint alone is read from
``index.json`` and would not notice a modified ``.npy``. Version-1 caches (written before
the hashes) load with a warning and cannot be verified.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from episodes.datasets.registry import RawSplit, canonical_split_name
from episodes.fileio import (
    ContentMismatch,
    atomic_folder,
    atomic_write,
    content_hashes,
    verify_content,
)
from episodes.split import ImageSplit, channel_mean_std, content_fingerprint

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "VERIFY_LEVELS",
    "load_cache",
    "write_cache",
    "is_cache",
]

CACHE_FORMAT = "fewshot-nsl-cache"
#: 2: each split's ``content`` hashes (1: none, still read, unverified).
CACHE_VERSION = 2
#: How much of a split's images a load checks against the stored hashes.
VERIFY_LEVELS = ("sampled", "full")

log = logging.getLogger("episodes.datasets")
_warned_unverified: set[Path] = set()  # one warning per cache and process, not per split


def is_cache(root: Path) -> bool:
    """True when ``root`` is a cache folder (holds ``index.json``)."""
    return (root / "index.json").is_file()


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
    root: str | os.PathLike,
    split: str,
    mmap: bool = True,
    expect_dataset: str | None = None,
    verify: str = "sampled",
) -> ImageSplit:
    """One split of a canonical cache folder; memory-mapped unless ``mmap=False``.

    ``verify`` (:data:`VERIFY_LEVELS`): check the images against the hashes in ``index.json``,
    ``"sampled"`` rows or the ``"full"`` array; a difference raises
    :class:`~episodes.fileio.ContentMismatch` (a ``ValueError``, one line naming the file).
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {list(VERIFY_LEVELS)}, got {verify!r}")
    root = Path(root)
    split = canonical_split_name(split)
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
    _verify_images(images, meta.get("content"), path, root / "index.json", verify)
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


def _verify_images(
    images: np.ndarray, stored: dict | None, path: Path, index_path: Path, verify: str
) -> None:
    """Check a split's images against its stored hashes (see :func:`load_cache`)."""
    how = "prepare it again with `fewshot-nsl prepare-data ... --overwrite` to store them"
    if stored is None:
        if verify == "full":
            raise ContentMismatch(
                f"{path}: cannot verify, the cache was written without content hashes; {how}"
            )
        if index_path not in _warned_unverified:
            _warned_unverified.add(index_path)
            log.warning(
                "%s: cache written without content hashes, its images cannot be verified; %s",
                index_path,
                how,
            )
        return
    verify_content(images, stored, path, full=verify == "full")


def write_cache(
    out: Path,
    name: str,
    source: Path,
    splits: dict[str, RawSplit],
    overwrite: bool,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write canonical ``splits`` of dataset ``name`` as a cache at ``out``, atomically.

    ``extras(folder)`` may add files (e.g. a frozen test manifest) to the finished cache
    folder before it is renamed into place. An existing ``out`` is replaced only with
    ``overwrite``; on any error nothing is left behind.
    """
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
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
    with atomic_folder(out, overwrite=overwrite) as folder:
        for split, raw in splits.items():
            images = raw.images
            atomic_write(
                folder / f"{split}.npy",
                lambda handle, images=images: np.save(handle, images, allow_pickle=False),
            )
            index["splits"][split] = {
                "file": f"{split}.npy",
                "class_names": raw.class_names,
                "counts": np.bincount(raw.labels, minlength=len(raw.class_names)).tolist(),
                "fingerprint": content_fingerprint(raw.images, raw.labels, raw.class_names),
                "content": content_hashes(raw.images),
            }
        text = json.dumps(index, indent=1).encode()
        atomic_write(folder / "index.json", lambda handle: handle.write(text))
        if extras is not None:
            extras(folder)
    return out

"""The canonical cache: ``{split}.npy`` (uint8 ``(N, H, W, C)``, class by class, memory-mappable)
plus ``index.json`` (class names, counts, image shape, train mean/std, per-split content
fingerprints), written to a temp folder and renamed, so a cache is complete or absent."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from episodes.datasets.registry import RawSplit, canonical_split_name
from episodes.split import ImageSplit, channel_mean_std, content_fingerprint

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "load_cache", "write_cache", "is_cache"]

CACHE_FORMAT = "fewshot-nsl-cache"
CACHE_VERSION = 1


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
    root: str | os.PathLike, split: str, mmap: bool = True, expect_dataset: str | None = None
) -> ImageSplit:
    """One split of a canonical cache folder; memory-mapped unless ``mmap=False``."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
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
        if extras is not None:
            extras(tmp)
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

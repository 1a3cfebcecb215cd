"""`ImageSplit`: one split of a few-shot dataset (classes × images), and its content hash."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Pixel scalings of the default transform (``ImageSplit.normalize``).
NORMALIZE_MODES = ("mean_std", "unit", "unit_inverted")

# Images are hashed in chunks so a memory-mapped split is never read into memory at once.
_HASH_CHUNK_ROWS = 4096


def content_fingerprint(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> str:
    """A hex content hash of a split: image bytes, labels and class names (order matters).

    Two splits with the same fingerprint hold the same images under the same labels, so a
    fingerprint stamped into a run or a manifest identifies the data exactly.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype)}).encode())
    digest.update(json.dumps(list(class_names)).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    for start in range(0, len(images), _HASH_CHUNK_ROWS):
        digest.update(np.ascontiguousarray(images[start : start + _HASH_CHUNK_ROWS]).tobytes())
    return digest.hexdigest()


def channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``(N, H, W, C)`` images scaled to [0, 1].

    Accumulated in float64 over chunks, so it works on a memory-mapped split of any size.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected non-empty (N, H, W, C) images, got shape {images.shape}")
    channels = images.shape[-1]
    total = np.zeros(channels, dtype=np.float64)
    total_sq = np.zeros(channels, dtype=np.float64)
    for start in range(0, len(images), _HASH_CHUNK_ROWS):
        chunk = np.asarray(images[start : start + _HASH_CHUNK_ROWS], dtype=np.float64) / 255.0
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std = np.where(std > 1e-8, std, 1.0)  # a constant channel is left unscaled, not divided by 0
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def stable_hash(*parts: str) -> int:
    """A 32-bit hash of strings that is the same in every process (unlike ``hash()``)."""
    return zlib.crc32("\x1f".join(parts).encode("utf-8")) & 0xFFFFFFFF


@dataclass
class ImageSplit:
    """One split of a few-shot dataset: ``N`` images of ``num_classes`` classes.

    * ``images``: uint8 ``(N, H, W, C)``, in memory or memory-mapped (``np.memmap``)
    * ``labels``: int64 ``(N,)`` in ``0..num_classes-1``
    * ``class_names``: ``num_classes`` names (wnids, ``alphabet/character/rot090``, ...)
    * ``name`` / ``split``: dataset name (``"mini-imagenet"``) and split (``"train"``, ...)
    * ``mean`` / ``std``: per-channel statistics of the dataset's *train* split in [0, 1]
      units, used by the default normalisation
    * ``fingerprint``: content hash (:func:`content_fingerprint`), stamped into runs/manifests
    * ``normalize``: how the default transform scales pixels: ``"mean_std"`` (``(x/255 -
      mean) / std``, the default), ``"unit"`` (``x/255`` in [0, 1], as the MAML reference
      code does for Mini-ImageNet) or ``"unit_inverted"`` (``1 - x/255``: cbfinn/maml's
      Omniglot, strokes 1 on a 0 background); see :attr:`normalization`
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    name: str
    split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    normalize: str = "mean_std"
    _class_rows: list[np.ndarray] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"{self.name}/{self.split}: images must be uint8 (N, H, W, C), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"{self.name}/{self.split}: labels have shape {self.labels.shape}, "
                f"expected ({len(self.images)},) to match the images"
            )
        num_classes = len(self.class_names)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise ValueError(
                f"{self.name}/{self.split}: labels must lie in 0..{num_classes - 1} "
                f"({num_classes} class names), got {self.labels.min()}..{self.labels.max()}"
            )
        channels = self.images.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}/{self.split}: mean/std need {channels} values (one per channel), "
                f"got {len(self.mean)}/{len(self.std)}"
            )
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(
                f"{self.name}/{self.split}: normalize must be one of {NORMALIZE_MODES}, got "
                f"{self.normalize!r}"
            )
        # Rows of each class, in dataset order; a stable sort keeps that order within a class.
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=num_classes)
        self._class_rows = np.split(order, np.cumsum(counts)[:-1])

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` the default transform uses: the train statistics for
        ``normalize="mean_std"``, zeros and ones (plain ``x/255``) for ``"unit"``, ones and
        minus ones (``(x/255 - 1) / -1 = 1 - x/255``) for ``"unit_inverted"``."""
        channels = self.images.shape[-1]
        if self.normalize == "unit":
            return (0.0,) * channels, (1.0,) * channels
        if self.normalize == "unit_inverted":
            return (1.0,) * channels, (-1.0,) * channels
        return tuple(self.mean), tuple(self.std)

    @property
    def num_classes(self) -> int:
        """Number of classes in this split."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image as the sampler returns it."""
        _, height, width, channels = self.images.shape
        return (channels, height, width)

    @property
    def class_counts(self) -> np.ndarray:
        """Images per class, int64 ``(num_classes,)``."""
        return np.array([len(rows) for rows in self._class_rows], dtype=np.int64)

    def indices_of(self, class_id: int) -> np.ndarray:
        """Row indices (int64, dataset order) of the images of class ``class_id``."""
        if not 0 <= class_id < self.num_classes:
            raise IndexError(
                f"{self.name}/{self.split}: class id {class_id} out of range "
                f"0..{self.num_classes - 1}"
            )
        return self._class_rows[class_id]

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (
            f"ImageSplit(name={self.name!r}, split={self.split!r}, classes={self.num_classes}, "
            f"images={len(self.images)}, image_shape={self.image_shape}, "
            f"fingerprint={self.fingerprint[:12]}...)"
        )

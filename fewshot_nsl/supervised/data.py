"""Data for supervised image classification: CIFAR-10/100 python pickles and synthetic glyphs.

Every dataset is returned as a :class:`ClassificationData`: uint8 images ``(N, H, W, C)`` and
int64 labels for a train and a test split over the *same* classes (unlike the few-shot splits,
whose classes are disjoint), the per-channel mean/std of the train images, and a content
fingerprint that is stamped into the run directory.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from episodes.cifar import CIFAR_DATASETS, read_cifar_split
from episodes.split import channel_mean_std, content_fingerprint
from episodes.transforms import RandomCrop, RandomHorizontalFlip, Transform

DATASETS = ("synthetic", "cifar10", "cifar100")
#: How the crop augmentation pads: with zeros, or TensorFlow's "SYMMETRIC" mirror (the edge
#: pixel included), as the NSL authors' CIFAR input pipeline does.
CROP_PADDINGS = ("zeros", "symmetric")
#: What the network sees: images standardised by the train set's per-channel mean/std, or raw
#: pixel values 0..255 as the NSL authors feed them (``tf.cast(uint8, float32)``).
INPUT_SCALES = ("standardized", "raw_pixels")


@dataclass(frozen=True)
class ClassificationData:
    """A train and a test split of one image-classification dataset.

    * ``train_images`` / ``test_images``: uint8 ``(N, H, W, C)``
    * ``train_labels`` / ``test_labels``: int64 ``(N,)`` in ``0..num_classes-1``
    * ``mean`` / ``std``: per-channel statistics of the train images scaled to [0, 1]
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image as the model sees it."""
        _, height, width, channels = self.train_images.shape
        return (channels, height, width)


def load_cifar(root: str | Path | None, dataset: str, *, strict: bool = True) -> ClassificationData:
    """CIFAR-10 or CIFAR-100 (train 50k, test 10k) from the python pickles under ``root``
    (see :func:`read_cifar_split` for ``strict``)."""
    if root is None:
        raise ValueError(
            f"data.root must name the folder with the {dataset} python pickles "
            "(e.g. data.root=/data/cifar-100-python)"
        )
    train_images, train_labels, class_names = read_cifar_split(
        root, dataset, "train", strict=strict
    )
    test_images, test_labels, _ = read_cifar_split(root, dataset, "test", strict=strict)
    mean, std = channel_mean_std(train_images)
    return ClassificationData(
        name=dataset,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
        mean=mean,
        std=std,
        # One hash per split, joined: no 180 MB concatenated copy just to hash it.
        fingerprint="+".join(
            content_fingerprint(images, labels, class_names)[:16]
            for images, labels in ((train_images, train_labels), (test_images, test_labels))
        ),
    )


# --------------------------------------------------------------------------- synthetic
def load_synthetic(
    num_classes: int = 10,
    train_per_class: int = 200,
    test_per_class: int = 50,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> ClassificationData:
    """Synthetic glyph classification: the same classes in train and test.

    One split of :mod:`episodes`' synthetic glyphs with ``train_per_class + test_per_class``
    independently jittered samples per class; the first ``train_per_class`` samples of each
    class train, the rest test.
    """
    from episodes import build_split

    for field, value in (
        ("num_classes", num_classes),
        ("train_per_class", train_per_class),
        ("test_per_class", test_per_class),
        ("image_size", image_size),
    ):
        if int(value) < 1:
            raise ValueError(f"data.options.{field} must be a positive integer, got {value!r}")
    split = build_split(
        "synthetic",
        "train",
        num_classes=num_classes,
        images_per_class=train_per_class + test_per_class,
        image_size=image_size,
        channels=channels,
        seed=seed,
    )
    labels = np.asarray(split.labels, dtype=np.int64)
    train_rows, test_rows = [], []
    for class_id in range(num_classes):
        rows = np.flatnonzero(labels == class_id)
        train_rows.append(rows[:train_per_class])
        test_rows.append(rows[train_per_class:])
    train_rows_all = np.concatenate(train_rows)
    test_rows_all = np.concatenate(test_rows)
    images = np.asarray(split.images)
    train_images = np.ascontiguousarray(images[train_rows_all])
    mean, std = channel_mean_std(train_images)
    return ClassificationData(
        name="synthetic",
        train_images=train_images,
        train_labels=labels[train_rows_all],
        test_images=np.ascontiguousarray(images[test_rows_all]),
        test_labels=labels[test_rows_all],
        class_names=list(split.class_names),
        mean=mean,
        std=std,
        fingerprint=str(split.fingerprint),
    )


def load_data(dataset: str, root: str | None = None, **options: Any) -> ClassificationData:
    """Dispatch on ``data.dataset``: ``"synthetic"`` (options → :func:`load_synthetic`),
    ``"cifar10"`` or ``"cifar100"`` (pickles under ``root``; option ``strict``)."""
    if dataset == "synthetic":
        _check_options(dataset, options, inspect.signature(load_synthetic).parameters)
        return load_synthetic(**options)
    if dataset in CIFAR_DATASETS:
        _check_options(dataset, options, ("strict",))
        return load_cifar(root, dataset, **options)
    raise ValueError(f"data.dataset must be one of {list(DATASETS)}, got {dataset!r}")


def _check_options(dataset: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"data.options {unknown} are not options of {dataset}; allowed: {sorted(allowed)}"
        )


# --------------------------------------------------------------------------- batches
def to_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` → float32 ``(N, C, H, W)`` in [0, 1]."""
    tensor = torch.as_tensor(images)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def iterate_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-order float batches ``((B, C, H, W) in [0, 1], (B,))`` for evaluation."""
    for start in range(0, len(images), batch_size):
        yield (
            to_float_images(images[start : start + batch_size]),
            torch.as_tensor(labels[start : start + batch_size]),
        )


class TrainBatches:
    """Endless shuffled mini-batches of uint8 train images, epoch by epoch.

    Batch ``i`` is determined by ``(seed, i)`` only: epoch ``e`` uses the permutation drawn
    from ``seed + e``, so a resumed run continues the same stream from its iteration counter.
    The last incomplete batch of an epoch is dropped (as usual with batch-norm nets).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        if batch_size < 1 or batch_size > len(images):
            raise ValueError(
                f"train.batch_size must lie in 1..{len(images)} (the train-set size), "
                f"got {batch_size}"
            )
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(images) // batch_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index``: uint8 images ``(B, H, W, C)`` and int64 labels ``(B,)``."""
        epoch, position = divmod(index, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.images), generator=generator)
            self._epoch = epoch
        rows = self._order[position * self.batch_size : (position + 1) * self.batch_size]
        return self.images[rows], self.labels[rows]


# --------------------------------------------------------------------------- augmentation
def symmetric_pad(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Pad ``(N, C, H, W)`` by ``padding`` on each side with the mirror image *including* the
    edge pixel (TensorFlow's ``tf.pad(..., "SYMMETRIC")``; PyTorch's ``"reflect"`` excludes
    the edge). ``padding`` must not exceed the image size."""
    height, width = images.shape[2:]
    if padding < 0 or padding > min(height, width):
        raise ValueError(
            f"symmetric padding must lie in 0..{min(height, width)} for {height}x{width} "
            f"images, got {padding}"
        )
    if padding == 0:
        return images
    rows = torch.cat(
        [images[:, :, :padding].flip(2), images, images[:, :, height - padding :].flip(2)], dim=2
    )
    return torch.cat(
        [rows[:, :, :, :padding].flip(3), rows, rows[:, :, :, width - padding :].flip(3)], dim=3
    )


class SymmetricPad(Transform):
    """:func:`symmetric_pad` as a transform (deterministic: ignores the generator)."""

    def __init__(self, padding: int) -> None:
        if padding < 0:
            raise ValueError(f"SymmetricPad: padding must be >= 0, got {padding}")
        self.padding = padding

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return symmetric_pad(images, self.padding)

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


def crop_flip_augmentation(
    image_shape: tuple[int, int, int], padding: int = 4, padding_mode: str = "zeros"
) -> list[Transform]:
    """Pad-``padding`` random crop back to the image size, then a random horizontal flip.

    ``padding_mode`` (:data:`CROP_PADDINGS`): ``"zeros"`` or ``"symmetric"`` (the authors').
    Both draw the same random numbers, so only the border content differs between them.
    """
    if padding_mode not in CROP_PADDINGS:
        raise ValueError(f"crop padding must be one of {CROP_PADDINGS}, got {padding_mode!r}")
    _, height, width = image_shape
    if padding_mode == "zeros":
        crop = [RandomCrop((height, width), padding=padding)]
    else:
        crop = [SymmetricPad(padding), RandomCrop((height, width), padding=0)]
    return [*crop, RandomHorizontalFlip()]


def input_statistics(
    data: ClassificationData, input_scale: str = "standardized"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` for a ``Normalize`` applied to images in [0, 1].

    ``"standardized"``: the train set's per-channel statistics; ``"raw_pixels"``: mean 0,
    std 1/255, so the network sees the raw 0..255 pixel values (:data:`INPUT_SCALES`).
    """
    if input_scale not in INPUT_SCALES:
        raise ValueError(f"input scale must be one of {INPUT_SCALES}, got {input_scale!r}")
    if input_scale == "standardized":
        return data.mean, data.std
    channels = data.image_shape[0]
    return (0.0,) * channels, (1.0 / 255.0,) * channels

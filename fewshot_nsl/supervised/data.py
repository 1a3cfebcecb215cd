"""Data for supervised image classification: CIFAR-10/100 python pickles and synthetic glyphs.

Every dataset is returned as a :class:`ClassificationData`: uint8 images ``(N, H, W, C)`` and
int64 labels for a train and a test split over the *same* classes (unlike the few-shot splits,
whose classes are disjoint), the per-channel mean/std of the train images, and a content
fingerprint that is stamped into the run directory.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from episodes.split import channel_mean_std, content_fingerprint

DATASETS = ("synthetic", "cifar10", "cifar100")

# Layout of the python pickles published at https://www.cs.toronto.edu/~kriz/cifar.html.
_CIFAR_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "num_classes": 10,
        "sizes": {"train": 50000, "test": 10000},
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "num_classes": 100,
        "sizes": {"train": 50000, "test": 10000},
    },
}
_CIFAR_SIDE = 32


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


# --------------------------------------------------------------------------- CIFAR pickles
def _cifar_dir(root: str | Path, dataset: str) -> Path:
    """The folder holding the pickles: ``root`` itself or its standard sub-folder."""
    root = Path(root).expanduser()
    layout = _CIFAR_LAYOUT[dataset]
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR root {str(root)!r} is not a directory; data.root must point to the folder "
            f"holding the {dataset} python pickles (or to its parent with "
            f"{layout['folder']!r} inside), as extracted from the "
            f"{layout['folder'].replace('-batches-py', '').replace('-python', '')}"
            "-python.tar.gz archive"
        )
    nested = root / layout["folder"]
    return nested if (nested / layout["meta"]).exists() else root


def _load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the originals are bytes-keyed, py2 era)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file missing: {str(path)!r}")
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="bytes")
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"{str(path)!r} is not a readable CIFAR python pickle: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(
            f"{str(path)!r} holds a {type(content).__name__}, expected a dict as in the CIFAR "
            "python pickles"
        )
    return {key.decode() if isinstance(key, bytes) else str(key): value
            for key, value in content.items()}


def _require(content: dict[str, Any], key: str, path: Path) -> Any:
    if key not in content:
        raise ValueError(
            f"{str(path)!r} has no key {key!r}; keys found: {sorted(content)} "
            "(is this the right CIFAR variant for data.dataset?)"
        )
    return content[key]


def read_cifar_split(
    root: str | Path, dataset: str, split: str, *, strict: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read one split of CIFAR-10 or CIFAR-100 from the python pickles.

    Args:
        root: folder with the pickles (``data_batch_1..5``, ``test_batch``, ``batches.meta``
            for CIFAR-10; ``train``, ``test``, ``meta`` for CIFAR-100), or its parent.
        dataset: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        split: ``"train"`` or ``"test"``.
        strict: require the published split sizes (50,000 train / 10,000 test images);
            ``False`` accepts subsets with the same file layout.

    Returns:
        images uint8 ``(N, 32, 32, 3)``, labels int64 ``(N,)``, class names.

    Raises:
        FileNotFoundError: a missing folder or file (named).
        ValueError: a wrong key, size, dtype or label range (file and numbers named).
    """
    if dataset not in _CIFAR_LAYOUT:
        raise ValueError(f"dataset must be one of {sorted(_CIFAR_LAYOUT)}, got {dataset!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    layout = _CIFAR_LAYOUT[dataset]
    folder = _cifar_dir(root, dataset)

    meta_path = folder / layout["meta"]
    names = _require(_load_pickle(meta_path), layout["names_key"], meta_path)
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if len(class_names) != layout["num_classes"]:
        raise ValueError(
            f"{str(meta_path)!r}: {layout['names_key']!r} lists {len(class_names)} classes, "
            f"expected {layout['num_classes']} for {dataset}"
        )

    pixels_per_image = 3 * _CIFAR_SIDE * _CIFAR_SIDE
    image_blocks, label_blocks = [], []
    for file_name in layout[split]:
        path = folder / file_name
        content = _load_pickle(path)
        data = np.asarray(_require(content, "data", path))
        labels = np.asarray(_require(content, layout["label_key"], path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels_per_image:
            raise ValueError(
                f"{str(path)!r}: 'data' must be uint8 of shape (N, {pixels_per_image}) "
                f"(N images of 3x32x32), got {data.dtype} {data.shape}"
            )
        if labels.shape != (data.shape[0],):
            raise ValueError(
                f"{str(path)!r}: {layout['label_key']!r} has {labels.size} entries for "
                f"{data.shape[0]} images"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= layout["num_classes"]):
            raise ValueError(
                f"{str(path)!r}: labels must lie in 0..{layout['num_classes'] - 1}, found "
                f"{labels.min()}..{labels.max()}"
            )
        # Rows are stored channel-major (1024 red, 1024 green, 1024 blue values).
        image_blocks.append(data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1))
        label_blocks.append(labels)
    images = np.ascontiguousarray(np.concatenate(image_blocks))
    labels = np.concatenate(label_blocks)
    expected = layout["sizes"][split]
    if strict and len(images) != expected:
        raise ValueError(
            f"{dataset} {split} split in {str(folder)!r} has {len(images)} images, expected "
            f"{expected} (truncated or foreign files? data.options.strict=false accepts "
            "subsets)"
        )
    return images, labels, class_names


def load_cifar(
    root: str | Path | None, dataset: str, *, strict: bool = True
) -> ClassificationData:
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

    for field, value in (("num_classes", num_classes), ("train_per_class", train_per_class),
                         ("test_per_class", test_per_class), ("image_size", image_size)):
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
    if dataset in _CIFAR_LAYOUT:
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

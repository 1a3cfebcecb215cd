"""The CIFAR-10 / CIFAR-100 python pickles: one reader for the supervised and few-shot datasets."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

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
#: The datasets :func:`read_cifar_split` reads.
CIFAR_DATASETS: tuple[str, ...] = tuple(_CIFAR_LAYOUT)


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
    return {
        key.decode() if isinstance(key, bytes) else str(key): value
        for key, value in content.items()
    }


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

"""Shared pytest fixtures: small synthetic splits and fake dataset folders in every layout."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from episodes import ImageSplit, build_split
from episodes.datasets import CIFAR100_SUPERCLASSES


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Restore torch's thread count after each test: ``train.threads`` in a config sets it
    process-wide."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """The tiny few-shot config of the CLI tests (``tests.test_cli.TINY_YAML``) as a file."""
    from tests.test_cli import TINY_YAML

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def load_script(name: str) -> types.ModuleType:
    """Import ``scripts/<name>.py`` (scripts/ is not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def glyph_split() -> ImageSplit:
    """A small synthetic train split: 12 classes × 10 images, 1×28×28."""
    return build_split("synthetic", "train", num_classes=12, images_per_class=10)


@pytest.fixture(scope="session")
def glyph_split_rgb() -> ImageSplit:
    """A small 3-channel synthetic split: 8 classes × 8 images, 3×32×32."""
    return build_split(
        "synthetic", "val", num_classes=8, images_per_class=8, channels=3, image_size=32
    )


# --------------------------------------------------------------------------- Mini-ImageNet

MINI_CLASSES = {"train": 4, "val": 2, "test": 3}
MINI_IMAGES_PER_CLASS = 5


def _smooth_random_images(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """uint8 (count, size, size, 3): upsampled noise, so JPEG coding is not pathological."""
    coarse = rng.integers(0, 256, size=(count, size // 6 + 1, size // 6 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(coarse, 6, 1), 6, 2)[:, :size, :size])


def write_mini_imagenet_layouts(root: Path, seed: int = 0) -> dict[str, Path]:
    """The same tiny Mini-ImageNet in all three layouts under ``root``.

    The JPEGs of the CSV layout are written first and decoded back with Pillow; the pickle
    and HDF5 layouts hold exactly those decoded pixels, so all three must convert to the same
    canonical cache. Rows/classes are deliberately stored in different orders per layout.
    Returns ``{"csv": ..., "pickle": ..., "hdf5": ...}`` folders.
    """
    h5py = pytest.importorskip("h5py")  # the optional extra "hdf5"
    rng = np.random.default_rng(seed)
    folders = {name: root / name for name in ("csv", "pickle", "hdf5")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    (folders["csv"] / "images").mkdir()
    class_number = 0
    for split, num_classes in MINI_CLASSES.items():
        wnids = [f"n{class_number + k:08d}" for k in range(num_classes)]
        class_number += num_classes
        csv_rows, decoded = [], {}
        for wnid in wnids:
            pixels = _smooth_random_images(rng, MINI_IMAGES_PER_CLASS, 84)
            decoded[wnid] = []
            for i, image in enumerate(pixels):
                name = f"{wnid}{i:08d}.jpg"
                path = folders["csv"] / "images" / name
                Image.fromarray(image).save(path, quality=90)
                with Image.open(path) as jpeg:
                    decoded[wnid].append(np.asarray(jpeg.convert("RGB")))
                csv_rows.append((name, wnid))
        # CSV rows interleave the classes round-robin (within a class, image order is kept).
        order = sorted(range(len(csv_rows)), key=lambda r: (r % MINI_IMAGES_PER_CLASS, r))
        lines = ["filename,label"] + [f"{csv_rows[i][0]},{csv_rows[i][1]}" for i in order]
        (folders["csv"] / f"{split}.csv").write_text("\n".join(lines) + "\n")
        # Pickle: rows shuffled, class_dict points at them.
        flat = [(wnid, i) for wnid in wnids for i in range(MINI_IMAGES_PER_CLASS)]
        perm = rng.permutation(len(flat))
        image_data = np.stack([decoded[flat[p][0]][flat[p][1]] for p in perm])
        class_dict = {wnid: [] for wnid in reversed(wnids)}
        for row, p in enumerate(perm):
            class_dict[flat[p][0]].append(row)
        for wnid in wnids:  # within a class, rows in image order
            class_dict[wnid].sort(key=lambda row: flat[perm[row]][1])
        pickle_name = "validation" if split == "val" else split  # the other popular naming
        with (folders["pickle"] / f"mini-imagenet-cache-{pickle_name}.pkl").open("wb") as handle:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, handle)
        # torchmeta HDF5: one dataset per class, labels JSON in reversed order.
        with h5py.File(folders["hdf5"] / f"{split}_data.hdf5", "w") as handle:
            group = handle.create_group("datasets")
            for wnid in wnids:
                group.create_dataset(wnid, data=np.stack(decoded[wnid]))
        (folders["hdf5"] / f"{split}_labels.json").write_text(json.dumps(list(reversed(wnids))))
    return folders


@pytest.fixture
def mini_imagenet_layouts(tmp_path: Path) -> dict[str, Path]:
    return write_mini_imagenet_layouts(tmp_path / "sources")


# --------------------------------------------------------------------------- Omniglot


def write_omniglot(root: Path, characters: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """Omniglot folders: ``{"images_background": {"Alpha/character01": n_images, ...}, ...}``.

    Each image is a random 105×105 binary glyph (mode "1", as the real PNGs)."""
    rng = np.random.default_rng(seed)
    for part, chars in characters.items():
        for char, count in chars.items():
            folder = root / part / char
            folder.mkdir(parents=True)
            for i in range(count):
                bits = rng.random((105, 105)) > 0.2
                Image.fromarray(bits).convert("1").save(folder / f"{i:04d}.png")
    return root


# --------------------------------------------------------------------------- CIFAR-100


def cifar100_fine_names() -> list[str]:
    """CIFAR-100's 100 fine class names in the order of its ``meta`` file (alphabetical)."""
    return sorted(n for names in CIFAR100_SUPERCLASSES.values() for n in names)


def write_fake_cifar100(root: Path, per_class: tuple[int, int] = (2, 1), seed: int = 0) -> Path:
    """A tiny CIFAR-100 python folder (``meta``, ``train``, ``test``) with the real class names.

    ``per_class`` images per class in train / test; pixels random."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = cifar100_fine_names()
    coarse = sorted(CIFAR100_SUPERCLASSES)
    coarse_of = {n: coarse.index(sc) for sc, names in CIFAR100_SUPERCLASSES.items() for n in names}
    with (folder / "meta").open("wb") as handle:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": coarse}, handle)
    for part, count in zip(("train", "test"), per_class):
        labels = np.tile(np.arange(100), count)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        record = {
            "data": data,
            "fine_labels": labels.tolist(),
            "coarse_labels": [coarse_of[fine[label]] for label in labels],
        }
        with (folder / part).open("wb") as handle:
            pickle.dump(record, handle)
    return root

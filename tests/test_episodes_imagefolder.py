"""ImageFolder in both layouts (split folders, or class folders + split file) and channels
that follow the images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from episodes import build_split, load_cache, prepare_dataset


def write_split_folders(root: Path, mode: str = "L", seed: int = 0) -> dict[str, list[str]]:
    """``root/{train,validation,test}/<class>/*.png`` (val under its alias on purpose)."""
    rng = np.random.default_rng(seed)
    names = {"train": ["cat", "dog", "emu"], "validation": ["fox"], "test": ["gnu", "hen"]}
    for folder, classes in names.items():
        for cls in classes:
            (root / folder / cls).mkdir(parents=True)
            for i in range(3):
                shape = (12, 12) if mode == "L" else (12, 12, 3)
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                Image.fromarray(pixels).convert(mode).save(root / folder / cls / f"{i}.png")
    return names


def test_split_folders_are_detected_without_a_split_file(tmp_path):
    names = write_split_folders(tmp_path / "data")
    for split, folder in (("train", "train"), ("val", "validation"), ("test", "test")):
        loaded = build_split("imagefolder", split, root=tmp_path / "data")
        assert loaded.class_names == names[folder]
        assert len(loaded) == 3 * len(names[folder])
    first = tmp_path / "data/train/cat/0.png"
    with Image.open(first) as image:
        expected = np.asarray(image)
    train = build_split("imagefolder", "train", root=tmp_path / "data")
    assert np.array_equal(train.images[0, :, :, 0], expected)


def test_grayscale_images_give_one_channel_and_the_choice_is_logged(tmp_path, caplog):
    write_split_folders(tmp_path / "gray", mode="L")
    with caplog.at_level(logging.INFO, logger="episodes.datasets"):
        cache = prepare_dataset("imagefolder", tmp_path / "gray", tmp_path / "cache")
    assert load_cache(cache, "train").image_shape == (1, 12, 12)
    assert "every image is grayscale, so channels=1" in caplog.text
    forced = build_split("imagefolder", "test", root=tmp_path / "gray", channels=3)
    assert forced.image_shape == (3, 12, 12)
    assert np.array_equal(forced.images[..., 0], forced.images[..., 2])
    write_split_folders(tmp_path / "rgb", mode="RGB")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="episodes.datasets"):
        assert build_split("imagefolder", "val", root=tmp_path / "rgb").image_shape[0] == 3
    assert "some images are in colour, so channels=3" in caplog.text
    with pytest.raises(ValueError, match="channels must be 1, 3 or 'auto', got 2"):
        build_split("imagefolder", "val", root=tmp_path / "rgb", channels=2)


def test_a_split_file_wins_and_a_folder_without_either_layout_is_explained(tmp_path):
    root = tmp_path / "data"
    write_split_folders(root)
    (root / "mine.json").write_text(
        json.dumps({"train": ["train/cat"], "val": ["train/dog"], "test": ["test/gnu"]})
    )
    val = build_split("imagefolder", "val", root=root, split_file=root / "mine.json")
    assert val.class_names == ["train/dog"] and len(val) == 3
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no ImageFolder layout found.*splits.json"):
        build_split("imagefolder", "train", root=tmp_path / "flat")

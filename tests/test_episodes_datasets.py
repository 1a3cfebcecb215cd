"""Datasets: Mini-ImageNet's three layouts, Omniglot, CIFAR-FS/FC100, ImageFolder, the cache,
the synthetic glyphs, and every bad input the issue lists."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from episodes import (
    EpisodeSampler,
    ImageSplit,
    SyntheticGlyphs,
    build_split,
    list_datasets,
    load_cache,
    prepare_dataset,
    prepare_mini_imagenet,
)
from episodes.datasets import (
    CIFAR100_SUPERCLASSES,
    CIFAR_FS_SPLITS,
    FC100_SUPERCLASS_SPLITS,
    detect_mini_imagenet_layout,
)
from episodes.split import channel_mean_std, content_fingerprint
from tests.conftest import (
    MINI_CLASSES,
    MINI_IMAGES_PER_CLASS,
    cifar100_fine_names,
    load_script,
    write_fake_cifar100,
    write_omniglot,
)


def _leftovers(folder: Path, out_name: str) -> list[str]:
    """Temp files/folders a failed conversion might have left next to ``out``."""
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{out_name}.")]


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_dataset_and_rejects_unknown_names():
    assert set(list_datasets()) >= {
        "synthetic", "mini-imagenet", "omniglot", "cifar-fs", "fc100", "imagefolder",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown dataset 'imagenet-tiered'.*mini-imagenet"):
        build_split("imagenet-tiered", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_split("synthetic", "dev")
    with pytest.raises(ValueError, match="needs root="):
        build_split("mini-imagenet", "train")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['image_size'\]"):
        prepare_dataset("mini-imagenet", ".", "unused-out", image_size=32)


# --------------------------------------------------------------------------- Mini-ImageNet


def test_three_mini_imagenet_layouts_convert_to_identical_caches(mini_imagenet_layouts, tmp_path):
    caches = {}
    for layout, source in mini_imagenet_layouts.items():
        assert detect_mini_imagenet_layout(source) == layout
        caches[layout] = prepare_mini_imagenet(source, tmp_path / f"cache-{layout}", strict=False)
    indices = {k: json.loads((c / "index.json").read_text()) for k, c in caches.items()}
    for index in indices.values():
        index.pop("source")
    assert indices["csv"] == indices["pickle"] == indices["hdf5"]
    for split in ("train", "val", "test"):
        files = {k: (c / f"{split}.npy").read_bytes() for k, c in caches.items()}
        assert files["csv"] == files["pickle"] == files["hdf5"]

    split = build_split("mini-imagenet", "val", root=caches["pickle"])
    assert isinstance(split.images, np.memmap)
    assert split.num_classes == MINI_CLASSES["val"]
    assert split.image_shape == (3, 84, 84)
    assert (split.class_counts == MINI_IMAGES_PER_CLASS).all()
    assert split.class_names == sorted(split.class_names)
    # The stored fingerprint and mean/std are what the data says (recomputed independently).
    assert split.fingerprint == content_fingerprint(split.images, split.labels, split.class_names)
    train = load_cache(caches["pickle"], "train", mmap=False)
    assert not isinstance(train.images, np.memmap)
    assert np.allclose(split.mean, train.images.reshape(-1, 3).mean(0) / 255.0)
    assert np.allclose(split.std, (train.images.reshape(-1, 3) / 255.0).std(0))


def test_cache_holds_the_source_images_class_by_class(mini_imagenet_layouts, tmp_path):
    source = mini_imagenet_layouts["csv"]
    cache = prepare_mini_imagenet(source, tmp_path / "cache", strict=False)
    split = load_cache(cache, "test")
    wnid = split.class_names[1]
    rows = split.indices_of(1)
    for i, row in enumerate(rows):
        with Image.open(source / "images" / f"{wnid}{i:08d}.jpg") as image:
            assert np.array_equal(split.images[row], np.asarray(image.convert("RGB")))


def test_reading_the_source_directly_matches_the_cache(mini_imagenet_layouts, tmp_path):
    cache = prepare_mini_imagenet(mini_imagenet_layouts["hdf5"], tmp_path / "cache", strict=False)
    direct = build_split("mini-imagenet", "train", root=mini_imagenet_layouts["pickle"])
    cached = build_split("mini-imagenet", "train", root=cache)
    assert direct.fingerprint == cached.fingerprint
    assert np.allclose(direct.mean, cached.mean) and np.allclose(direct.std, cached.std)


def test_csv_images_of_other_sizes_are_resized_to_84(tmp_path):
    source = tmp_path / "src"
    (source / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        image = rng.integers(0, 256, size=(100, 120, 3), dtype=np.uint8)
        Image.fromarray(image).save(source / "images" / f"{split}.png")
        (source / f"{split}.csv").write_text(f"filename,label\n{split}.png,n{split}\n")
    cache = prepare_mini_imagenet(source, tmp_path / "cache", strict=False)
    split = load_cache(cache, "val")
    expected = Image.fromarray(
        np.asarray(Image.open(source / "images" / "val.png").convert("RGB"))
    ).resize((84, 84), Image.Resampling.BILINEAR)
    assert split.images.shape == (1, 84, 84, 3)
    assert np.array_equal(split.images[0], np.asarray(expected))


def test_strict_mode_says_exactly_what_differs(mini_imagenet_layouts, tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(ValueError) as error:
        prepare_mini_imagenet(mini_imagenet_layouts["pickle"], out)
    message = str(error.value)
    assert "split 'train' has 4 classes (expected 64)" in message
    assert "split 'val' has 2 classes (expected 16)" in message
    assert "split 'test' has 3 classes (expected 20)" in message
    assert "do not have 600 images (n00000000: 5" in message
    assert "--no-strict" in message
    assert not out.exists() and not _leftovers(tmp_path, "cache")


def test_existing_output_is_kept_unless_overwrite(mini_imagenet_layouts, tmp_path):
    out = prepare_mini_imagenet(mini_imagenet_layouts["pickle"], tmp_path / "cache", strict=False)
    before = (out / "index.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare_mini_imagenet(mini_imagenet_layouts["csv"], out, strict=False)
    assert (out / "index.json").read_text() == before
    prepare_mini_imagenet(mini_imagenet_layouts["csv"], out, strict=False, overwrite=True)
    assert json.loads((out / "index.json").read_text())["source"].endswith("csv")
    assert not _leftovers(tmp_path, "cache")


# --------------------------------------------------------------------------- bad input


def test_missing_source_files_are_named(mini_imagenet_layouts, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no Mini-ImageNet layout"):
        prepare_mini_imagenet(empty, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="mini-imagenet source not found: .*nowhere"):
        prepare_mini_imagenet(tmp_path / "nowhere", tmp_path / "out")
    pickles = mini_imagenet_layouts["pickle"]
    (pickles / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="split 'test'.*mini-imagenet-cache-test.pkl"):
        prepare_mini_imagenet(pickles, tmp_path / "out", strict=False)
    hdf5 = mini_imagenet_layouts["hdf5"]
    (hdf5 / "val_labels.json").unlink()
    with pytest.raises(FileNotFoundError, match="val_labels.json"):
        prepare_mini_imagenet(hdf5, tmp_path / "out", strict=False)
    csv_source = mini_imagenet_layouts["csv"]
    missing = sorted((csv_source / "images").iterdir())[0]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=missing.name):
        prepare_mini_imagenet(csv_source, tmp_path / "out", strict=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_python2_style_pickles_with_bytes_keys_load(mini_imagenet_layouts, tmp_path):
    pickles = mini_imagenet_layouts["pickle"]
    reference = prepare_mini_imagenet(pickles, tmp_path / "reference", strict=False)
    for path in pickles.glob("*.pkl"):
        data = pickle.loads(path.read_bytes())
        class_dict = {wnid.encode(): rows for wnid, rows in data["class_dict"].items()}
        path.write_bytes(
            pickle.dumps({b"image_data": data["image_data"], b"class_dict": class_dict})
        )
    converted = prepare_mini_imagenet(pickles, tmp_path / "bytes-keys", strict=False)
    for split in ("train", "val", "test"):
        assert load_cache(converted, split).fingerprint == load_cache(reference, split).fingerprint


def test_hdf5_without_h5py_says_how_to_install_it(mini_imagenet_layouts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes "import h5py" fail
    with pytest.raises(ImportError, match="needs h5py: pip install 'fewshot-nsl\\[hdf5\\]'"):
        prepare_mini_imagenet(mini_imagenet_layouts["hdf5"], tmp_path / "out", strict=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_wrong_pickle_keys_and_truncated_pickles_are_named(mini_imagenet_layouts, tmp_path):
    pickles = mini_imagenet_layouts["pickle"]
    path = pickles / "mini-imagenet-cache-train.pkl"
    data = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({"images": data["image_data"], "class_dict": data["class_dict"]}))
    with pytest.raises(
        ValueError, match=r"mini-imagenet-cache-train.pkl: missing key\(s\) \['image_data'\]"
    ):
        prepare_mini_imagenet(pickles, tmp_path / "out", strict=False)
    full = pickle.dumps(data)
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="cannot read pickle .*mini-imagenet-cache-train.pkl"):
        prepare_mini_imagenet(pickles, tmp_path / "out", strict=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_images_are_named_and_nothing_is_half_written(
    mini_imagenet_layouts, tmp_path, damage
):
    source = mini_imagenet_layouts["csv"]
    # The last split converted is "test": the train/val files would already exist in the temp
    # folder when this fails, which is what "nothing half-written" must cover.
    victim = source / "images" / "n0000000800000003.jpg"
    content = victim.read_bytes()
    victim.write_bytes(content[: len(content) // 3] if damage == "truncated" else b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*n0000000800000003.jpg"):
        prepare_mini_imagenet(source, tmp_path / "out", strict=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_corrupt_cache_files_are_named(mini_imagenet_layouts, tmp_path):
    cache = prepare_mini_imagenet(mini_imagenet_layouts["pickle"], tmp_path / "cache", strict=False)
    data = (cache / "val.npy").read_bytes()
    (cache / "val.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="val.npy"):
        load_cache(cache, "val")
    (cache / "test.npy").unlink()
    with pytest.raises(FileNotFoundError, match="test.npy"):
        load_cache(cache, "test")
    with pytest.raises(ValueError, match="holds dataset 'mini-imagenet', not 'omniglot'"):
        build_split("omniglot", "train", root=cache)
    with pytest.raises(ValueError, match=r"prepared cache: options \['rotations'\]"):
        build_split("mini-imagenet", "train", root=cache, rotations=False)


# --------------------------------------------------------------------------- Omniglot


def test_omniglot_folders_with_rotations(tmp_path):
    chars = {
        "images_background": {
            "Alpha/character01": 3,
            "Alpha/character02": 3,
            "Beta/character01": 3,
        },
        "images_evaluation": {"Gamma/character01": 3, "Gamma/character02": 3},
    }
    source = write_omniglot(tmp_path / "omniglot", chars)
    with pytest.raises(ValueError, match="found 5 characters, expected 1623"):
        prepare_dataset("omniglot", source, tmp_path / "strict")
    cache = prepare_dataset("omniglot", source, tmp_path / "cache", strict=False)
    splits = {s: load_cache(cache, s) for s in ("train", "val", "test")}
    # 5 characters -> 3/1/1 in the published proportions, each ×4 rotations.
    assert [splits[s].num_classes for s in ("train", "val", "test")] == [12, 4, 4]
    assert splits["val"].class_names[0] == "Gamma/character01/rot000"
    assert splits["test"].class_names[0] == "Gamma/character02/rot000"
    train = splits["train"]
    assert train.image_shape == (1, 28, 28)
    upright = train.class_names.index("Alpha/character01/rot000")
    turned = train.class_names.index("Alpha/character01/rot090")
    for a, b in zip(train.indices_of(upright), train.indices_of(turned)):
        assert np.array_equal(np.rot90(train.images[a], 1, axes=(0, 1)), train.images[b])
    with Image.open(source / "images_background/Alpha/character01/0001.png") as image:
        expected = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.BILINEAR))
    assert np.array_equal(train.images[train.indices_of(upright)[1], :, :, 0], expected)


# --------------------------------------------------------------------------- CIFAR-FS, FC100


def test_published_cifar_class_splits_are_consistent():
    fine = set(cifar100_fine_names())
    assert len(fine) == 100
    for splits, sizes in ((CIFAR_FS_SPLITS, (64, 16, 20)),):
        assert tuple(len(splits[s]) for s in ("train", "val", "test")) == sizes
        assert set().union(*map(set, splits.values())) == fine
    assert tuple(len(FC100_SUPERCLASS_SPLITS[s]) for s in ("train", "val", "test")) == (12, 4, 4)
    assert set().union(*map(set, FC100_SUPERCLASS_SPLITS.values())) == set(CIFAR100_SUPERCLASSES)


def test_cifar_fs_and_fc100_fine_class_splits_partition_cifar100():
    fine = cifar100_fine_names()
    assert len(set(fine)) == 100 and all(len(v) == 5 for v in CIFAR100_SUPERCLASSES.values())
    fc100 = {
        s: [n for sc in FC100_SUPERCLASS_SPLITS[s] for n in CIFAR100_SUPERCLASSES[sc]]
        for s in ("train", "val", "test")
    }
    for splits, sizes in ((CIFAR_FS_SPLITS, (64, 16, 20)), (fc100, (60, 20, 20))):
        parts = [list(splits[s]) for s in ("train", "val", "test")]
        assert tuple(len(set(p)) for p in parts) == tuple(len(p) for p in parts) == sizes
        assert sorted(n for p in parts for n in p) == fine  # disjoint, and all 100 covered
    assert {"otter", "maple_tree", "crab"} <= set(CIFAR_FS_SPLITS["val"])
    assert {"baby", "rocket", "whale"} <= set(CIFAR_FS_SPLITS["test"])


@pytest.mark.parametrize(
    "name, sizes", [("cifar-fs", (64, 16, 20)), ("fc100", (60, 20, 20))]
)  # fmt: skip
def test_cifar_fs_and_fc100_from_the_cifar100_pickles(tmp_path, name, sizes):
    source = write_fake_cifar100(tmp_path / "cifar")
    with pytest.raises(ValueError, match="do not have 600 images"):
        prepare_dataset(name, source, tmp_path / "strict")
    cache = prepare_dataset(name, source, tmp_path / "cache", strict=False)
    splits = {s: load_cache(cache, s) for s in ("train", "val", "test")}
    assert tuple(splits[s].num_classes for s in ("train", "val", "test")) == sizes
    names = [set(splits[s].class_names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    if name == "fc100":  # every class of a superclass lands in the same split
        for superclass, split in (("people", "test"), ("insects", "test"), ("trees", "train")):
            assert set(CIFAR100_SUPERCLASSES[superclass]) <= set(splits[split].class_names)
    # Pixels: the rows of one class are the pickled rows (train part first), as HWC images.
    folder = source / "cifar-100-python"
    fine = cifar100_fine_names()
    test = splits["test"]
    class_name = test.class_names[0]
    expected = []
    for part in ("train", "test"):
        record = pickle.loads((folder / part).read_bytes())
        rows = [i for i, label in enumerate(record["fine_labels"]) if fine[label] == class_name]
        expected += [record["data"][i].reshape(3, 32, 32).transpose(1, 2, 0) for i in rows]
    assert np.array_equal(test.images[test.indices_of(0)], np.stack(expected))


def test_cifar_meta_without_real_names_is_rejected(tmp_path):
    source = write_fake_cifar100(tmp_path / "cifar")
    meta = source / "cifar-100-python" / "meta"
    meta.write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    with pytest.raises(ValueError, match="meta: fine_label_names lacks"):
        prepare_dataset("cifar-fs", source, tmp_path / "out", strict=False)


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_with_a_class_split_file(tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    names = {"train": ["cat", "dog", "emu"], "val": ["fox"], "test": ["gnu", "hen"]}
    for cls in sum(names.values(), []):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    (root / "splits.json").write_text(json.dumps(names))
    with pytest.raises(ValueError, match="pass image_size="):
        build_split("imagefolder", "train", root=root)
    split = build_split("imagefolder", "test", root=root, image_size=16)
    assert split.class_names == ["gnu", "hen"] and split.image_shape == (3, 16, 16)
    assert split.num_classes == 2 and len(split) == 6
    gray = build_split("imagefolder", "val", root=root, image_size=16, channels=1)
    assert gray.image_shape == (1, 16, 16)
    (root / "splits.json").write_text(json.dumps({"train": ["cat", "wolf"]}))
    with pytest.raises(FileNotFoundError, match="class folder .*wolf"):
        build_split("imagefolder", "train", root=root, image_size=16)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_glyphs_are_deterministic_with_disjoint_splits():
    a = build_split("synthetic", "train", num_classes=6, images_per_class=4, seed=3)
    b = build_split("synthetic", "train", num_classes=6, images_per_class=4, seed=3)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.images, b.images)
    # A class does not depend on how many classes are asked for.
    more = build_split("synthetic", "train", num_classes=9, images_per_class=4, seed=3)
    assert np.array_equal(more.images[: len(a)], a.images)
    other_seed = build_split("synthetic", "train", num_classes=6, images_per_class=4, seed=4)
    assert other_seed.fingerprint != a.fingerprint
    test = build_split("synthetic", "test", num_classes=6, images_per_class=4, seed=3)
    # Splits hold different classes: no test image is close to any train image.
    gap = np.abs(test.images[:, None].astype(int) - a.images[None].astype(int)).mean(axis=(2, 3, 4))
    assert gap.min() > 5
    assert a.mean == test.mean and a.std == test.std  # one normalisation for every split
    assert a.image_shape == (1, 28, 28) and a.images.dtype == np.uint8


def test_synthetic_images_of_a_class_share_strokes_but_vary(glyph_split):
    images = glyph_split.images.astype(np.float64) / 255.0
    same, different = [], []
    for c in range(glyph_split.num_classes):
        rows = glyph_split.indices_of(c)
        other = glyph_split.indices_of((c + 1) % glyph_split.num_classes)
        same.append(np.abs(images[rows[0]] - images[rows[1]]).mean())
        different.append(np.abs(images[rows[0]] - images[other[0]]).mean())
        assert not np.array_equal(images[rows[0]], images[rows[1]])
    assert np.mean(same) < np.mean(different)
    assert 0.05 < glyph_split.mean[0] < 0.5  # strokes cover a fraction of the image


def test_synthetic_options(glyph_split_rgb):
    assert glyph_split_rgb.image_shape == (3, 32, 32)
    assert len(glyph_split_rgb.mean) == 3
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        SyntheticGlyphs(channels=2)
    with pytest.raises(ValueError, match="takes no root"):
        build_split("synthetic", "train", root="/tmp")


def test_channel_statistics_and_fingerprint_against_references():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5000, 3, 4, 2), dtype=np.uint8)  # > one hash chunk
    mean, std = channel_mean_std(images)
    flat = images.reshape(-1, 2).astype(np.float64) / 255.0
    assert np.allclose(mean, flat.mean(0)) and np.allclose(std, flat.std(0))
    labels = np.zeros(5000, dtype=np.int64)
    base = content_fingerprint(images, labels, ["a"])
    changed = images.copy()
    changed[4999, 0, 0, 0] ^= 1
    assert content_fingerprint(changed, labels, ["a"]) != base
    assert content_fingerprint(images, labels, ["b"]) != base
    assert content_fingerprint(images.copy(), labels, ["a"]) == base


def test_image_split_validates_its_fields():
    images = np.zeros((4, 2, 2, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        ImageSplit(images, np.array([0, 1, 2, 0]), ["a", "b"], "x", "train", (0.0,), (1.0,), "f")
    with pytest.raises(ValueError, match="must be uint8"):
        ImageSplit(images.astype(np.float32), np.zeros(4), ["a"], "x", "train", (0.0,), (1.0,), "")
    split = ImageSplit(images, np.array([1, 0, 1, 1]), ["a", "b"], "x", "train", (0.0,), (1.0,), "")
    assert split.indices_of(1).tolist() == [0, 2, 3] and split.class_counts.tolist() == [1, 3]
    with pytest.raises(ValueError, match="shot\\+query = 1\\+2 = 3 .* 'a' \\(1 images\\)"):
        EpisodeSampler(split, way=2, shot=1, query=2, seed=0)


@pytest.mark.slow
def test_synthetic_glyphs_are_learnable_but_not_trivial():
    """The toolkit's Conv-4 ProtoNet, briefly meta-trained, clearly beats chance (20%) on held-out
    glyph classes but stays far from 100%; raw-pixel nearest neighbour is weaker still.
    (Longer runs and the numbers: docs/benchmarks/episodes.md.)"""
    diagnostics = load_script("diagnostics")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: one thread is as fast, and immune to a busy machine
    try:
        train = build_split("synthetic", "train", num_classes=64)
        test = build_split("synthetic", "test", num_classes=40)
        test_episodes = [EpisodeSampler(test, 5, 1, 10, seed=1)[i] for i in range(30)]
        nearest = diagnostics.nearest_neighbour_accuracy(test_episodes)
        train_episodes = EpisodeSampler(train, 5, 1, 5, seed=0, num_episodes=60)
        report = diagnostics.train_protonet(
            train_episodes, test_episodes, in_channels=1, image_size=28
        )
    finally:
        torch.set_num_threads(threads)
    # Measured: nearest neighbour 0.45, ProtoNet 0.58 (chance: 0.2).
    assert 0.25 < nearest < 0.75
    assert 0.35 < report.test_accuracy < 0.9


def test_omniglot_full_listing_follows_the_vinyals_split():
    from episodes.datasets.omniglot import (
        OMNIGLOT_SPLIT_SIZES,
        OMNIGLOT_VAL_ALPHABETS,
        _omniglot_split_ranges,
        _vinyals_order,
    )

    # A listing shaped like the real one: background alphabets (validation ones among them,
    # 172 characters in all) sorted, then evaluation alphabets.
    val_sizes = dict(zip(sorted(OMNIGLOT_VAL_ALPHABETS), [34, 34, 34, 35, 35]))
    background = [
        ("Alpha", 400),
        ("Armenian", 0),
        ("Bengali", 0),
        ("Cyrillic", 300),
        ("Early_Aramaic", 0),
        ("Hebrew", 0),
        ("Mkhedruli_(Georgian)", 0),
        ("Zeta", 80),
    ]
    listing = []
    for alphabet, n in background:
        n = val_sizes.get(alphabet, n)
        listing += [(f"{alphabet}/character{i:02d}", []) for i in range(n)]
    evaluation = 1623 - len(listing)
    listing += [(f"Zz_eval/character{i:03d}", []) for i in range(evaluation)]

    ordered = _vinyals_order(listing)
    ranges = _omniglot_split_ranges(len(ordered), strict=True)
    names = {split: [ordered[i][0] for i in r] for split, r in ranges.items()}
    assert {len(v) for v in names.values()} == set(OMNIGLOT_SPLIT_SIZES.values())
    assert all(n.split("/")[0] in OMNIGLOT_VAL_ALPHABETS for n in names["val"])
    assert not any(n.split("/")[0] in OMNIGLOT_VAL_ALPHABETS for n in names["train"])
    assert names["test"] == [n for n, _ in listing[-423:]]  # the last 423 characters

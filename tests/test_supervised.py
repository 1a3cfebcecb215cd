"""Supervised NSN classification (fewshot_nsl.supervised): data, config, model, training, export.

Over 400 lines: mirrors the whole supervised package (data, model, schema, training, export).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_nsl.config import ConfigError, resolve_config
from fewshot_nsl.nn import NSLConv2d
from fewshot_nsl.supervised import (
    SUPERVISED_DEFAULTS,
    SupervisedTrainer,
    build_model,
    compare_throughput,
    export_model,
    load_data,
    load_exported,
    load_supervised_config,
    load_synthetic,
    load_trained_model,
    read_cifar_split,
    run_supervised,
)
from fewshot_nsl.supervised.data import TrainBatches
from fewshot_nsl.supervised.model import count_parameters, parameter_groups

REPO = Path(__file__).resolve().parents[1]

# Tiny CNN-9 (same depth and layout, fewer channels) on 16x16 glyphs: fast on 2 CPU cores.
TINY_BACKBONE = {"widths": [8, 12, 16], "root_width": 8}
VARIANTS = {
    "plain": {"kind": "plain"},
    "static_shared": {"kind": "static", "similarity": "full", "sharing": "shared"},
    "static_disjoint": {"kind": "static", "similarity": "full", "sharing": "disjoint"},
    "dynamic_diagonal": {
        "kind": "dynamic",
        "similarity": "diagonal",
        "granularity": "location",
        "hidden": 8,
    },
    "dynamic_full": {
        "kind": "dynamic",
        "similarity": "full",
        "granularity": "location",
        "hidden": 8,
    },
}


def tiny_config(conv: dict, **train: object) -> dict:
    """A resolved config for the tiny network on the ``glyphs`` fixture's data."""
    file_config = {
        "data": {
            "dataset": "synthetic",
            "augment": False,
            "options": {
                "num_classes": 4,
                "train_per_class": 24,
                "test_per_class": 8,
                "image_size": 16,
                "channels": 3,
                "seed": 0,
            },
        },
        "model": {"backbone": "cnn9", "backbone_options": TINY_BACKBONE, "conv": conv},
        "train": {
            "iterations": 30,
            "batch_size": 32,
            "lr": 0.05,
            "lr_milestones": [],
            "log_every": 5,
            "eval_every": 0,
            "checkpoint_every": 0,
            "device": "cpu",
            **train,
        },
        "eval": {"speed_rounds": 1, "speed_repeats": 1, "speed_batch_size": 8},
    }
    return resolve_config(file_config, [], SUPERVISED_DEFAULTS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the 2-core test machine is shared, and two threads contending with
    other jobs make these tiny convolutions many times slower."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def glyphs():
    """The data of :func:`tiny_config`, generated once for the module."""
    options = tiny_config({"kind": "plain"})["data"]["options"]
    return load_synthetic(**options)


# ----------------------------------------------------------------------------- CIFAR pickles
def _cifar_pickle(path: Path, content: dict) -> None:
    """Write ``content`` as the originals are: bytes keys, protocol 2 (py2-era files)."""
    encoded = {key.encode(): value for key, value in content.items()}
    path.write_bytes(pickle.dumps(encoded, protocol=2))


def _fake_cifar10(root: Path, per_file: int = 3, rng_seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-10 layout with ``per_file`` images per batch file; returns the raw rows."""
    rng = np.random.default_rng(rng_seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"class{i}".encode() for i in range(10)]
    _cifar_pickle(root / "batches.meta", {"label_names": names, "num_vis": 3072})
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file).tolist()
        _cifar_pickle(root / name, {"data": data, "labels": labels, "batch_label": name.encode()})
        rows[name] = (data, labels)
    return rows


def _pixel(row: np.ndarray, y: int, x: int, c: int) -> int:
    """The documented CIFAR row layout: 1024 red, then green, then blue values, row-major."""
    return int(row[c * 1024 + y * 32 + x])


def test_cifar10_reader_matches_the_documented_row_layout(tmp_path):
    rows = _fake_cifar10(tmp_path / "cifar-10-batches-py")
    # The parent folder works too (the archive's folder inside it).
    images, labels, names = read_cifar_split(tmp_path, "cifar10", "train", strict=False)
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
    assert names == [f"class{i}" for i in range(10)]
    expected_labels = [label for i in range(1, 6) for label in rows[f"data_batch_{i}"][1]]
    assert labels.tolist() == expected_labels
    for index, (y, x, c) in enumerate([(0, 0, 0), (31, 31, 2), (5, 17, 1), (20, 3, 2)]):
        file_name = f"data_batch_{index % 5 + 1}"
        row = rows[file_name][0][1]
        assert images[(index % 5) * 3 + 1, y, x, c] == _pixel(row, y, x, c)
    test_images, test_labels, _ = read_cifar_split(tmp_path, "cifar10", "test", strict=False)
    assert test_images.shape == (3, 32, 32, 3) and test_labels.tolist() == rows["test_batch"][1]


def test_cifar100_reader_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    _cifar_pickle(
        tmp_path / "meta",
        {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"c{i}" for i in range(20)],
        },
    )
    for split in ("train", "test"):
        _cifar_pickle(
            tmp_path / split,
            {"data": data, "fine_labels": [99, 0, 5, 7], "coarse_labels": [1, 2, 3, 4]},
        )
    data_set = load_data("cifar100", str(tmp_path), strict=False)
    assert data_set.num_classes == 100 and data_set.image_shape == (3, 32, 32)
    assert data_set.train_labels.tolist() == [99, 0, 5, 7]
    assert data_set.train_images[2, 7, 9, 1] == _pixel(data[2], 7, 9, 1)
    expected_mean = data.reshape(4, 3, 1024).transpose(1, 0, 2).reshape(3, -1).mean(1) / 255
    np.testing.assert_allclose(data_set.mean, expected_mean, rtol=1e-12)


def test_cifar_strict_sizes(tmp_path):
    _fake_cifar10(tmp_path)
    with pytest.raises(ValueError, match=r"has 15 images, expected 50000"):
        read_cifar_split(tmp_path, "cifar10", "train")


def test_cifar_missing_file_is_named(tmp_path):
    _fake_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        read_cifar_split(tmp_path, "cifar10", "train", strict=False)


def test_cifar_missing_root_and_missing_root_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_data("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data.root"):
        load_data("cifar100", None)


def test_cifar_wrong_keys_are_named(tmp_path):
    _fake_cifar10(tmp_path)
    # CIFAR-100 files read as CIFAR-10: the label key differs.
    _cifar_pickle(
        tmp_path / "test_batch", {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]}
    )
    with pytest.raises(ValueError, match=r"no key 'labels'.*fine_labels"):
        read_cifar_split(tmp_path, "cifar10", "test", strict=False)
    _cifar_pickle(tmp_path / "batches.meta", {"names": [b"a"] * 10})
    with pytest.raises(ValueError, match=r"batches.meta.*no key 'label_names'"):
        read_cifar_split(tmp_path, "cifar10", "test", strict=False)


def test_cifar_wrong_shapes_and_labels(tmp_path):
    _fake_cifar10(tmp_path)
    _cifar_pickle(
        tmp_path / "test_batch", {"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}
    )
    with pytest.raises(ValueError, match=r"test_batch.*\(N, 3072\).*\(2, 1024\)"):
        read_cifar_split(tmp_path, "cifar10", "test", strict=False)
    _cifar_pickle(
        tmp_path / "test_batch", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}
    )
    with pytest.raises(ValueError, match=r"labels must lie in 0..9"):
        read_cifar_split(tmp_path, "cifar10", "test", strict=False)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch.*not a readable CIFAR python pickle"):
        read_cifar_split(tmp_path, "cifar10", "test", strict=False)


def test_unknown_dataset_options_are_named():
    with pytest.raises(ValueError, match=r"\['shots'\].*allowed"):
        load_data("synthetic", shots=3)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "path",
    sorted(p.name for p in (REPO / "configs").glob("cifar*.yaml")) + ["supervised_quickstart.yaml"],
)
def test_shipped_configs_load(path):
    config = load_supervised_config(REPO / "configs" / path)
    assert config["model"]["conv"]["kind"] in ("plain", "static", "dynamic")
    if path.startswith("cifar"):  # the authors' recipe, as the method doc states it
        train = config["train"]
        assert (train["iterations"], train["batch_size"], train["lr"]) == (42500, 128, 0.1)
        assert train["lr_milestones"] == [20000, 30000, 37500]
        assert train["weight_decay"] == 5e-4
        # The authors' l2_regularizer(5e-3) = 2.5e-3 * ||M||^2, on a static full M only.
        conv = config["model"]["conv"]
        full_static = conv["kind"] == "static" and conv["similarity"] == "full"
        assert train["similarity_penalty"] == (2.5e-3 if full_static else 0.0)
        assert train["penalty_target"] == "zero"
        assert (train["momentum"], train["label_smoothing"]) == (0.9, 0.01)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train.iterationz.*allowed keys"):
        resolve_config({"train": {"iterationz": 5}}, [], SUPERVISED_DEFAULTS)
    with pytest.raises(ConfigError, match=r"model.conv.*kind"):
        resolve_config({"model": {"conv": {"kind": "fancy"}}}, [], SUPERVISED_DEFAULTS)
    with pytest.raises(ConfigError, match=r"data.dataset.*cifar100"):
        resolve_config({}, ["data.dataset=imagenet"], SUPERVISED_DEFAULTS)
    with pytest.raises(ConfigError, match=r"train.lr_milestones"):
        resolve_config({}, ["train.lr_milestones=[-5]"], SUPERVISED_DEFAULTS)


# ----------------------------------------------------------------------------- model, schedule
def test_models_and_parameter_counts():
    static = {
        "model": {
            "backbone": "cnn9",
            "backbone_options": {},
            "head": "backbone",
            "conv": VARIANTS["static_shared"],
        }
    }
    model = build_model(static["model"], image_shape=(3, 32, 32), num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    plain = build_model(
        {**static["model"], "conv": {"kind": "plain"}}, image_shape=(3, 32, 32), num_classes=7
    )
    # Nine stage convolutions, each with one shared 9x9 block: 9 * 81 extra parameters.
    assert count_parameters(model) - count_parameters(plain) == 9 * 81
    assert sum(isinstance(m, NSLConv2d) for m in model.modules()) == 9
    groups = parameter_groups(model, 5e-4)
    similarity = {id(m.M) for m in model.modules() if isinstance(m, NSLConv2d)}
    assert {id(p) for p in groups[1]["params"]} == similarity and groups[1]["weight_decay"] == 0
    assert not similarity & {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 5e-4
    linear = build_model(
        {
            "backbone": "resnet12",
            "backbone_options": {"widths": [4, 4, 4, 4]},
            "conv": {"kind": "plain"},
            "head": "linear",
        },
        image_shape=(3, 16, 16),
        num_classes=5,
    )
    assert linear(torch.zeros(3, 3, 16, 16)).shape == (3, 5)


def test_train_batches_are_epoch_permutations_and_reproducible():
    labels = np.arange(10)
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(2, axis=1)
    batches = TrainBatches(images, labels, batch_size=3, seed=4)
    assert batches.batches_per_epoch == 3
    epoch = torch.cat([batches.batch(i)[1] for i in range(3)])
    assert len(set(epoch.tolist())) == 9  # no row twice within an epoch (one dropped)
    again = TrainBatches(images, labels, batch_size=3, seed=4)
    for index in (5, 1, 4):  # any order: batch i depends on (seed, i) only
        assert torch.equal(again.batch(index)[1], batches.batch(index)[1])
    assert not torch.equal(TrainBatches(images, labels, 3, seed=5).batch(0)[1], batches.batch(0)[1])
    with pytest.raises(ValueError, match="train.batch_size"):
        TrainBatches(images, labels, batch_size=11, seed=0)


def test_compare_throughput_reports_ratios():
    conv = torch.nn.Conv2d(3, 4, 3)
    speeds = compare_throughput(
        {"a": conv, "b": conv}, (3, 8, 8), batch_size=2, rounds=3, repeats=1
    )
    assert speeds["a"]["time_ratio"] == 1.0
    assert speeds["a"]["images_per_s"] > 0 and speeds["b"]["time_ratio"] > 0
    with pytest.raises(ValueError, match="reference"):
        compare_throughput({"a": conv}, (3, 8, 8), reference="c")


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_decreases_the_loss(variant, glyphs):
    trainer = SupervisedTrainer(tiny_config(VARIANTS[variant]), data=glyphs)
    trainer.build()
    losses = [trainer.step_once(step)["loss"] for step in range(15)]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.5 * first, (variant, losses)


@pytest.mark.slow
def test_folded_export_predicts_identically_without_the_package(tmp_path, glyphs):
    config = tiny_config(VARIANTS["static_disjoint"], iterations=5)
    results = run_supervised(config, out_dir=tmp_path / "run", progress=False, data=glyphs)
    # results.json: error, parameter counts, images/s for the model and its folded copy.
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_error"] == results["test_error"] == results["folded_test_error"]
    plain = build_model(
        {**config["model"], "conv": {"kind": "plain"}}, image_shape=(3, 16, 16), num_classes=4
    )
    assert saved["folded_parameters"] == count_parameters(plain)
    assert saved["nsl_parameters"] == saved["parameters"] - count_parameters(plain) > 0
    assert saved["inference_images_per_s"] > 0 and saved["folded_inference_images_per_s"] > 0

    out = export_model(tmp_path / "run" / "last.pt", tmp_path / "model.pt2", fold=True)
    model, config_back = load_trained_model(tmp_path / "run" / "last.pt")
    images = torch.as_tensor(glyphs.test_images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(config_back["data"]["mean"]).view(1, 3, 1, 1)
    inv_std = (1 / torch.tensor(config_back["data"]["std"], dtype=torch.float64)).float()
    with torch.no_grad():
        reference = model((images - mean) * inv_std.view(1, 3, 1, 1))
    exported, meta = load_exported(out)
    assert meta["folded"] and meta["num_classes"] == 4
    assert not any("NSL" in type(m).__name__ for m in exported.modules())
    with torch.no_grad():  # the batch dimension is dynamic: a batch of one works too
        torch.testing.assert_close(exported(images[:1]), reference[:1], rtol=1e-4, atol=1e-4)

    # Load in a fresh interpreter where fewshot_nsl and episodes cannot be imported.
    np.save(tmp_path / "images.npy", images.numpy())
    script = (
        "import sys; sys.modules['fewshot_nsl'] = None; sys.modules['episodes'] = None\n"
        "import numpy as np, torch\n"
        f"model = torch.export.load({str(out)!r}).module()\n"
        f"images = torch.from_numpy(np.load({str(tmp_path / 'images.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'logits.npy')!r}, model(images).numpy())\n"
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=environment)
    logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(1), reference.argmax(1))
    error = (logits.argmax(1) != torch.as_tensor(glyphs.test_labels)).float().mean().item()
    assert error == pytest.approx(results["test_error"], abs=0)

    # Without --fold the NSL layers are exported as they are (same predictions, NSL speed).
    unfolded, meta = load_exported(
        export_model(tmp_path / "run" / "last.pt", tmp_path / "nsl.pt2", fold=False)
    )
    assert not meta["folded"]
    with torch.no_grad():
        torch.testing.assert_close(unfolded(images), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_trains_and_refuses_to_fold_a_dynamic_network(tmp_path, capsys):
    from fewshot_nsl.cli import main

    config_path = tmp_path / "dyn.yaml"
    config_path.write_text(
        "data: {dataset: synthetic, augment: false, options: {num_classes: 3, "
        "train_per_class: 10, test_per_class: 4, image_size: 16}}\n"
        f"model: {{backbone: cnn9, backbone_options: {json.dumps(TINY_BACKBONE)}, "
        "conv: {kind: dynamic, similarity: diagonal, granularity: sample, hidden: 4}}\n"
    )
    status = main(
        [
            "train-supervised",
            "--config",
            str(config_path),
            "--out",
            str(tmp_path / "run"),
            "--quiet",
            "train.iterations=2",
            "train.batch_size=8",
            "train.device=cpu",
            "eval.speed_rounds=1",
            "eval.speed_repeats=1",
            "eval.speed_batch_size=4",
        ]
    )
    assert status == 0 and "test error" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["iterations"] == 2
    status = main(
        [
            "export",
            "--checkpoint",
            str(tmp_path / "run" / "last.pt"),
            "--out",
            str(tmp_path / "m.pt2"),
            "--fold",
        ]
    )
    assert status == 2
    assert "dynamic NSL layers" in capsys.readouterr().err and not (tmp_path / "m.pt2").exists()
    status = main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", "x.pt2"])
    assert status == 2 and "does not exist" in capsys.readouterr().err
    status = main(["train-supervised", "--config", str(config_path), "train.iteratons=3"])
    assert status == 2 and "train.iteratons" in capsys.readouterr().err

"""Runner: statistics, schedules, exact resume, the distributed seams (checkpoint and RNG
unit tests: tests/test_checkpoint.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewshot_nsl.checkpoint import (
    CheckpointMismatch,
    load_checkpoint,
)
from fewshot_nsl.config import ConfigError
from fewshot_nsl.evaluation import evaluate_episodes
from fewshot_nsl.evaluation import test_source as frozen_test_source
from fewshot_nsl.fewshot_config import resolve_fewshot_config
from fewshot_nsl.runlog import RunDir
from fewshot_nsl.runner import DatasetNotFound, MetaTrainer, load_split

#: A run small enough for the unit tests: 16×16 glyphs, Conv-4 with 4 filters, 1 inner step.
TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {
        "dataset": "synthetic",
        "options": {
            "image_size": 16,
            "images_per_class": 8,
            "num_classes": {"train": 10, "val": 6, "test": 6},
        },
    },
    "episodes": {
        "way": 3,
        "shot": 1,
        "query": 2,
        "tasks_per_batch": 2,
        "val_episodes": 4,
        "test_episodes": 5,
        "test_shots": [1, 5],
        "test_query": 2,
    },
    "model": {"backbone_options": {"filters": 4, "image_size": 16}},
    "learner": {"name": "maml", "inner_steps": 1, "inner_steps_eval": 2, "inner_lr": 0.1},
    "train": {
        "steps": 6,
        "val_every": 3,
        "checkpoint_every": 3,
        "log_every": 2,
        "lr": 0.01,
        "device": "cpu",
    },
}


def tiny_config(*overrides: str, **sections: dict[str, Any]) -> dict[str, Any]:
    payload = {
        key: dict(value) if isinstance(value, dict) else value for key, value in TINY.items()
    }
    for key, value in sections.items():
        payload[key] = {**payload.get(key, {}), **value}
    return resolve_fewshot_config(payload, list(overrides))


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """These models are tiny: one intra-op thread is fastest, and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- data errors ---------------------------------------------------------------------------


def test_missing_dataset_says_how_to_prepare_it(tmp_path: Path) -> None:
    config = tiny_config(
        data={"dataset": "mini-imagenet", "root": str(tmp_path / "nowhere"), "options": {}}
    )
    with pytest.raises(DatasetNotFound, match=r"fewshot-nsl prepare-data --dataset mini-imagenet"):
        load_split(config, "train")
    config = tiny_config(data={"dataset": "mini-imagenet", "root": None, "options": {}})
    with pytest.raises(DatasetNotFound, match=r"needs data\.root.*prepare-data"):
        load_split(config, "train")


# -- training ------------------------------------------------------------------------------


def _parameters(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


DROPOUT_BACKBONE = """
import torch
from torch import nn


class DropoutNet(nn.Module):
    def __init__(self, conv_factory, in_channels, filters=4):
        super().__init__()
        self.conv = conv_factory(in_channels, filters, 3, padding=1)
        self.drop = nn.Dropout(0.5)  # draws from the global torch RNG in every training pass
        self.out_features = filters

    def forward(self, x):
        return self.drop(torch.relu(self.conv(x))).mean(dim=(2, 3))


def build(*, conv_factory, in_channels, **options):
    return DropoutNet(conv_factory, in_channels, **options)
"""


def _interrupt_at(trainer: MetaTrainer, step: int) -> None:
    """Make ``trainer`` die (like a kill) when it starts outer step ``step``."""
    original = trainer.step_once

    def step_once(current: int) -> dict[str, float]:
        if current == step:
            raise KeyboardInterrupt
        return original(current)

    trainer.step_once = step_once  # type: ignore[method-assign]


@pytest.mark.slow
@pytest.mark.parametrize("restore_rng", [True, False])
def test_killed_run_resumes_bit_identically_with_dropout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_rng: bool
) -> None:
    """A dropout backbone (global RNG) killed mid-run at step 4 and resumed from its step-3
    checkpoint ends bit-identical to an uninterrupted run — and, as a control that the test can
    fail, does not when the RNG state is not restored."""
    (tmp_path / "dropout_backbone.py").write_text(DROPOUT_BACKBONE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny_config(
        "episodes.test_shots=[1]",
        "episodes.test_episodes=1",
        "episodes.val_episodes=2",
        model={"backbone": "dropout_backbone:build", "backbone_options": {"filters": 4}},
    )
    MetaTrainer(config, tmp_path / "full", quiet=True).fit()

    killed = MetaTrainer(config, tmp_path / "killed", quiet=True)
    _interrupt_at(killed, 4)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 3
    torch.manual_seed(4321)  # the new process's RNGs are elsewhere
    if not restore_rng:
        monkeypatch.setattr("fewshot_nsl.engine.restore_rng_state", lambda state: None)
    MetaTrainer(config, tmp_path / "killed", quiet=True).fit(resume=True)

    a = _parameters(tmp_path / "full" / "last.pt")
    b = _parameters(tmp_path / "killed" / "last.pt")
    identical = all(torch.equal(a[name], b[name]) for name in a)
    assert identical == restore_rng
    if restore_rng:
        steps = [r["step"] for r in RunDir(tmp_path / "killed").metrics() if r["event"] == "train"]
        assert steps == [2, 4, 6]  # step 4 of the killed run was dropped, then re-logged


@pytest.mark.slow
def test_fit_writes_the_run_directory(tmp_path: Path) -> None:
    results = MetaTrainer(tiny_config(), tmp_path, quiet=True).fit()
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.yaml",
        "meta.json",
        "metrics.jsonl",
        "best.pt",
        "last.pt",
        "results.json",
    } <= names
    run = RunDir(tmp_path)
    meta = run.read_json("meta.json")
    assert set(meta["data"]) == {"train", "val", "test"} and "torch" in meta["versions"]
    assert "git_commit" in meta
    stored = run.read_json("results.json")
    assert stored["test"].keys() == {"1", "5"}
    for shot in ("1", "5"):
        test = stored["test"][shot]
        assert len(test["accuracies"]) == test["episodes"] == 5
        assert test["mean"] == pytest.approx(np.mean(test["accuracies"]), abs=1e-6)
    assert stored["best"]["step"] in (3, 6)
    assert results["tested"] == "best.pt"
    events = [r["event"] for r in run.metrics()]
    assert events.count("val") == 2 and events.count("test") == 2
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == stored["best"]["step"]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path) -> None:
    MetaTrainer(tiny_config("train.steps=1"), tmp_path, quiet=True).fit()
    other = tiny_config("train.steps=2", "model.backbone_options.filters=8")
    with pytest.raises(
        CheckpointMismatch,
        match=r"model\.backbone_options\.filters: "
        r"checkpoint 4, config 8",
    ):
        MetaTrainer(other, tmp_path, quiet=True).fit(resume=True)


def test_meta_gradient_is_the_mean_of_the_task_gradients(tmp_path: Path) -> None:
    """The accumulation the all-reduce seam relies on: Σ_i ∇loss_i / T = ∇ mean loss."""
    trainer = MetaTrainer(tiny_config(), tmp_path, quiet=True)
    trainer.setup()
    learner = trainer.learner
    expected = {name: torch.zeros_like(p) for name, p in learner.named_parameters()}
    tasks = trainer.batcher.batch(0)
    assert len(tasks) == 2
    for episode in tasks:
        learner.zero_grad()
        loss, _ = learner.meta_loss(trainer.batcher.sampler.to_device(episode, trainer.device))
        loss.backward()
        for name, p in learner.named_parameters():
            if p.grad is not None:
                expected[name] += p.grad / len(tasks)
    captured = {}
    trainer.reduce_gradients = lambda: captured.update(  # type: ignore[method-assign]
        {name: p.grad.clone() for name, p in learner.named_parameters() if p.grad is not None}
    )
    trainer.meta_step(0)
    assert captured.keys() and all(
        torch.allclose(captured[name], expected[name], atol=1e-6) for name in captured
    )


def test_uint8_episodes_train_and_evaluate_as_the_float_path_bit_for_bit(tmp_path: Path) -> None:
    """Training and evaluation take uint8 episodes from the samplers and convert them on the
    device: on CPU the losses, gradients and accuracies equal those of float episodes
    normalised on the host, exactly. With augmentation the train sampler stays float."""
    from episodes import EpisodeSampler, TaskBatcher

    trainer = MetaTrainer(tiny_config(), tmp_path, quiet=True)
    trainer.setup()
    uint8_sampler, val_sampler = trainer.batcher.sampler, trainer.val_sampler
    assert uint8_sampler.output == val_sampler.output == "uint8"
    assert not uint8_sampler.pin_memory  # pinned only for a CUDA device
    assert trainer.batcher.batch(0)[0].is_uint8

    def step_and_gradients() -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        trainer.learner.zero_grad()
        metrics = trainer.gradient_step(0)
        grads = {
            n: p.grad.clone() for n, p in trainer.learner.named_parameters() if p.grad is not None
        }
        return metrics, grads

    uint8_metrics, uint8_grads = step_and_gradients()
    float_sampler = EpisodeSampler(
        uint8_sampler.split,
        uint8_sampler.way,
        uint8_sampler.shot,
        uint8_sampler.query,
        seed=uint8_sampler.seed,
    )
    trainer.batcher = TaskBatcher(float_sampler, trainer.batcher.tasks_per_batch)
    float_metrics, float_grads = step_and_gradients()
    assert uint8_metrics == float_metrics and uint8_grads.keys() == float_grads.keys()
    assert all(torch.equal(uint8_grads[name], float_grads[name]) for name in uint8_grads)

    float_val = EpisodeSampler(
        val_sampler.split,
        val_sampler.way,
        val_sampler.shot,
        val_sampler.query,
        seed=val_sampler.seed,
        num_episodes=len(val_sampler),
    )
    indices = range(len(val_sampler))
    assert np.array_equal(
        evaluate_episodes(trainer.learner, val_sampler, indices, trainer.device),
        evaluate_episodes(trainer.learner, float_val, indices, trainer.device),
    )
    source, _, _ = frozen_test_source(
        trainer.config, trainer.split("test"), 1, 3, device=trainer.device
    )
    assert source.output == "uint8"

    augmented = MetaTrainer(tiny_config("data.augment=true"), tmp_path / "aug", quiet=True)
    augmented.setup()
    assert augmented.batcher.sampler.output == "float"
    assert augmented.val_sampler.output == "uint8"


def test_evaluation_shards_by_episode_index(tmp_path: Path) -> None:
    """Scoring a subset of indices gives exactly those entries of the full evaluation."""
    from episodes import EpisodeSampler

    trainer = MetaTrainer(tiny_config(), tmp_path, quiet=True)
    trainer.setup()
    sampler = EpisodeSampler(trainer.split("test"), 3, 1, 2, seed=0, num_episodes=6)
    full = evaluate_episodes(trainer.learner, sampler, range(6), trainer.device)
    odd = evaluate_episodes(trainer.learner, sampler, [5, 1, 3], trainer.device)
    assert np.array_equal(odd, full[[5, 1, 3]])
    assert trainer.learner.training  # mode restored
    assert set(np.unique(full)) <= {i / 6 for i in range(7)}  # 6 queries per episode


def test_bad_learner_options_surface_as_config_errors(tmp_path: Path) -> None:
    config = tiny_config(learner={"name": "static_nsn"})  # conv.kind is plain in this config
    config["model"]["conv"] = {"kind": "plain"}
    with pytest.raises(ConfigError, match=r"learner/model: .*static"):
        MetaTrainer(config, tmp_path, quiet=True).setup()


def test_progress_bar_path_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a terminal, progress goes through tqdm (bar with loss/acc, val lines above it)."""
    monkeypatch.setattr("fewshot_nsl.engine._progress_enabled", lambda quiet: not quiet)
    config = tiny_config("train.steps=3", "episodes.test_shots=[1]", "episodes.test_episodes=2")
    MetaTrainer(config, tmp_path, quiet=False).fit()
    err = capsys.readouterr().err
    assert "train tiny" in err and "loss=" in err and "val acc" in err


def test_a_test_manifest_that_does_not_fit_fails_before_training(tmp_path: Path) -> None:
    from episodes import EpisodeSampler, save_manifest

    config = tiny_config(episodes={"manifest": str(tmp_path / "m.json")})  # shots 1 and 5
    trainer = MetaTrainer(config, tmp_path / "run", quiet=True)
    save_manifest(tmp_path / "m.json", EpisodeSampler(trainer.split("test"), 3, 1, 2, seed=0), 2)
    with pytest.raises(ValueError, match="shot"):
        trainer.setup()
    assert trainer.step == 0 and not (tmp_path / "run" / "last.pt").exists()

"""The reference implementations' training and test protocols, as engine options.

* cbfinn/maml ``maml.py``: the meta-gradient is clipped element by element,
  ``tf.clip_by_value(grad, -10, 10)`` on Mini-ImageNet (``train.grad_clip_mode: value``).
* jakesnell/prototypical-networks ``scripts/train/few_shot/run_train.py`` / ``train.py``:
  trained with more ways than tested (``data.test_way`` 5, ``data.test_query`` 15 for the
  validation episodes); the model with the lowest validation loss is kept, and training stops
  once ``wait > patience`` validations brought no improvement (``episodes.test_way``,
  ``episodes.val_query``, ``train.select_by: val_loss``, ``train.patience``).
* Every stored and printed result says the way and the queries per class of its test episodes;
  ``eval --query/--way`` scores the other protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewshot_nsl.checkpoint import load_checkpoint
from fewshot_nsl.cli import main
from fewshot_nsl.config import ConfigError
from fewshot_nsl.engine import Evaluation
from fewshot_nsl.evaluation import evaluate_episodes
from fewshot_nsl.fewshot_config import resolve_fewshot_config
from fewshot_nsl.runner import MetaTrainer
from fewshot_nsl.stats import mean_ci
from tests.test_runner import TINY, tiny_config

TINY_PROTONET_YAML = (
    "name: tiny\n"
    "data: {dataset: synthetic, options: {image_size: 16, images_per_class: 8,"
    " num_classes: {train: 10, val: 6, test: 6}}}\n"
    "episodes: {way: 3, shot: 1, query: 2, tasks_per_batch: 1, val_episodes: 2,"
    " test_episodes: 3, test_shots: [1], test_query: 2}\n"
    "model: {backbone_options: {filters: 4, image_size: 16}}\n"
    "learner: {name: protonet}\n"
    "train: {steps: 1, val_every: 1, checkpoint_every: 1, device: cpu, threads: 1}\n"
)


def protonet_config(*overrides: str) -> dict[str, Any]:
    """The runner tests' tiny run, with ProtoNet (no way-sized head) as the learner."""
    return resolve_fewshot_config({**TINY, "learner": {"name": "protonet"}}, list(overrides))


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- meta-gradient clipping -------------------------------------------------------------------


def meta_gradients(tmp_path: Path, *overrides: str) -> list[torch.Tensor]:
    trainer = MetaTrainer(tiny_config(*overrides), tmp_path, quiet=True)
    trainer.setup()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.gradient_step(0)
    return [p.grad.clone() for p in trainer.learner.parameters() if p.grad is not None]


def test_grad_clip_value_clamps_every_element(tmp_path: Path) -> None:
    free = meta_gradients(tmp_path / "free")
    limit = 0.5 * float(torch.cat([g.abs().flatten() for g in free]).median())
    clipped = meta_gradients(
        tmp_path / "value", f"train.grad_clip={limit}", "train.grad_clip_mode=value"
    )
    for raw, clip in zip(free, clipped):
        torch.testing.assert_close(clip, raw.clamp(-limit, limit), rtol=0, atol=0)
    assert any(bool((raw.abs() > limit).any()) for raw in free)  # the clamp did bite
    by_norm = meta_gradients(tmp_path / "norm", f"train.grad_clip={limit}")
    total = torch.cat([g.flatten() for g in free]).norm()
    for raw, clip in zip(free, by_norm):  # the default mode: the global norm, one factor
        torch.testing.assert_close(clip, raw * (limit / (total + 1e-6)), rtol=1e-5, atol=1e-12)


# -- test way, validation queries ---------------------------------------------------------------


def test_test_way_sets_the_validation_and_test_episodes(tmp_path: Path) -> None:
    config = protonet_config(
        "episodes.way=4", "episodes.test_way=3", "episodes.val_query=3", "episodes.test_query=2"
    )
    trainer = MetaTrainer(config, tmp_path, quiet=True)
    results = trainer.fit()
    assert trainer.batcher.batch(0)[0].way == 4  # training stays at the training way
    val = trainer.val_sampler.episode(0)
    assert (val.way, len(val.query_y)) == (3, 3 * 3)
    assert results["way"] == 4 and results["test_way"] == 3
    for test in results["test"].values():
        assert (test["way"], test["query"]) == (3, 2)


def test_test_way_defaults_to_the_training_way(tmp_path: Path) -> None:
    trainer = MetaTrainer(tiny_config(), tmp_path, quiet=True)
    trainer.setup()
    val = trainer.val_sampler.episode(0)
    assert (val.way, len(val.query_y)) == (3, 3 * 2)  # way 3, query 2 of the tiny config


def test_test_way_is_refused_for_a_way_sized_head(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="episodes.test_way: 2 differs.*3-way head"):
        MetaTrainer(tiny_config("episodes.test_way=2"), tmp_path, quiet=True).setup()


# -- validation loss, model selection, early stopping -------------------------------------------


def test_validation_loss_is_the_mean_query_cross_entropy(tmp_path: Path) -> None:
    trainer = MetaTrainer(protonet_config(), tmp_path, quiet=True)
    trainer.setup()
    learner, sampler = trainer.learner, trainer.val_sampler
    losses = np.empty(len(sampler))
    evaluate_episodes(learner, sampler, range(len(sampler)), trainer.device, losses=losses)
    learner.eval()
    with torch.no_grad():
        for index, loss in enumerate(losses):  # by hand: -mean log softmax of the true class
            episode = sampler.episode(index)
            support = learner.backbone(episode.support_x)
            prototypes = torch.stack([support[episode.support_y == n].mean(0) for n in range(3)])
            query = learner.backbone(episode.query_x)
            logits = -((query[:, None] - prototypes[None]) ** 2).sum(-1)
            expected = -logits.log_softmax(1)[range(len(episode.query_y)), episode.query_y].mean()
            assert loss == pytest.approx(float(expected), rel=1e-5)
    assert trainer.validate()[1] == pytest.approx(float(losses.mean()), rel=1e-12)


def scripted_evaluations(
    tmp_path: Path, history: list[tuple[float, float]], *overrides: str
) -> list[Evaluation]:
    """The trainer's evaluations when validation returns ``history`` (accuracy, loss) in turn,
    every ``val_every`` = 1 step; the engine's bookkeeping of ``best`` included."""
    trainer = MetaTrainer(tiny_config("train.val_every=1", *overrides), tmp_path, quiet=True)
    scores = iter(history)
    trainer.validate = lambda: (lambda a, l: (mean_ci(np.full(4, a)), l))(*next(scores))
    evaluations = []
    for step in range(1, len(history) + 1):
        evaluation = trainer.evaluate(step)
        trainer.best = evaluation.best or trainer.best
        evaluations.append(evaluation)
    return evaluations


HISTORY = [(0.5, 1.0), (0.6, 1.2), (0.4, 0.9), (0.7, 0.95), (0.8, 1.1), (0.9, 1.3)]


def test_select_by_val_loss_keeps_the_lowest_loss(tmp_path: Path) -> None:
    by_loss = scripted_evaluations(tmp_path, HISTORY, "train.select_by=val_loss")
    assert [e.best is not None for e in by_loss] == [True, False, True, False, False, False]
    by_accuracy = scripted_evaluations(tmp_path, HISTORY)
    assert [e.best is not None for e in by_accuracy] == [True, True, False, True, True, True]
    assert not any(e.stop for e in by_loss + by_accuracy)  # no patience: never stops


@pytest.mark.parametrize("patience, stops_at", [(0, 2), (1, 5), (2, 6), (3, None)])
def test_patience_stops_once_wait_exceeds_it(tmp_path: Path, patience: int, stops_at) -> None:
    """Losses 1.0, 1.2, 0.9, 0.95, 1.1, 1.3: the reference's ``wait`` (validations since the
    lowest loss) is 0, 1, 0, 1, 2, 3 and it stops at the first ``wait > patience``."""
    evaluations = scripted_evaluations(
        tmp_path, HISTORY, "train.select_by=val_loss", f"train.patience={patience}"
    )
    stops = [index + 1 for index, e in enumerate(evaluations) if e.stop]
    assert (stops[0] if stops else None) == stops_at


def test_early_stopping_ends_training_and_tests_the_best(tmp_path: Path) -> None:
    config = protonet_config(
        "train.steps=20",
        "train.val_every=1",
        "train.select_by=val_loss",
        "train.patience=0",  # stop at the first validation without a lower loss
    )
    results = MetaTrainer(config, tmp_path, quiet=True).fit()
    assert results["stopped_early"] and results["steps"] < 20
    assert results["steps"] == results["best"]["step"] + 1 and results["tested"] == "best.pt"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "val"]
    assert len(losses) == results["steps"]
    assert all(later < earlier for earlier, later in zip(losses[:-2], losses[1:-1]))
    assert losses[-1] >= losses[-2] and results["best"]["loss"] == losses[-2]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == results["steps"]


def test_resume_of_an_early_stopped_run_reuses_its_results(tmp_path: Path, capsys) -> None:
    """`train --resume` of a run that stopped early does not train on: it is finished."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        TINY_PROTONET_YAML.replace("steps: 1,", "steps: 30, patience: 0, select_by: val_loss,")
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_early"] and results["steps"] < 30
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--resume", str(out), "--quiet"]) == 0
    assert "already finished" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["steps"] == results["steps"]


# -- results say their protocol; eval runs either ----------------------------------------------


def test_eval_runs_the_other_protocol_and_says_it(tmp_path: Path, capsys) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_PROTONET_YAML)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("method"))
    assert header.split()[:5] == ["method", "backbone", "way", "shot", "query"]
    stored = json.loads((out / "results.json").read_text())["test"]["1"]
    assert (stored["way"], stored["query"]) == (3, 2)

    report = tmp_path / "e.json"
    argv = ["eval", "--checkpoint", str(out / "best.pt"), "--json", str(report), "--quiet"]
    assert main([*argv, "--query", "4", "--way", "2"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert header.split()[:5] == ["method", "backbone", "way", "shot", "query"]
    assert row.split()[2:5] == ["2", "1", "4"]
    test = json.loads(report.read_text())["models"]["tiny"]["test"]["1"]
    assert (test["way"], test["query"]) == (2, 4)


def test_eval_refuses_another_way_for_a_way_sized_head(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    MetaTrainer(tiny_config("train.steps=1"), out, quiet=True).fit()
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--way", "2"]) == 2
    assert "--way 2" in capsys.readouterr().err


# -- pixels as the reference scales them --------------------------------------------------------


@pytest.mark.parametrize(
    "mode, scale, bias", [("unit", 1 / 255, 0.0), ("unit_inverted", -1 / 255, 1)]
)
def test_augmented_training_episodes_keep_the_pixel_scaling(mode: str, scale, bias) -> None:
    """With ``data.augment`` the training transform ends with the split's own scaling (not the
    mean/std one): ``x/255`` (cbfinn/maml Mini-ImageNet), ``1 - x/255`` (its Omniglot)."""
    from fewshot_nsl.runner import load_split, train_transform

    config = tiny_config("data.augment=true", f"data.options.normalize={mode}")
    split = load_split(config, "train")
    transform = train_transform(config, split)
    white = torch.full((1, *split.image_shape), 1.0)  # [0, 1] float, as the sampler hands over
    pad = split.image_shape[1] // 8  # the crop's zero border lies within `pad` of the edge
    inner = transform(white, torch.Generator().manual_seed(0))[..., pad:-pad, pad:-pad]
    torch.testing.assert_close(inner, torch.full_like(inner, 255 * scale + bias))

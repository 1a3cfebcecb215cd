"""The training engine (fewshot_nsl.engine): schedules, resume checks, and the one
resume-is-identical guarantee, for every task (episodic meta-learning, supervised)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewshot_nsl.checkpoint import CheckpointMismatch, load_checkpoint
from fewshot_nsl.engine import Engine, LRFactor, check_resumable
from fewshot_nsl.runlog import RunDir
from fewshot_nsl.runner import MetaTrainer
from fewshot_nsl.supervised import SupervisedTrainer, load_synthetic
from tests.test_runner import tiny_config as episodic_config
from tests.test_supervised import VARIANTS
from tests.test_supervised import tiny_config as supervised_config


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models: one intra-op thread is fastest, and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- schedules -------------------------------------------------------------------------------


def test_lr_factors() -> None:
    assert LRFactor("constant", 100)(57) == 1.0
    cosine = LRFactor("cosine", 100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0)
    step = LRFactor("step", 100, [10, 20], gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 19, 20, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_lr_schedule_of_the_supervised_recipe_with_warm_up() -> None:
    recipe = LRFactor("step", 42500, [20000, 30000, 37500], gamma=0.1)
    factors = [recipe(i) for i in (0, 19999, 20000, 30000, 37499, 37500)]
    np.testing.assert_allclose(factors, [1, 1, 0.1, 0.01, 0.01, 0.001])
    warm = LRFactor("step", 6, [3], gamma=0.1, warmup=4)
    np.testing.assert_allclose([warm(i) for i in range(6)], [0.25, 0.5, 0.75, 0.1, 0.1, 0.1])


def test_check_resumable_ignores_only_the_resumable_keys(tmp_path: Path) -> None:
    saved = {"train": {"steps": 3, "lr": 0.1}, "eval": {"batch": 5}}
    later = {"train": {"steps": 9, "lr": 0.1}, "eval": {"batch": 7}}
    check_resumable(saved, later, tmp_path / "last.pt", ("train.steps", "eval."))
    with pytest.raises(CheckpointMismatch, match=r"eval\.batch: checkpoint 5, config 7"):
        check_resumable(saved, later, tmp_path / "last.pt", ("train.steps",))


# -- resume is identical, for every task ----------------------------------------------------


def _episodic(steps: int, out: Path) -> Engine:
    quick = ["episodes.test_shots=[1]", "episodes.test_episodes=1", "episodes.val_episodes=2"]
    config = episodic_config(f"train.steps={steps}", *quick, data={"augment": True})
    return MetaTrainer(config, out, quiet=True)


_GLYPHS: dict[str, Any] = {}


def _supervised(steps: int, out: Path) -> Engine:
    config = supervised_config(
        VARIANTS["static_shared"], iterations=steps, checkpoint_every=3, log_every=2
    )
    config["data"]["augment"] = True  # augmentation must resume exactly too
    config["eval"]["speed_rounds"] = 0
    if "data" not in _GLYPHS:
        _GLYPHS["data"] = load_synthetic(**config["data"]["options"])
    return SupervisedTrainer(config, out, data=_GLYPHS["data"], quiet=True)


TASKS: dict[str, Callable[[int, Path], Engine]] = {
    "episodic": _episodic,
    "supervised": _supervised,
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, task: str) -> None:
    """6 steps in one go vs 3 steps, a process-like restart, 3 more: the same bits (weights
    and optimiser state), and a metrics log with no step twice and none lost."""
    make = TASKS[task]
    make(6, tmp_path / "full").fit()
    make(3, tmp_path / "part").fit()
    assert load_checkpoint(tmp_path / "part" / "last.pt")["step"] == 3
    torch.manual_seed(1234)  # the restarted process's RNGs are in some other state
    np.random.seed(99)
    resumed = make(6, tmp_path / "part")
    resumed.fit(resume=True)

    full = load_checkpoint(tmp_path / "full" / "last.pt")
    part = load_checkpoint(tmp_path / "part" / "last.pt")
    assert full["model"].keys() == part["model"].keys()
    for name in full["model"]:
        assert torch.equal(full["model"][name], part["model"][name]), name
    for key, state in full["optimizer"]["state"].items():
        for field, value in state.items():
            other = part["optimizer"]["state"][key][field]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (key, field)
    assert full["scheduler"] == part["scheduler"]
    steps = [r["step"] for r in RunDir(tmp_path / "part").metrics() if r["event"] == "train"]
    assert steps == [2, 3, 4, 6]  # 3: the end of the first, 3-step, invocation
    # Sanity: training changed the weights (the comparison is not trivially true).
    initial = make(6, tmp_path / "init")
    initial.build()
    start = initial.model.state_dict()
    assert any(not torch.equal(start[name], full["model"][name]) for name in start)


@pytest.mark.slow
def test_a_checkpoint_of_an_older_schema_still_resumes(tmp_path: Path) -> None:
    """A checkpoint whose saved config predates fields filled in today (the full conv spec)
    is compared after resolving it again with today's schema: it resumes; a real
    difference is still refused."""
    trainer = _episodic(2, tmp_path)
    trainer.fit()
    path = tmp_path / "last.pt"
    checkpoint = load_checkpoint(path)
    old_config = checkpoint["config"]
    old_config["model"]["conv"] = {"kind": "plain"}  # as written before ConvSpec.to_dict()
    trainer.config = old_config  # save_checkpoint records the trainer's config
    trainer.save("last.pt")
    assert load_checkpoint(path)["config"]["model"]["conv"] == {"kind": "plain"}
    _episodic(3, tmp_path).fit(resume=True)
    assert load_checkpoint(path)["step"] == 3
    changed = _episodic(4, tmp_path)
    changed.config["train"]["lr"] = 0.5
    with pytest.raises(CheckpointMismatch, match=r"train\.lr"):
        changed.fit(resume=True)


@pytest.mark.slow
def test_a_checkpoint_without_a_saved_schedule_resumes_at_its_step(tmp_path: Path) -> None:
    """Supervised checkpoints written before the engine saved no scheduler state: the
    learning rate of the checkpoint's step is recomputed (warm-up and milestones matter)."""

    def make(steps: int, out: Path) -> Engine:
        trainer = _supervised(steps, out)
        trainer.config["train"].update(warmup_iterations=4, lr_milestones=[5])
        return trainer

    make(6, tmp_path / "full").fit()
    part = make(3, tmp_path / "part")
    part.fit()
    # Written like an old checkpoint: no scheduler, and the rate of the last step taken
    # (the old loop set it before each step) rather than of the next one.
    for group in part.optimizer.param_groups:
        group["lr"] = part.config["train"]["lr"] * part.lr_schedule()(2)
    part.scheduler = None  # type: ignore[assignment]
    part.save("last.pt")
    assert load_checkpoint(tmp_path / "part" / "last.pt")["scheduler"] is None
    make(6, tmp_path / "part").fit(resume=True)
    full = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "part" / "last.pt")["model"]
    for name in full:
        assert torch.equal(full[name], resumed[name]), name

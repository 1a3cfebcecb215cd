"""``train.compile``: the training loop's meta-loss through ``torch.compile``, against eager."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from fewshot_nsl.runner import MetaTrainer
from tests.test_runner import one_thread, tiny_config  # noqa: F401


def trained(tmp_path: Path, *overrides: str) -> tuple[MetaTrainer, list[float]]:
    """A tiny run of 2 steps without validation; the trainer and per-step losses."""
    config = tiny_config("train.steps=2", "train.val_every=0", "train.log_every=1", *overrides)
    trainer = MetaTrainer(config, tmp_path, quiet=True, log=lambda line: None)
    trainer.setup()
    return trainer, [trainer.meta_step(step)[0] for step in range(2)]


def events(trainer: MetaTrainer, name: str) -> list[dict]:
    assert trainer.run_dir is not None
    path = trainer.run_dir.file("metrics.jsonl")
    lines = path.read_text().splitlines() if path.is_file() else []
    return [record for record in map(json.loads, lines) if record.get("event") == name]


@pytest.mark.slow
def test_compiled_first_order_training_matches_eager(tmp_path: Path) -> None:
    """First-order MAML compiles: the same losses and predictions to float32 rounding, and
    the compile time in metrics.jsonl."""
    eager, expected = trained(tmp_path / "eager", "learner.first_order=true")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="train.compile")  # no fallback
        compiled, actual = trained(
            tmp_path / "compiled", "learner.first_order=true", "train.compile=true"
        )
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    # Adam turns a gradient that is zero up to rounding (a conv bias before BatchNorm) into a
    # full step of either sign: compare what the weights compute, which that bias cannot move.
    episode = eager.batcher.sampler.to_device(eager.batcher.batch(99)[0], torch.device("cpu"))
    with torch.no_grad():
        logits = [
            trainer.learner.predict(
                trainer.learner.adapt(episode.support_x, episode.support_y, 3), episode.query_x
            )
            for trainer in (eager, compiled)
        ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    (record,) = events(compiled, "compile")
    assert record["seconds"] > 0
    assert not events(eager, "compile")


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager_with_one_warning(tmp_path: Path) -> None:
    """Second-order MAML cannot compile (no double backward in aot_autograd): one warning,
    then exactly the eager run."""
    _, expected = trained(tmp_path / "eager")
    with pytest.warns(UserWarning, match="train.compile: torch.compile failed") as caught:
        _, actual = trained(tmp_path / "compiled", "train.compile=true")
    assert len([w for w in caught if "train.compile" in str(w.message)]) == 1
    assert actual == expected

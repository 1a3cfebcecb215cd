"""The episodic meta-learning task: meta-train a learner, validate on fixed episodes, test
with 95% CIs. :class:`MetaTrainer` supplies the engine (:mod:`fewshot_nsl.engine`) with:

1. data: the train/val/test splits (``episodes.build_split``) and, when a test manifest is
   given, a check that it fits (:meth:`MetaTrainer.prepare`);
2. the learner (``fewshot_nsl.learners.build_learner``), Adam, and the ``train.lr_schedule``;
3. the step: outer step ``s`` uses the meta-batch ``TaskBatcher.batch(s)``
   (:meth:`MetaTrainer.gradient_step`): its tasks one by one (``train.meta_batch:
   sequential``, the reference; ``train.compile`` runs each through ``torch.compile``) or
   together (``vectorised``, ``Learner.meta_loss_batch``);
4. the evaluation: every ``train.val_every`` steps, the FIXED validation episodes
   (``episodes.eval_seed``); the engine keeps the best weights in ``best.pt``;
5. the results: the best weights tested on frozen test episodes for every
   ``episodes.test_shots`` — mean ± 95% CI and every per-episode accuracy, for paired
   comparisons (:meth:`MetaTrainer.finish`).

The task talks to the learner only through the :class:`~fewshot_nsl.learners.Learner`
protocol (``meta_loss`` in training, ``adapt``/``predict`` in evaluation); it never branches
on the learner's type.

Distributed seam (torch.distributed is added on top of this, in
:mod:`fewshot_nsl.distributed`, not inside it):

* :meth:`MetaTrainer.gradient_step` builds this rank's share of the meta-batch with
  ``TaskBatcher(sampler, tasks_per_batch, rank, world_size).batch(step)``; each task's loss is
  divided by the *global* ``tasks_per_batch`` and back-propagated on its own (gradients
  accumulate in ``.grad``), so the sum over ranks of the accumulated gradients is the
  meta-batch mean. With ``train.meta_batch: vectorised`` the rank's tasks run together
  (``Learner.meta_loss_batch``) and their mean loss is scaled by (local tasks / global
  ``tasks_per_batch``) instead: the same sum. :meth:`MetaTrainer.reduce_gradients` is the
  single point where that sum happens (an all-reduce); here, with one process, it does
  nothing.
* Evaluation works on a list of episode indices (:func:`evaluate_episodes`):
  :meth:`MetaTrainer.shard` picks this rank's indices and :meth:`MetaTrainer.gather` puts the
  per-episode accuracies back in index order; single-process they are the identity.
* Only the main rank (``rank == 0``) writes files (the engine's rule).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from episodes import Episode, EpisodeSampler, ImageSplit, TaskBatcher, build_split
from episodes.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip
from fewshot_nsl.checkpoint import load_checkpoint, load_model_state
from fewshot_nsl.config import ConfigError
from fewshot_nsl.engine import Engine, Evaluation, LRFactor
from fewshot_nsl.evaluation import (
    EvalResult,
    episode_output,
    episode_progress,
    evaluate_episodes,
    evaluate_shots,
    test_source,
    test_way,
    val_query,
)
from fewshot_nsl.fewshot_config import FEWSHOT_DEFAULTS
from fewshot_nsl.learners import Learner, build_learner
from fewshot_nsl.stats import MeanCI, mean_ci

__all__ = [
    "DatasetNotFound",
    "MetaTrainer",
    "RESUMABLE_CHANGES",
    "build_model",
    "load_split",
    "run_dir_for",
]

#: Config keys that may change between an interrupted run and its resumption: they do not
#: affect the trajectory up to the checkpoint (more steps, other logging/output/test settings).
RESUMABLE_CHANGES = (
    "name",
    "train.steps",
    "train.val_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.device",
    "train.threads",
    "train.meta_batch",
    "train.compile",
    "train.out_dir",
    "train.tensorboard",
    "episodes.test_episodes",
    "episodes.test_shots",
    "episodes.test_query",
    "episodes.manifest",
)


#: A validation prints progress lines in a log (no terminal) only this long after it began.
VAL_LOG_AFTER_S = 30.0


class DatasetNotFound(FileNotFoundError):
    """The dataset of a config is not where ``data.root`` says; says how to prepare it."""


# -- building blocks -------------------------------------------------------------------------


def load_split(config: Mapping[str, Any], split: str, verify: str = "sampled") -> ImageSplit:
    """Split ``split`` ("train" | "val" | "test") of the config's dataset; a cache's images are
    checked against its stored content hashes (``verify``: "sampled" rows or "full").

    Raises:
        DatasetNotFound: the data is missing; the message gives the ``prepare-data`` command.
    """
    data = config["data"]
    name, root = data["dataset"], data["root"]
    how = (
        f"prepare it with `fewshot-nsl prepare-data --dataset {name} --source PATH --out DIR` "
        "and set data.root=DIR"
    )
    try:
        return build_split(name, split, root, verify=verify, **data["options"])
    except FileNotFoundError as error:
        raise DatasetNotFound(f"data.root: dataset {name!r} not found ({error}); {how}") from error
    except ValueError as error:
        if root is None and "root" in str(error):
            raise DatasetNotFound(f"data.root: dataset {name!r} needs data.root; {how}") from error
        raise ConfigError(f"data: {error}") from error


def build_model(config: Mapping[str, Any], in_channels: int) -> Learner:
    """The learner of ``config`` (``learner`` and ``model`` sections) for ``in_channels``-channel
    images, its errors reported as :class:`ConfigError` (also a ``episodes.test_way`` that the
    learner cannot adapt to: one with a way-sized head, as MAML)."""
    way = config["episodes"]["way"]
    try:
        learner = build_learner(
            config["learner"], config["model"], in_channels=in_channels, way=way
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(f"learner/model: {error}") from error
    if test_way(config) != way and not learner.any_way:
        raise ConfigError(
            f"episodes.test_way: {test_way(config)} differs from episodes.way {way}, but learner "
            f"{config['learner']['name']!r} has a {way}-way head; it can only test at its "
            "training way"
        )
    return learner


def train_transform(config: Mapping[str, Any], split: ImageSplit) -> Callable | None:
    """Augmentation of training episodes (``data.augment``): pad-by-1/8 random crop and
    horizontal flip, then the split's normalisation (``ImageSplit.normalization``: its
    ``data.options.normalize`` mode); ``None`` (= normalisation only) when off.
    Drawn from each episode's own generator, so it is part of the episode's pure function."""
    if not config["data"]["augment"]:
        return None
    _, height, width = split.image_shape
    return Compose(
        [
            RandomCrop((height, width), padding=max(1, height // 8)),
            RandomHorizontalFlip(),
            Normalize(*split.normalization),
        ]
    )


def run_dir_for(config: Mapping[str, Any]) -> Path:
    """Output folder of a run: ``train.out_dir``, else ``runs/NAME``."""
    return Path(config["train"]["out_dir"] or Path("runs") / str(config["name"] or "run"))


class MetaTrainer(Engine):
    """Meta-train, validate and test one run (see the module docstring).

    Args:
        config: a resolved config (:func:`fewshot_nsl.fewshot_config.load_fewshot_config`) of a
            single run.
        out_dir: run directory (default :func:`run_dir_for`).
        rank / world_size: this process's place among the training processes.
        quiet: no progress bar nor progress lines.
        log: where progress lines go when there is no TTY for a progress bar.
        verify_data: how much of a dataset cache is checked against its stored content
            hashes when loaded: ``"sampled"`` rows or ``"full"`` (``--verify-data``).
    """

    resumable_changes = RESUMABLE_CHANGES
    schema = FEWSHOT_DEFAULTS
    eval_event = "val"

    def __init__(
        self,
        config: Mapping[str, Any],
        out_dir: str | Path | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        quiet: bool = False,
        log: Callable[[str], None] | None = None,
        verify_data: str = "sampled",
    ) -> None:
        super().__init__(config, out_dir, rank=rank, world_size=world_size, quiet=quiet, log=log)
        self.verify_data = verify_data
        self.splits: dict[str, ImageSplit] = {}
        #: ``tested`` ("best.pt" / "final weights"), ``tested_step``, ``best``: what
        #: :meth:`test` evaluated, read from the checkpoint it loaded.
        self.tested: dict[str, Any] = {}
        self.val_sampler: EpisodeSampler | None = None
        self.compiled_meta_loss: Callable | None = None  # train.compile: see task_backward

    default_out_dir = staticmethod(run_dir_for)

    @property
    def learner(self) -> Learner | None:
        """The learner being meta-trained (the engine's model)."""
        return self.model  # type: ignore[return-value]

    @property
    def total_steps(self) -> int:
        return self.config["train"]["steps"]

    @property
    def eval_every(self) -> int:
        return self.config["train"]["val_every"] if self.val_sampler is not None else 0

    @property
    def final_evaluation(self) -> bool:
        return self.val_sampler is not None

    # -- data and model ----------------------------------------------------------------------

    def split(self, name: str) -> ImageSplit:
        """Split ``name`` of the run's dataset (built once)."""
        if name not in self.splits:
            self.splits[name] = load_split(self.config, name, verify=self.verify_data)
        return self.splits[name]

    def fingerprints(self) -> dict[str, str]:
        """Content fingerprints of the splits used so far."""
        return {name: split.fingerprint for name, split in self.splits.items()}

    def prepare(self) -> None:
        config = self.config
        for name in ("train", "val", "test"):  # fail now, not after training, if one is missing
            self.split(name)
        if config["episodes"]["manifest"]:  # ... or a test manifest does not fit
            for shot in config["episodes"]["test_shots"]:
                test_source(config, self.split("test"), shot, 1, config["episodes"]["manifest"])

    def build_model(self) -> nn.Module:
        return build_model(self.config, in_channels=self.split("train").image_shape[0])

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.config["train"]["lr"])

    def lr_schedule(self) -> LRFactor:
        train = self.config["train"]
        return LRFactor(
            train["lr_schedule"], train["steps"], train["lr_milestones"], train["lr_gamma"]
        )

    def build_inputs(self) -> None:
        config, episodes = self.config, self.config["episodes"]
        train_split = self.split("train")
        transform = train_transform(config, train_split)
        sampler = EpisodeSampler(
            train_split,
            episodes["way"],
            episodes["shot"],
            episodes["query"],
            seed=config["train"]["seed"],
            transform=transform,
            # Without augmentation the sampler hands over uint8 pixels, converted on the
            # device (gradient_step); augmentation runs on the host, on float images.
            **(episode_output(self.device) if transform is None else {}),
        )
        self.batcher = TaskBatcher(
            sampler, episodes["tasks_per_batch"], rank=self.rank, world_size=self.world_size
        )
        self.val_sampler = None
        if episodes["val_episodes"] > 0 and config["train"]["val_every"] > 0:
            self.val_sampler = EpisodeSampler(  # at the test way: the protocol that is reported
                self.split("val"),
                test_way(config),
                episodes["shot"],
                val_query(config),
                seed=episodes["eval_seed"],
                num_episodes=episodes["val_episodes"],
                **episode_output(self.device),
            )

    # -- distributed seam --------------------------------------------------------------------

    def reduce_gradients(self) -> None:
        """Sum the accumulated gradients over ranks (all-reduce). One process: nothing to do.

        Each rank's ``.grad`` holds ``Σ_local loss_i / tasks_per_batch``; after the sum every
        rank holds the meta-batch mean, and the identical optimiser steps keep them in sync.
        """

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of evaluation episode ``indices`` (one process: all)."""
        return indices

    def gather(self, local: np.ndarray, indices: list[int]) -> np.ndarray:
        """Per-episode accuracies of all ranks in ``indices`` order (one process: ``local``)."""
        return local

    # -- training ----------------------------------------------------------------------------

    def gradient_step(self, step: int) -> dict[str, float]:
        """Meta-gradients of meta-batch ``step``; this rank's mean loss and accuracy."""
        assert self.learner is not None, "call setup() first"
        self.learner.train()
        tasks = self.batcher.batch(step)
        scale = 1.0 / self.batcher.tasks_per_batch  # global meta-batch size: see reduce_gradients
        total_loss = total_accuracy = 0.0
        sampler = self.batcher.sampler  # its to_device converts uint8 episodes on the device
        together = None
        if self.config["train"]["meta_batch"] == "vectorised":  # None: the learner cannot
            together = self.learner.meta_loss_batch(
                [sampler.to_device(episode, self.device) for episode in tasks]
            )
        if together is not None:  # the mean over this rank's tasks, as one graph
            loss, accuracy = together
            (loss * (len(tasks) * scale)).backward()
            total_loss, total_accuracy = (
                float(loss.detach()) * len(tasks),
                float(accuracy) * len(tasks),
            )
        else:
            for episode in tasks:  # one graph alive at a time: memory of a single task
                loss, accuracy = self.task_backward(sampler.to_device(episode, self.device), scale)
                total_loss += float(loss.detach())
                total_accuracy += float(accuracy)
        self.reduce_gradients()
        grad_clip = self.config["train"]["grad_clip"]
        if grad_clip is not None:
            if self.config["train"]["grad_clip_mode"] == "value":  # each element to ±grad_clip
                torch.nn.utils.clip_grad_value_(self.learner.parameters(), grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.learner.parameters(), grad_clip)
        return {"loss": total_loss / len(tasks), "accuracy": total_accuracy / len(tasks)}

    def task_backward(self, episode: Episode, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``learner.meta_loss(episode)``, its loss times ``scale`` back-propagated; returns
        (loss, accuracy). With ``train.compile`` the meta-loss runs through ``torch.compile``.

        The first compiled call (forward and backward) is timed, compilation included, and
        logged as event ``compile``. Where it fails (e.g. second-order MAML: aot_autograd has
        no double backward in torch 2.13, raised in the backward), the run continues eagerly
        after one warning: that first call is the first task of a step, whose gradients
        ``step_once`` set to None, so setting them to None again discards exactly the failed
        attempt's partial gradients; its buffers and CPU random state are restored too, so the
        eager run that follows is the plain eager run."""
        assert self.learner is not None
        if not self.config["train"]["compile"] or self.compiled_meta_loss is not None:
            meta_loss = self.compiled_meta_loss or self.learner.meta_loss
            loss, accuracy = meta_loss(episode)
            (loss * scale).backward()
            return loss, accuracy
        compiled = torch.compile(self.learner.meta_loss)
        # what a failed attempt may have changed before failing: running BatchNorm buffers
        # (bn: running), random draws (dropout)
        buffers = {name: b.detach().clone() for name, b in self.learner.named_buffers()}
        rng_state = torch.get_rng_state()
        started = time.perf_counter()
        try:
            loss, accuracy = compiled(episode)
            (loss * scale).backward()
        except Exception as error:  # any compiler failure: train eagerly
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"train.compile: torch.compile failed ({type(error).__name__}: {message}); "
                "training eagerly",
                stacklevel=2,
            )
            for parameter in self.learner.parameters():
                parameter.grad = None
            with torch.no_grad():
                for name, buffer in self.learner.named_buffers():
                    buffer.copy_(buffers[name])
            torch.set_rng_state(rng_state)
            self.compiled_meta_loss = self.learner.meta_loss
            return self.task_backward(episode, scale)
        self.compiled_meta_loss = compiled
        seconds = time.perf_counter() - started
        self.log_event("compile", self.step, seconds=seconds)
        self.say(
            f"[{self.config['name']}] train.compile: first task (forward and backward) took "
            f"{seconds:.1f} s, compilation included"
        )
        return loss, accuracy

    def meta_step(self, step: int) -> tuple[float, float]:
        """One outer step (optimiser and schedule included) on meta-batch ``step``; returns the
        mean loss and accuracy."""
        metrics = self.step_once(step)
        return metrics["loss"], metrics["accuracy"]

    def validate(self) -> tuple[MeanCI, float]:
        """Accuracy and mean query cross-entropy on the fixed validation episodes."""
        assert self.learner is not None and self.val_sampler is not None
        indices = list(range(len(self.val_sampler)))
        mine = self.shard(indices)
        losses = np.empty(len(mine), dtype=np.float64)
        # Lines in a log only when a validation is long (a short one's result line follows).
        desc = f"[{self.config['name']}] val"
        with episode_progress(len(mine), desc, self.show_bar, self.say, VAL_LOG_AFTER_S) as update:
            local = evaluate_episodes(
                self.learner, self.val_sampler, mine, self.device, update, losses=losses
            )
        return mean_ci(self.gather(local, indices)), float(self.gather(losses, indices).mean())

    def evaluate(self, step: int) -> Evaluation:
        summary, loss = self.validate()
        train = self.config["train"]
        if self.best is None:
            improved = True
        elif train["select_by"] == "val_loss":
            improved = loss < self.best.get("loss", math.inf)
        else:
            improved = summary.mean > self.best["accuracy"]
        # A resumed run re-evaluating the step of its best (kept from a best.pt written after
        # last.pt) marks it best again, as the uninterrupted run did.
        improved = improved or step == self.best["step"]  # type: ignore[index]
        best_step = step if improved else self.best["step"]  # type: ignore[index]
        # Early stopping as the ProtoNet reference: stop once the validations since the best
        # one (derived from the steps, so a resumed run counts the same) exceed the patience.
        since_best = (step - best_step) // max(1, train["val_every"])
        stop = train["patience"] is not None and since_best > train["patience"]
        message = (
            f"[{self.config['name']}] step {step} val acc {summary.format()} loss {loss:.4f}"
            + (" (best)" if improved else "")
            + (f"; stopping: {since_best} validations without a new best" if stop else "")
        )
        return Evaluation(
            values={"accuracy": summary.mean, "ci95": summary.ci95, "loss": loss, "best": improved},
            message=message,
            best={"step": step, "accuracy": summary.mean, "ci95": summary.ci95, "loss": loss}
            if improved
            else None,
            stop=stop,
        )

    # -- results -----------------------------------------------------------------------------

    def load_best(self) -> None:
        """Load ``best.pt``'s weights into the learner when validation chose any (part of the
        distributed seam: there rank 0 loads and sends them to the other ranks), and record
        what is tested from the checkpoint itself (:attr:`tested`)."""
        assert self.learner is not None and self.run_dir is not None
        self.tested = {"tested": "final weights", "tested_step": self.step, "best": None}
        if self.best is not None:
            best_path = self.run_dir.file("best.pt")
            best = load_checkpoint(best_path, self.device)
            load_model_state(self.learner, best["model"], str(best_path))
            self.tested = {
                "tested": "best.pt",
                "tested_step": int(best["step"]),
                "best": best["best"],
            }

    def test(self) -> dict[int, EvalResult]:
        """Test the best weights (the final ones without validation) on every test shot."""
        assert self.learner is not None
        self.load_best()
        episodes = self.config["episodes"]
        return evaluate_shots(
            self.learner,
            self.config,
            self.split("test"),
            episodes["test_shots"],
            episodes["test_episodes"],
            self.device,
            manifest=episodes["manifest"],
            show_progress=self.show_bar,
            shard=self.shard,
            gather=self.gather,
            log=self.say,
        )

    def results(self, tests: Mapping[int, EvalResult], wall_time_s: float) -> dict[str, Any]:
        """The ``results.json`` payload."""
        config = self.config
        return {
            "name": config["name"],
            "method": config["learner"]["name"],
            "backbone": config["model"]["backbone"],
            "conv": config["model"]["conv"],
            "bn": getattr(self.learner, "bn", None),
            "way": config["episodes"]["way"],
            "test_way": test_way(config),
            "train_shot": config["episodes"]["shot"],
            "steps": self.step,
            "stopped_early": self.step < self.total_steps,
            "seed": config["train"]["seed"],
            # What was tested, as its checkpoint says (not the config nor the engine's state).
            **self.tested,
            "data": self.fingerprints(),
            "wall_time_s": round(wall_time_s, 2),
            "test": {str(shot): result.as_dict() for shot, result in tests.items()},
        }

    def finish(self) -> dict[str, Any]:
        """Test every shot, log the test records; the ``results.json`` payload."""
        tests = self.test()
        for shot, result in tests.items():
            summary = result.summary
            self.log_event(
                "test",
                self.step,
                shot=shot,
                accuracy=summary.mean,
                ci95=summary.ci95,
                episodes=summary.n,
            )
        return self.results(tests, self.elapsed_s())

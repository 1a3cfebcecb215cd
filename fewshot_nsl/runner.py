"""Episode runner: meta-train a learner, validate on fixed episodes, test with 95% CIs.

One run (:class:`MetaTrainer`) does, from a resolved config (:mod:`fewshot_nsl.config`):

1. builds the train/val/test splits (``episodes.build_split``) and the learner
   (``fewshot_nsl.learners.build_learner``) after seeding every RNG with ``train.seed``;
2. meta-trains with Adam: outer step ``s`` uses the meta-batch ``TaskBatcher.batch(s)``;
3. every ``train.val_every`` steps scores FIXED validation episodes (``episodes.eval_seed``)
   and keeps the best weights in ``best.pt``; ``last.pt`` every ``train.checkpoint_every``;
4. tests the best weights on frozen test episodes for every ``episodes.test_shots`` and writes
   ``results.json`` (mean ± 95% CI and every per-episode accuracy, for paired comparisons).

The runner talks to the learner only through the :class:`~fewshot_nsl.learners.Learner`
protocol (``meta_loss`` in training, ``adapt``/``predict`` in evaluation); it never branches
on the learner's type.

Distributed seam (torch.distributed is added on top of this, not inside it):

* :meth:`MetaTrainer.meta_step` builds this rank's share of the meta-batch with
  ``TaskBatcher(sampler, tasks_per_batch, rank, world_size).batch(step)``; each task's loss is
  divided by the *global* ``tasks_per_batch`` and back-propagated on its own (gradients
  accumulate in ``.grad``), so the sum over ranks of the accumulated gradients is the
  meta-batch mean. :meth:`MetaTrainer.reduce_gradients` is the single point where that sum
  happens (an all-reduce); here, with one process, it does nothing.
* Evaluation works on a list of episode indices (:func:`evaluate_episodes`):
  :meth:`MetaTrainer.shard` picks this rank's indices and :meth:`MetaTrainer.gather` puts the
  per-episode accuracies back in index order; single-process they are the identity.
* Only the main rank (``rank == 0``) writes files.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from episodes import EpisodeSampler, ImageSplit, TaskBatcher, build_split, load_manifest
from episodes.sampler import EpisodeSource
from episodes.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip
from fewshot_nsl.checkpoint import (
    CheckpointMismatch,
    config_differences,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from fewshot_nsl.config import ConfigError
from fewshot_nsl.learners import Learner, build_learner
from fewshot_nsl.runlog import RunDir
from fewshot_nsl.stats import MeanCI, mean_ci

__all__ = [
    "DatasetNotFound",
    "check_resumable",
    "EvalResult",
    "LRFactor",
    "MetaTrainer",
    "build_model",
    "evaluate_episodes",
    "evaluate_shots",
    "load_split",
    "resolve_device",
    "run_dir_for",
    "test_source",
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
    "train.out_dir",
    "episodes.test_episodes",
    "episodes.test_shots",
    "episodes.test_query",
    "episodes.manifest",
)


class DatasetNotFound(FileNotFoundError):
    """The dataset of a config is not where ``data.root`` says; says how to prepare it."""


# -- building blocks -------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def load_split(config: Mapping[str, Any], split: str) -> ImageSplit:
    """Split ``split`` ("train" | "val" | "test") of the config's dataset.

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
        return build_split(name, split, root, **data["options"])
    except FileNotFoundError as error:
        raise DatasetNotFound(f"data.root: dataset {name!r} not found ({error}); {how}") from error
    except ValueError as error:
        if root is None and "root" in str(error):
            raise DatasetNotFound(f"data.root: dataset {name!r} needs data.root; {how}") from error
        raise ConfigError(f"data: {error}") from error


def build_model(config: Mapping[str, Any], in_channels: int) -> Learner:
    """The learner of ``config`` (``learner`` and ``model`` sections) for ``in_channels``-channel
    images, its errors reported as :class:`ConfigError`."""
    try:
        return build_learner(
            config["learner"], config["model"], in_channels=in_channels,
            way=config["episodes"]["way"],
        )  # fmt: skip
    except (ValueError, TypeError) as error:
        raise ConfigError(f"learner/model: {error}") from error


def train_transform(config: Mapping[str, Any], split: ImageSplit) -> Callable | None:
    """Augmentation of training episodes (``data.augment``): pad-by-1/8 random crop and
    horizontal flip, then the split's normalisation; ``None`` (= normalisation only) when off.
    Drawn from each episode's own generator, so it is part of the episode's pure function."""
    if not config["data"]["augment"]:
        return None
    _, height, width = split.image_shape
    return Compose(
        [
            RandomCrop((height, width), padding=max(1, height // 8)),
            RandomHorizontalFlip(),
            Normalize(split.mean, split.std),
        ]
    )


def run_dir_for(config: Mapping[str, Any]) -> Path:
    """Output folder of a run: ``train.out_dir``, else ``runs/NAME``."""
    return Path(config["train"]["out_dir"] or Path("runs") / str(config["name"] or "run"))


@dataclass
class LRFactor:
    """Multiplier of the base learning rate after ``step`` outer steps (for ``LambdaLR``).

    ``constant``: 1; ``cosine``: ``0.5·(1 + cos(π·step/steps))``; ``step``: ``gamma`` to the
    number of ``milestones`` reached. A dataclass (not a lambda) so that ``LambdaLR`` stores it
    in its state dict.
    """

    schedule: str
    steps: int
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.steps) / max(1, self.steps)))
        if self.schedule == "step":
            return self.gamma ** sum(step >= milestone for milestone in self.milestones)
        raise ConfigError(f"train.lr_schedule: unknown schedule {self.schedule!r}")


def seed_everything(seed: int) -> None:
    """Seed the torch, numpy and python global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def check_resumable(saved: Mapping[str, Any], config: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointMismatch` naming every key in which ``config`` differs from the
    ``saved`` config of the checkpoint at ``path``, apart from :data:`RESUMABLE_CHANGES`."""
    differences = [
        line
        for line in config_differences(saved, config)
        if not line.startswith(tuple(f"{key}:" for key in RESUMABLE_CHANGES))
    ]
    if differences:
        raise CheckpointMismatch(
            f"cannot resume from {path}: the config differs from the checkpoint's in "
            + "; ".join(differences[:6])
        )


# -- evaluation ------------------------------------------------------------------------------


def evaluate_episodes(
    learner: Learner,
    source: EpisodeSource,
    indices: Sequence[int],
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Query accuracy of ``learner`` on episodes ``source.episode(i)``, ``i in indices``.

    The learner is put in eval mode (MAML uses ``inner_steps_eval``) and restored afterwards;
    no meta-gradient graph is built. Returns float64 ``(len(indices),)`` in index order.
    ``progress(n)`` is called after each episode. Any subset of indices can be scored on its
    own, so evaluation shards over ranks by splitting ``indices``.
    """
    was_training = learner.training
    learner.eval()
    accuracies = np.empty(len(indices), dtype=np.float64)
    try:
        with torch.no_grad():
            for position, index in enumerate(indices):
                episode = source.episode(int(index)).to(device)
                state = learner.adapt(episode.support_x, episode.support_y, episode.way)
                logits = learner.predict(state, episode.query_x)
                correct = (logits.argmax(dim=-1) == episode.query_y).double().mean()
                accuracies[position] = float(correct)
                if progress is not None:
                    progress(1)
    finally:
        learner.train(was_training)
    return accuracies


def test_source(
    config: Mapping[str, Any],
    split: ImageSplit,
    shot: int,
    num_episodes: int,
    manifest: str | None = None,
) -> tuple[EpisodeSource, int, str]:
    """The frozen test episodes of ``shot``: ``(source, num_episodes, description)``.

    From a manifest when given (``{shot}`` in the path is replaced by the shot; all its
    episodes are used), else ``EpisodeSampler(split, way, shot, test_query,
    seed=episodes.eval_seed)`` — the same episodes for every model evaluated on this data.
    """
    episodes = config["episodes"]
    if manifest:
        path = manifest.format(shot=shot)
        source = load_manifest(path, split, way=episodes["way"], shot=shot)
        return source, len(source), f"manifest {path}"
    sampler = EpisodeSampler(
        split, episodes["way"], shot, episodes["test_query"], seed=episodes["eval_seed"],
        num_episodes=num_episodes,
    )  # fmt: skip
    return sampler, num_episodes, f"sampler seed {episodes['eval_seed']}"


@dataclass
class EvalResult:
    """Test accuracy of one shot setting: summary and every per-episode accuracy."""

    way: int
    shot: int
    query: int
    accuracies: np.ndarray
    source: str

    @property
    def summary(self) -> MeanCI:
        return mean_ci(self.accuracies)

    def as_dict(self) -> dict[str, Any]:
        return {
            "way": self.way,
            "shot": self.shot,
            "query": self.query,
            "episodes": int(len(self.accuracies)),
            "source": self.source,
            **self.summary.as_dict(),
            "accuracies": [round(float(a), 6) for a in self.accuracies],
        }


def evaluate_shots(
    learner: Learner,
    config: Mapping[str, Any],
    split: ImageSplit,
    shots: Sequence[int],
    num_episodes: int,
    device: torch.device,
    manifest: str | None = None,
    show_progress: bool = True,
    shard: Callable[[list[int]], list[int]] | None = None,
    gather: Callable[[np.ndarray, list[int]], np.ndarray] | None = None,
) -> dict[int, EvalResult]:
    """:func:`evaluate_episodes` on the frozen test episodes of every shot in ``shots``.

    ``shard``/``gather`` (default: identity) split the episode indices over ranks and put the
    accuracies back together (see the module docstring).
    """
    results = {}
    for shot in shots:
        source, count, description = test_source(config, split, shot, num_episodes, manifest)
        indices = list(range(count))
        mine = shard(indices) if shard is not None else indices
        with tqdm(
            total=len(mine), desc=f"test {shot}-shot", disable=not show_progress, leave=False
        ) as bar:
            local = evaluate_episodes(learner, source, mine, device, progress=bar.update)
        accuracies = gather(local, indices) if gather is not None else local
        query = config["episodes"]["test_query"] if not manifest else source.episode(0).query
        results[shot] = EvalResult(config["episodes"]["way"], shot, query, accuracies, description)
    return results


def _progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


# -- meta-training ---------------------------------------------------------------------------


class MetaTrainer:
    """Meta-train, validate and test one run (see the module docstring).

    Args:
        config: a resolved config (:func:`fewshot_nsl.config.load_config`) of a single run.
        out_dir: run directory (default :func:`run_dir_for`).
        rank / world_size: this process's place among the training processes.
        quiet: no progress bar nor progress lines.
        log: where progress lines go when there is no TTY for a progress bar.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        out_dir: str | Path | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        quiet: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = dict(config)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.quiet = quiet
        self.show_bar = self.is_main and _progress_enabled(quiet)
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.run_dir = RunDir(out_dir if out_dir is not None else run_dir_for(config))
        self.device = resolve_device(config["train"]["device"])
        if config["train"]["threads"] is not None:  # small models on a busy CPU: fewer is faster
            torch.set_num_threads(config["train"]["threads"])
        self.splits: dict[str, ImageSplit] = {}
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.learner: Learner | None = None

    # -- setup ---------------------------------------------------------------------------

    def split(self, name: str) -> ImageSplit:
        """Split ``name`` of the run's dataset (built once)."""
        if name not in self.splits:
            self.splits[name] = load_split(self.config, name)
        return self.splits[name]

    def fingerprints(self) -> dict[str, str]:
        """Content fingerprints of the splits used so far."""
        return {name: split.fingerprint for name, split in self.splits.items()}

    def setup(self, resume: bool = False) -> None:
        """Build data, learner, optimiser and schedule; with ``resume`` and a ``last.pt`` in the
        run directory, restore the run from it (weights, optimiser, schedule, step, RNGs)."""
        config = self.config
        train = config["train"]
        train_split = self.split("train")
        for name in ("val", "test"):  # fail now, not after training, if a split is missing
            self.split(name)
        if config["episodes"]["manifest"]:  # ... or a test manifest does not fit
            for shot in config["episodes"]["test_shots"]:
                test_source(config, self.split("test"), shot, 1, config["episodes"]["manifest"])
        seed_everything(train["seed"])
        self.learner = build_model(config, in_channels=train_split.image_shape[0]).to(self.device)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=train["lr"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            LRFactor(train["lr_schedule"], train["steps"], train["lr_milestones"],
                     train["lr_gamma"]),
        )  # fmt: skip
        episodes = config["episodes"]
        sampler = EpisodeSampler(
            train_split, episodes["way"], episodes["shot"], episodes["query"], seed=train["seed"],
            transform=train_transform(config, train_split),
        )  # fmt: skip
        self.batcher = TaskBatcher(
            sampler, episodes["tasks_per_batch"], rank=self.rank, world_size=self.world_size
        )
        self.val_sampler = None
        if episodes["val_episodes"] > 0 and train["val_every"] > 0:
            self.val_sampler = EpisodeSampler(
                self.split("val"), episodes["way"], episodes["shot"], episodes["query"],
                seed=episodes["eval_seed"], num_episodes=episodes["val_episodes"],
            )  # fmt: skip
        self.step, self.best = 0, None
        last = self.run_dir.file("last.pt")
        if resume and last.is_file():
            self._restore(last)
        elif self.is_main:
            self.run_dir.write_config(config)
            self.run_dir.write_meta(data=self.fingerprints())

    def _restore(self, path: Path) -> None:
        checkpoint = load_checkpoint(path, map_location=self.device)
        check_resumable(checkpoint["config"], self.config, path)
        stale = {
            name: (saved, self.fingerprints().get(name))
            for name, saved in checkpoint["data"].items()
            if name in self.fingerprints() and saved != self.fingerprints()[name]
        }
        if stale:
            raise CheckpointMismatch(f"cannot resume from {path}: the data changed: {stale}")
        load_model_state(self.learner, checkpoint["model"], str(path))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        # The schedule follows the (possibly extended) config, not the interrupted run's.
        self.scheduler.lr_lambdas[0].steps = self.config["train"]["steps"]
        restore_rng_state(checkpoint["rng"])
        self.step = int(checkpoint["step"])
        self.best = checkpoint["best"]
        if self.is_main:
            self.run_dir.truncate_metrics(self.step)
            self.run_dir.write_config(self.config)
            self._log(f"resumed {self.run_dir.path} at step {self.step}")

    # -- distributed seam ------------------------------------------------------------------

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

    def meta_step(self, step: int) -> tuple[float, float]:
        """One outer step on meta-batch ``step``; returns this rank's mean loss and accuracy."""
        assert self.learner is not None, "call setup() first"
        self.learner.train()
        self.optimizer.zero_grad(set_to_none=True)
        tasks = self.batcher.batch(step)
        scale = 1.0 / self.batcher.tasks_per_batch  # global meta-batch size: see reduce_gradients
        total_loss = total_accuracy = 0.0
        for episode in tasks:
            loss, accuracy = self.learner.meta_loss(episode.to(self.device))
            (loss * scale).backward()  # one graph alive at a time: memory of a single task
            total_loss += float(loss.detach())
            total_accuracy += float(accuracy)
        self.reduce_gradients()
        grad_clip = self.config["train"]["grad_clip"]
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.learner.parameters(), grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return total_loss / len(tasks), total_accuracy / len(tasks)

    def validate(self) -> MeanCI:
        """Accuracy on the fixed validation episodes."""
        assert self.learner is not None and self.val_sampler is not None
        indices = list(range(len(self.val_sampler)))
        local = evaluate_episodes(self.learner, self.val_sampler, self.shard(indices), self.device)
        return mean_ci(self.gather(local, indices))

    def save(self, name: str) -> None:
        """Checkpoint the run as ``name`` (``last.pt`` / ``best.pt``) in the run directory."""
        if self.is_main:
            save_checkpoint(
                self.run_dir.file(name), model=self.learner, optimizer=self.optimizer,
                scheduler=self.scheduler, step=self.step, config=self.config,
                data=self.fingerprints(), best=self.best,
            )  # fmt: skip

    def train(self) -> None:
        """Meta-train from ``self.step`` to ``train.steps`` (validating, checkpointing)."""
        train = self.config["train"]
        steps = train["steps"]
        window: list[tuple[float, float]] = []
        started = time.perf_counter()
        first = self.step
        with tqdm(
            total=steps, initial=self.step, desc=f"train {self.config['name']}",
            disable=not self.show_bar, dynamic_ncols=True,
        ) as bar:  # fmt: skip
            while self.step < steps:
                loss, accuracy = self.meta_step(self.step)
                self.step += 1
                window.append((loss, accuracy))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", refresh=False)
                if self.step % train["log_every"] == 0 or self.step == steps:
                    mean_loss, mean_accuracy = np.mean(window, axis=0)
                    window.clear()
                    lr = self.optimizer.param_groups[0]["lr"]
                    if self.is_main:
                        self.run_dir.log("train", self.step, loss=float(mean_loss),
                                         accuracy=float(mean_accuracy), lr=lr)
                        if not self.show_bar and not self.quiet:
                            rate = (self.step - first) / (time.perf_counter() - started)
                            self._log(
                                f"[{self.config['name']}] step {self.step}/{steps} "
                                f"loss {mean_loss:.3f} acc {mean_accuracy:.3f} "
                                f"({rate:.1f} steps/s)"
                            )
                if self.val_sampler is not None and (
                    self.step % train["val_every"] == 0 or self.step == steps
                ):
                    self._validate_and_keep_best(bar)
                if self.step == steps or (
                    train["checkpoint_every"] and self.step % train["checkpoint_every"] == 0
                ):
                    self.save("last.pt")

    def _validate_and_keep_best(self, bar: tqdm) -> None:
        summary = self.validate()
        improved = self.best is None or summary.mean > self.best["accuracy"]
        if improved:
            self.best = {"step": self.step, "accuracy": summary.mean, "ci95": summary.ci95}
        if self.is_main:
            self.run_dir.log("val", self.step, accuracy=summary.mean, ci95=summary.ci95,
                             best=improved)  # fmt: skip
            message = (
                f"[{self.config['name']}] step {self.step} val acc {summary.format()}"
                + (" (best)" if improved else "")
            )
            if self.show_bar:
                bar.write(message, file=sys.stderr)
            elif not self.quiet:
                self._log(message)
        if improved:
            self.save("best.pt")

    def load_best(self) -> None:
        """Load ``best.pt``'s weights into the learner when validation chose any (part of the
        distributed seam: there rank 0 loads and sends them to the other ranks)."""
        assert self.learner is not None
        best_path = self.run_dir.file("best.pt")
        if self.best is not None and best_path.is_file():
            load_model_state(self.learner, load_checkpoint(best_path, self.device)["model"],
                             str(best_path))  # fmt: skip

    def test(self) -> dict[int, EvalResult]:
        """Test the best weights (the final ones without validation) on every test shot."""
        assert self.learner is not None
        self.load_best()
        episodes = self.config["episodes"]
        return evaluate_shots(
            self.learner, self.config, self.split("test"), episodes["test_shots"],
            episodes["test_episodes"], self.device, manifest=episodes["manifest"],
            show_progress=self.show_bar, shard=self.shard, gather=self.gather,
        )  # fmt: skip

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
            "train_shot": config["episodes"]["shot"],
            "steps": self.step,
            "best": self.best,
            "tested": "best.pt" if self.best is not None else "final weights",
            "data": self.fingerprints(),
            "wall_time_s": round(wall_time_s, 2),
            "test": {str(shot): result.as_dict() for shot, result in tests.items()},
        }

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Setup (or resume), train, test; write and return ``results.json``'s payload."""
        started = time.perf_counter()
        self.setup(resume=resume)
        self.train()
        tests = self.test()
        results = self.results(tests, time.perf_counter() - started)
        if self.is_main:
            for shot, result in tests.items():
                summary = result.summary
                self.run_dir.log("test", self.step, shot=shot, accuracy=summary.mean,
                                 ci95=summary.ci95, episodes=summary.n)  # fmt: skip
            self.run_dir.write_json(RunDir.RESULTS, results)
        return results

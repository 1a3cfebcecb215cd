"""The training engine: one loop, one run directory, one checkpoint format for every task.

Over 400 lines: the one training loop and every decision about a run directory belong in
one file, so that a guarantee about runs is written once.

A *task* is a subclass of :class:`Engine` that supplies what differs between kinds of
training; the engine does everything else, once:

==========================  =====================================================  ==========
what                        engine (here)                                          task hook
==========================  =====================================================  ==========
device, threads, seeding    :func:`resolve_device`, :func:`seed_everything`
data                        built before the seed and before any file is written   ``prepare``
model, optimiser            built right after seeding ``train.seed``                ``build_model``,
                                                                                   ``build_optimizer``
learning-rate schedule      :class:`LRFactor` through ``LambdaLR`` (state saved)   ``lr_schedule``
training inputs             built after the model (samplers, batch streams)        ``build_inputs``
one optimiser step          zero_grad → task → ``optimizer.step`` → schedule step  ``gradient_step``
logging                     window means every ``log_every`` steps, progress bar
evaluation cadence          every ``eval_every`` steps and (``final_evaluation``)   ``evaluate``
                            at the last step; keeps the best (``best.pt``); stops
                            early when the evaluation says so (``Evaluation.stop``)
checkpoints                 ``last.pt`` every ``checkpoint_every`` and at the end
run directory               :meth:`Engine.open_run`: start fresh / resume / refuse
results                     ``results.json``                                        ``finish``
==========================  =====================================================  ==========

The single places a run-directory rule belongs: :meth:`Engine.open_run` (start fresh,
resume, or refuse), :meth:`Engine.save` (write a checkpoint), :meth:`Engine.log_event` (append
a metrics record), :meth:`Engine.fit` (write ``results.json``). Only the main rank
(``rank == 0``) writes files.

Reproducibility: training step ``s`` must be a pure function of the task's state and ``s``
(the tasks draw their batches and augmentation from ``(seed, s)``), so a run resumed from a
checkpoint at step ``k`` — weights, optimiser, schedule, RNG states — continues exactly.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fewshot_nsl.checkpoint import (
    CheckpointMismatch,
    config_differences,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from fewshot_nsl.config import ConfigError, normalized_config
from fewshot_nsl.runlog import RunDir

__all__ = [
    "Engine",
    "Evaluation",
    "LRFactor",
    "check_resumable",
    "resolve_device",
    "seed_everything",
]

LAST = "last.pt"
BEST = "best.pt"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed the torch, numpy and python global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class LRFactor:
    """Multiplier of the base learning rate at step ``step`` (the ``LambdaLR`` function).

    ``constant``: 1; ``cosine``: ``0.5·(1 + cos(π·step/steps))``; ``step``: ``gamma`` to the
    number of ``milestones`` reached. Times a linear warm-up ``(step + 1) / warmup`` during
    the first ``warmup`` steps (0: none). A dataclass, not a lambda, so that ``LambdaLR``
    stores it in its state dict (and so in checkpoints).
    """

    schedule: str
    steps: int
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup: int = 0

    def __call__(self, step: int) -> float:
        if self.schedule == "constant":
            factor = 1.0
        elif self.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(step, self.steps) / max(1, self.steps)))
        elif self.schedule == "step":
            factor = self.gamma ** sum(step >= milestone for milestone in self.milestones)
        else:
            raise ConfigError(f"train.lr_schedule: unknown schedule {self.schedule!r}")
        if self.warmup > 0:
            factor *= min(1.0, (step + 1) / self.warmup)
        return factor


def check_resumable(
    saved: Mapping[str, Any],
    config: Mapping[str, Any],
    path: Path,
    resumable_changes: tuple[str, ...],
) -> None:
    """Raise :class:`CheckpointMismatch` naming every key in which ``config`` differs from the
    ``saved`` config of the checkpoint at ``path``, apart from keys starting with one of
    ``resumable_changes`` (``"train.steps"``, or a whole section as ``"eval."``)."""
    prefixes = tuple(key if key.endswith(".") else f"{key}:" for key in resumable_changes)
    differences = [
        line for line in config_differences(saved, config) if not line.startswith(prefixes)
    ]
    if differences:
        raise CheckpointMismatch(
            f"cannot resume from {path}: the config differs from the checkpoint's in "
            + "; ".join(differences[:6])
        )


@dataclass
class Evaluation:
    """What a task's evaluation at one step reports to the engine.

    Attributes:
        values: the metrics record (logged as event :attr:`Engine.eval_event`).
        message: one line for the user.
        best: a new best summary (stored in checkpoints, weights saved as ``best.pt``) when
            this evaluation improved on :attr:`Engine.best`; ``None`` otherwise.
        stop: end training now (early stopping): ``last.pt`` is saved at this step and the
            task's :meth:`Engine.finish` follows.
    """

    values: dict[str, Any]
    message: str
    best: dict[str, Any] | None = None
    stop: bool = False


def _progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


class Engine(ABC):
    """Runs one training task from a resolved config (see the module docstring).

    Args:
        config: a resolved config of a single run; deep-copied (tasks may fill in values
            measured from the data before it is saved).
        out_dir: run directory (default :meth:`default_out_dir`).
        rank / world_size: this process's place among the training processes.
        quiet: no progress bar nor progress lines.
        log: where progress lines go when there is no terminal for a progress bar.
    """

    #: Config keys that may change between an interrupted run and its resumption (they do
    #: not change the trajectory up to the checkpoint); a key ending in "." names a section.
    resumable_changes: tuple[str, ...] = ()
    #: The task's config schema (defaults): a checkpoint's config is resolved again with it
    #: before the resume comparison, so fields added since it was written do not count.
    schema: Mapping[str, Any] = {}
    #: Event name of the periodic evaluation records in ``metrics.jsonl``.
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
    ) -> None:
        self.config = copy.deepcopy(dict(config))
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.quiet = quiet
        self.show_bar = self.is_main and _progress_enabled(quiet)
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.out_dir = Path(out_dir) if out_dir is not None else self.default_out_dir(config)
        self.run_dir: RunDir | None = None
        train = self.config["train"]
        self.device = resolve_device(train["device"])
        if train.get("threads") is not None:  # small models on a busy CPU: fewer is faster
            torch.set_num_threads(train["threads"])
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.model: nn.Module | None = None
        self.train_time_s = 0.0  # wall time spent in training steps (not in evaluation)
        self._started = time.perf_counter()

    # -- what a task supplies ----------------------------------------------------------------

    @staticmethod
    @abstractmethod
    def default_out_dir(config: Mapping[str, Any]) -> Path:
        """Run directory when none is given."""

    @property
    @abstractmethod
    def total_steps(self) -> int:
        """Number of optimiser steps of the whole run."""

    @property
    def eval_every(self) -> int:
        """Evaluate every this many steps (0: never periodically)."""
        return 0

    @property
    def final_evaluation(self) -> bool:
        """Whether to evaluate after the last step as well."""
        return False

    @abstractmethod
    def prepare(self) -> None:
        """Load the data (before seeding, before any file is written: bad data fails early)."""

    @abstractmethod
    def fingerprints(self) -> dict[str, str]:
        """Content fingerprints of the data (saved in checkpoints, checked on resume)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train (called right after seeding ``train.seed``)."""

    @abstractmethod
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimiser of ``model``'s parameters, at the base learning rate."""

    @abstractmethod
    def lr_schedule(self) -> LRFactor:
        """The learning-rate multiplier per step."""

    @abstractmethod
    def build_inputs(self) -> None:
        """Build what feeds the steps (samplers, batch streams); after the model."""

    @abstractmethod
    def gradient_step(self, step: int) -> dict[str, float]:
        """Accumulate the gradients of training step ``step`` in ``.grad`` (zeroed before);
        returns its metrics (e.g. loss, accuracy), averaged over the log window."""

    def evaluate(self, step: int) -> Evaluation:
        """Evaluate the model after ``step`` steps (only called when :attr:`eval_every` or
        :attr:`final_evaluation` asks for it)."""
        raise NotImplementedError(f"{type(self).__name__} has no periodic evaluation")

    @abstractmethod
    def finish(self) -> dict[str, Any]:
        """Final evaluation after training; returns the ``results.json`` payload."""

    # -- setup -------------------------------------------------------------------------------

    def build(self) -> None:
        """Data, then (seeded) model, optimiser, schedule and inputs; step 0, no best."""
        self.prepare()
        seed_everything(self.config["train"]["seed"])
        self.model = self.build_model().to(self.device)
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_schedule())
        self.build_inputs()
        self.step, self.best = 0, None

    def setup(self, resume: bool = False) -> None:
        """:meth:`build`, then :meth:`open_run`."""
        self.build()
        self.open_run(resume)

    def open_run(self, resume: bool) -> None:
        """Open the run directory: resume from its ``last.pt`` (with ``resume`` and when there
        is one), refusing a checkpoint of another config or data; else start fresh (write the
        config and ``meta.json``)."""
        self.run_dir = RunDir(self.out_dir)
        last = self.run_dir.file(LAST)
        if resume and last.is_file():
            self.restore(last)
        elif self.is_main:
            self.run_dir.write_config(self.config)
            self.run_dir.write_meta(data=self.fingerprints())
            # The one line per run even with quiet (resuming, restore() says where instead).
            self._log(f"[{self.config.get('name')}] run directory {self.run_dir.path}")

    def restore(self, path: Path) -> None:
        """Continue the run of checkpoint ``path``: weights, optimiser, schedule, step, best,
        RNG states; the metrics log is cut back to the checkpoint's step."""
        assert self.model is not None and self.run_dir is not None, "call build() first"
        checkpoint = load_checkpoint(path, map_location=self.device)
        saved = checkpoint["config"]
        if self.schema:
            saved = normalized_config(saved, self.schema)
        check_resumable(saved, self.config, path, self.resumable_changes)
        stale = {
            name: (checkpoint["data"].get(name), current)
            for name, current in self.fingerprints().items()
            if checkpoint["data"].get(name) != current
        }
        if stale:
            raise CheckpointMismatch(
                f"cannot resume from {path}: the data changed (checkpoint vs now): {stale}"
            )
        load_model_state(self.model, checkpoint["model"], str(path))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = int(checkpoint["step"])
        self.best = checkpoint["best"]
        if checkpoint["scheduler"] is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            # The schedule follows the (possibly extended) config, not the interrupted run's.
            self.scheduler.lr_lambdas[0].steps = self.total_steps
        else:  # a checkpoint written before schedules were saved: the factor of its step
            self.scheduler.last_epoch = self.step
            for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base_lr * self.scheduler.lr_lambdas[0](self.step)
        restore_rng_state(checkpoint["rng"])
        if self.is_main:
            self.run_dir.truncate_metrics(self.step)
            self.run_dir.write_config(self.config)
            self._log(f"resumed {self.run_dir.path} at step {self.step}")

    # -- writing -----------------------------------------------------------------------------

    def save(self, name: str) -> None:
        """Checkpoint the run as ``name`` (``last.pt`` / ``best.pt``) in the run directory."""
        assert self.model is not None and self.run_dir is not None, "call setup() first"
        if self.is_main:
            save_checkpoint(
                self.run_dir.file(name),
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                step=self.step,
                config=self.config,
                data=self.fingerprints(),
                best=self.best,
            )

    def log_event(self, event: str, step: int, **values: Any) -> None:
        """Append a record to ``metrics.jsonl`` (main rank only)."""
        if self.is_main:
            assert self.run_dir is not None, "call setup() first"
            self.run_dir.log(event, step, **values)

    def say(self, message: str, bar: tqdm | None = None) -> None:
        """One progress line for the user (above the progress bar when there is one)."""
        if not self.is_main:
            return
        if self.show_bar and bar is not None:
            bar.write(message, file=sys.stderr)
        elif not self.quiet:
            self._log(message)

    def elapsed_s(self) -> float:
        """Wall time since :meth:`fit` started (or since the engine was made)."""
        return time.perf_counter() - self._started

    # -- training ----------------------------------------------------------------------------

    def step_once(self, step: int) -> dict[str, float]:
        """One optimiser step on training step ``step``; returns the task's metrics plus the
        learning rate the step used (``lr``)."""
        assert self.model is not None, "call setup() first"
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.gradient_step(step)
        self.optimizer.step()
        self.scheduler.step()
        self.train_time_s += time.perf_counter() - started
        return {**metrics, "lr": lr}

    def train(self) -> None:
        """Train from ``self.step`` to :attr:`total_steps`: log, evaluate, checkpoint."""
        train = self.config["train"]
        total, every = self.total_steps, self.eval_every
        window: list[dict[str, float]] = []
        started, first = time.perf_counter(), self.step
        name = self.config.get("name")
        with tqdm(
            total=total,
            initial=self.step,
            desc=f"train {name}",
            disable=not self.show_bar,
            dynamic_ncols=True,
        ) as bar:
            while self.step < total:
                metrics = self.step_once(self.step)
                self.step += 1
                window.append(metrics)
                bar.update(1)
                if self.step % train["log_every"] == 0 or self.step == total:
                    self._log_window(window, started, first, bar)
                    window = []
                stop = False
                if (every and self.step % every == 0) or (
                    self.step == total and self.final_evaluation
                ):
                    stop = self._evaluate(bar)
                if (
                    stop
                    or self.step == total
                    or (train["checkpoint_every"] and self.step % train["checkpoint_every"] == 0)
                ):
                    self.save(LAST)
                if stop:  # early stopping: log the unfinished window, then finish
                    if window:
                        self._log_window(window, started, first, bar)
                    break

    def _log_window(
        self, window: list[dict[str, float]], started: float, first: int, bar: tqdm
    ) -> None:
        """Log the means of the window's metrics (``lr``: the last step's)."""
        keys = [key for key in window[-1] if key != "lr"]
        means = np.mean([[metrics[key] for key in keys] for metrics in window], axis=0)
        record = {key: float(mean) for key, mean in zip(keys, means)}
        record["lr"] = window[-1]["lr"]
        bar.set_postfix({key: f"{value:.3f}" for key, value in record.items()}, refresh=False)
        self.log_event("train", self.step, **record)
        if not self.show_bar:
            rate = (self.step - first) / (time.perf_counter() - started)
            values = " ".join(f"{key} {value:.4g}" for key, value in record.items())
            self.say(
                f"[{self.config.get('name')}] step {self.step}/{self.total_steps} {values} "
                f"({rate:.1f} steps/s)"
            )

    def _evaluate(self, bar: tqdm) -> bool:
        """Evaluate, log, keep the best; whether the task asks to stop training."""
        evaluation = self.evaluate(self.step)
        if evaluation.best is not None:
            self.best = evaluation.best
        self.log_event(self.eval_event, self.step, **evaluation.values)
        self.say(evaluation.message, bar)
        if evaluation.best is not None:
            self.save(BEST)
        return evaluation.stop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Setup (or resume), train, finish; write and return ``results.json``'s payload."""
        self._started = time.perf_counter()
        self.setup(resume=resume)
        self.train()
        results = self.finish()
        if self.is_main:
            assert self.run_dir is not None
            self.run_dir.write_json(RunDir.RESULTS, results)
        return results

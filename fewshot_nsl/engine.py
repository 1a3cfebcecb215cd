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
logging                     window means every ``log_every`` steps, progress bar,
                            TensorBoard scalars (``train.tensorboard``)
evaluation cadence          every ``eval_every`` steps and (``final_evaluation``)   ``evaluate``
                            at the last step; keeps the best (``best.pt``); stops
                            early when the evaluation says so (``Evaluation.stop``)
checkpoints                 ``last.pt`` every ``checkpoint_every`` and at the end
run directory               :meth:`Engine.open_run`: start fresh / resume /
                            overwrite / refuse, under the run's lock
divergence, signals         stop at a non-finite loss, gradient or weight; SIGTERM
                            and Ctrl-C stop after the step with ``last.pt`` written
results                     ``results.json``                                        ``finish``
==========================  =====================================================  ==========

The single places a run-directory rule belongs: :meth:`Engine.check_run_dir` (what may be
done with the directory, checked before anything is created), :meth:`Engine.open_run` (lock
it, then start fresh, resume or overwrite), :meth:`Engine.save` (write a checkpoint, never a
non-finite one), :meth:`Engine.log_event` (append a metrics record), :meth:`Engine.fit`
(write ``results.json``). Only the main rank (``rank == 0``) writes files, and it holds the
directory's lock (:class:`~fewshot_nsl.runlog.RunLock`) from :meth:`Engine.open_run` until
:meth:`Engine.close` (the end of :meth:`Engine.fit`, however it ends).

Order of a run (docs/reliability.md): check the directory → build data and model (a missing
dataset fails here, before any folder exists) → lock → check again under the lock → remove
the old run (``overwrite``) and stale temp files → resume or write config/meta → train.

Reproducibility: training step ``s`` must be a pure function of the task's state and ``s``
(the tasks draw their batches and augmentation from ``(seed, s)``), so a run resumed from a
checkpoint at step ``k`` — weights, optimiser, schedule, RNG states — continues exactly.
"""

from __future__ import annotations

import copy
import math
import random
import signal
import sys
import threading
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
    CheckpointCorrupt,
    CheckpointMismatch,
    config_differences,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from fewshot_nsl.config import ConfigError, normalized_config
from fewshot_nsl.runlog import (
    RunDir,
    RunDirError,
    RunExists,
    RunLock,
    holds_run,
    remove_run,
)
from fewshot_nsl.tensorboard_log import TensorBoardLog, require_tensorboard

__all__ = [
    "Engine",
    "Evaluation",
    "LRFactor",
    "TrainingDiverged",
    "TrainingInterrupted",
    "check_resumable",
    "refuse_existing_run",
    "resolve_device",
    "seed_everything",
]

LAST = "last.pt"
BEST = "best.pt"


class TrainingDiverged(ValueError):
    """A training step produced a non-finite loss, gradient or weight; the run stopped
    there, its last finite checkpoint kept. ``step`` is the step (1-based, as logged)."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainingInterrupted(Exception):
    """The run stopped on SIGTERM or Ctrl-C after finishing a step, with ``last.pt``
    written at ``step`` in ``run_dir``; ``exit_status`` is 128 + the signal number.
    ``in_test``: the signal came during the final test (training over, ``last.pt`` already
    written), which was abandoned at once, without ``results.json``."""

    def __init__(self, signal_number: int, step: int, run_dir: Path, in_test: bool = False) -> None:
        name = signal.Signals(signal_number).name
        if in_test:  # training was over: last.pt holds the trained weights, no result written
            message = (
                f"stopped by {name} during the test after the last step ({step}); "
                f"{run_dir / LAST} holds the trained weights, no results.json written "
                "(resuming runs only the test)"
            )
        else:
            message = f"stopped by {name} at step {step}; wrote {run_dir / LAST}"
        super().__init__(message)
        self.signal_number, self.step, self.run_dir = signal_number, step, run_dir
        self.in_test = in_test
        #: The command that continues the run (the command line fills it in).
        self.resume_command = f"fewshot-nsl train --resume {run_dir}"

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number


def refuse_existing_run(path: Path) -> None:
    """:class:`~fewshot_nsl.runlog.RunExists` (naming ``--resume`` and ``--overwrite``) when
    a fresh run is aimed at ``path`` and it already holds a run."""
    if holds_run(path):
        raise RunExists(
            f"{path} already holds a run; continue it with --resume {path}, replace it "
            "with --overwrite, or choose another --out",
            path=path,
        )


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
        self.tensorboard: TensorBoardLog | None = None  # train.tensorboard: opened with the run
        if train.get("tensorboard") and self.is_main:
            require_tensorboard()  # missing package: fail now, before data and files
        self.train_time_s = 0.0  # wall time spent in training steps (not in evaluation)
        self._started = time.perf_counter()
        self._lock: RunLock | None = None
        self.built = False  # build() done (the command line builds a multi-run's first early)
        self._saved_step: int | None = None  # step of the last.pt on disk (None: none yet)
        self._stop_signal: int | None = None  # set by the SIGTERM/SIGINT handler
        self._testing = False  # in finish(): training over, last.pt written

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
        self.built = True

    def setup(self, resume: bool = False, overwrite: bool = False) -> None:
        """:meth:`check_run_dir`, :meth:`build` (unless done already), then :meth:`open_run`
        (which takes the lock)."""
        self.check_run_dir(resume, overwrite)
        if not self.built:
            self.build()
        self.open_run(resume, overwrite)

    def check_run_dir(self, resume: bool = False, overwrite: bool = False) -> None:
        """Refuse (one line, nothing created) what the run directory does not allow: another
        process holds it (:class:`~fewshot_nsl.runlog.RunDirBusy`, naming its pid); a fresh
        run into a directory that holds a run (:class:`~fewshot_nsl.runlog.RunExists`);
        resuming where ``last.pt`` is missing but the run got further (``best.pt`` or
        ``results.json`` exist). Main rank only (the others write nothing)."""
        if not self.is_main:
            return
        path = self.out_dir
        if self._lock is None:
            RunLock.check_free(path)
        if overwrite:
            return
        if resume:
            if (path / LAST).is_file():
                return
            later = [name for name in (BEST, RunDir.RESULTS) if (path / name).is_file()]
            if later:
                raise RunDirError(
                    f"cannot resume {path}: last.pt is missing but {' and '.join(later)} "
                    "exist (deleted or moved?); put last.pt back, or start the run again "
                    "with --overwrite",
                    path=path,
                )
            return
        refuse_existing_run(path)

    def open_run(self, resume: bool = False, overwrite: bool = False) -> None:
        """Lock the run directory (creating it) and open it: with ``overwrite`` remove the
        run in it first; resume from its ``last.pt`` (with ``resume`` and when there is one),
        refusing a checkpoint of another config or data; else start fresh at step 0 (write
        the config and ``meta.json``), saying so when ``resume`` found no ``last.pt``."""
        if not self.is_main:
            self.run_dir = None
            return
        self.run_dir = RunDir(self.out_dir)
        self._lock = self.run_dir.lock().acquire()
        try:
            # Again under the lock: another process may have written here since the check.
            self.check_run_dir(resume, overwrite)
            self.run_dir.cleanup_stale_temp()
            path, last = self.run_dir.path, self.run_dir.file(LAST)
            if overwrite and self.run_dir.holds_run():
                kept = remove_run(path)
                self._log(f"--overwrite: removed the run in {path}")
                if kept:
                    names = ", ".join(str(item) for item in kept[:4])
                    self._log(f"--overwrite: kept files a run does not write: {names}")
            if resume and last.is_file():
                self.restore(last)
                self._open_tensorboard()
                return
            if resume:
                self._check_saved_config()
                why = (
                    "the run stopped before its first checkpoint"
                    if self.run_dir.holds_run()
                    else "it holds no run"
                )
                self._log(f"no last.pt in {path} ({why}): starting from step 0")
                self.run_dir.truncate_metrics(0)
            self.run_dir.write_config(self.config)
            self.run_dir.write_meta(data=self.fingerprints())
            # The one line per run even with quiet (resuming, restore() says where instead).
            self._log(f"[{self.config.get('name') or path.name}] run directory {path}")
            self._open_tensorboard()
        except BaseException:
            self.close()
            raise

    def _open_tensorboard(self) -> None:
        """With ``train.tensorboard``: the TensorBoard files of the (open) run directory."""
        if self.config["train"].get("tensorboard") and self.run_dir is not None:
            self.tensorboard = TensorBoardLog(self.run_dir.path)

    def _check_saved_config(self) -> None:
        """Refuse to restart a run from step 0 with another config than its config.yaml."""
        assert self.run_dir is not None
        import yaml

        saved_path = self.run_dir.file(RunDir.CONFIG)
        if not saved_path.is_file():
            return
        saved = yaml.safe_load(saved_path.read_text()) or {}
        if self.schema:
            saved = normalized_config(saved, self.schema)
        check_resumable(saved, self.config, saved_path, self.resumable_changes)

    def close(self) -> None:
        """Close the TensorBoard files and release the run directory's lock (idempotent)."""
        if self.tensorboard is not None:  # flush the TensorBoard files
            self.tensorboard.close()
            self.tensorboard = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def restore(self, path: Path) -> None:
        """Continue the run of checkpoint ``path``: weights, optimiser, schedule, step, best,
        RNG states; the metrics log is cut back to the checkpoint's step; ``best.pt`` is
        verified (see :meth:`_check_best`)."""
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
        self._saved_step = self.step
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
        self._check_best()
        if self.is_main:
            self.run_dir.truncate_metrics(self.step)
            self.run_dir.write_config(self.config)
            self._log(f"resumed {self.run_dir.path} at step {self.step}")

    def _check_best(self) -> None:
        """On resume, the ``best.pt`` that ``last.pt``'s best record points to must be there
        and intact (else the test would silently use other weights, or fail at the very end
        of every resumed run). A ``best.pt`` from after ``last.pt`` (a run killed between
        the two writes) is the best validation of this same trajectory so far: its record
        is kept as the best."""
        assert self.run_dir is not None
        if self.best is None:
            return
        path = self.run_dir.path
        best_path = self.run_dir.file(BEST)
        recover = (
            f"restore best.pt from a backup, or train the run again with --overwrite "
            f"(train --out {path} --overwrite ...)"
        )
        try:
            state = load_checkpoint(best_path, map_location="cpu")
        except FileNotFoundError:
            raise RunDirError(
                f"cannot resume {path}: best.pt (the weights validation chose at step "
                f"{self.best.get('step')}) is missing; {recover}",
                path=path,
            ) from None
        except CheckpointCorrupt as error:
            raise RunDirError(
                f"cannot resume {path}: best.pt is damaged ({str(error).split(': ', 1)[-1]}); "
                f"{recover}",
                path=path,
            ) from None
        saved_best, best_step = state.get("best"), int(state["step"])
        if best_step == self.best.get("step"):
            return
        if best_step > self.step and saved_best is not None:
            self._log(
                f"best.pt is from step {best_step}, after last.pt (step {self.step}): "
                "keeping it as the best so far"
            )
            self.best = saved_best
            return
        raise RunDirError(
            f"cannot resume {path}: best.pt is from step {best_step} but last.pt records the "
            f"best at step {self.best.get('step')} (files of different runs?); {recover}",
            path=path,
        )

    # -- writing -----------------------------------------------------------------------------

    def save(self, name: str) -> None:
        """Checkpoint the run as ``name`` (``last.pt`` / ``best.pt``) in the run directory;
        a state holding NaN/inf is refused (:class:`~fewshot_nsl.checkpoint.NonFiniteState`),
        the previous file kept."""
        assert self.model is not None, "call setup() first"
        if self.is_main:
            assert self.run_dir is not None, "call setup() first"
            save_checkpoint(
                self.run_dir.file(name),
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                step=self.step,
                config=self.config,
                data=self.fingerprints(),
                best=self.best,
                require_finite=True,
            )
        if name == LAST:
            self._saved_step = self.step

    def log_event(self, event: str, step: int, **values: Any) -> None:
        """Append a record to ``metrics.jsonl`` (main rank only)."""
        if self.is_main:
            assert self.run_dir is not None, "call setup() first"
            self.run_dir.log(event, step, **values)
            if self.tensorboard is not None:  # the same scalars, as TensorBoard files
                self.tensorboard.log(event, step, values)

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
        bad = [key for key, value in metrics.items() if not math.isfinite(value)]
        if bad:
            self._diverged(step, f"the {bad[0]} is {metrics[bad[0]]}")
        self._check_finite(step, "gradient", {n: p.grad for n, p in self.model.named_parameters()})
        self.optimizer.step()
        self._check_finite(step, "weight", dict(self.model.named_parameters()))
        self.scheduler.step()
        self.train_time_s += time.perf_counter() - started
        return {**metrics, "lr": lr}

    def _check_finite(
        self, step: int, what: str, tensors: Mapping[str, torch.Tensor | None]
    ) -> None:
        """:meth:`_diverged` when a tensor of ``tensors`` holds NaN/inf (one device sync)."""
        present = {name: t for name, t in tensors.items() if t is not None}
        if not present:
            return
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(t).all() for t in present.values()])
        if not bool(finite.all()):
            name = list(present)[int((~finite).nonzero()[0])]
            self._diverged(step, f"the {what} of {name} is not finite")

    def _diverged(self, step: int, what: str) -> None:
        """:class:`TrainingDiverged` for training step ``step`` (0-based; said 1-based)."""
        kept = (
            f"the last finite checkpoint is {self.out_dir / LAST} (step {self._saved_step})"
            if self._saved_step is not None
            else "no checkpoint was written"
        )
        raise TrainingDiverged(
            f"training diverged at step {step + 1}: {what} (lower train.lr or the "
            f"learner's learning rate); stopped, {kept}",
            step=step + 1,
        )

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
                self._stop_if_asked()
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
            self._stop_if_asked()

    def stop_requested(self) -> bool:
        """Whether a SIGTERM / Ctrl-C asked the run to stop (the distributed trainer makes
        every rank agree)."""
        return self._stop_signal is not None

    def _stop_if_asked(self, in_test: bool = False) -> None:
        """After a finished step (or the final test, ``in_test``): on SIGTERM / Ctrl-C
        write ``last.pt`` (unless it is of this step already) and raise
        :class:`TrainingInterrupted`."""
        if not self.stop_requested():
            return
        if self._saved_step != self.step:
            self.save(LAST)
        raise TrainingInterrupted(
            self._stop_signal or signal.SIGTERM, self.step, self.out_dir.resolve(), in_test
        )

    @property
    def stop_test_at_once(self) -> bool:
        """Whether a SIGTERM / Ctrl-C during the final test stops it at once (from the signal
        handler). Else the test finishes and the run stops without writing results (the
        distributed trainer: its ranks must leave the test's collectives together)."""
        return True

    def _handle_stop_signal(self, signal_number: int, frame: Any) -> None:
        """SIGTERM / first Ctrl-C: stop after the current step; during the final test, at
        once (:attr:`stop_test_at_once`). A second Ctrl-C stops at once
        (``KeyboardInterrupt``), resumable from the last checkpoint."""
        if signal_number == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signal_number
        if self._testing and self.stop_test_at_once:
            # Nothing to finish: last.pt holds the trained weights; the test starts over.
            raise TrainingInterrupted(
                signal_number, self.step, self.out_dir.resolve(), in_test=True
            )
        if self.is_main:
            after = "the test, writing no results" if self._testing else "this step"
            print(
                f"\nfewshot-nsl: {signal.Signals(signal_number).name}: stopping after {after} "
                "(Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

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
        # Finite weights can still score inf/NaN (overflowing logits): that model diverged too,
        # and its record must not become the best (a best.pt is never non-finite).
        bad = [
            key
            for key, value in evaluation.values.items()
            if isinstance(value, float) and not math.isfinite(value)
        ]
        if bad:
            self._diverged(
                self.step - 1, f"the {self.eval_event} {bad[0]} is {evaluation.values[bad[0]]}"
            )
        self.log_event(self.eval_event, self.step, **evaluation.values)
        if evaluation.best is not None:
            self.best = evaluation.best
        self.say(evaluation.message, bar)
        if evaluation.best is not None:
            self.save(BEST)
        return evaluation.stop

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Setup (fresh, resumed or overwriting), train, finish; write and return
        ``results.json``'s payload. The run directory stays locked throughout; SIGTERM and
        Ctrl-C stop it after a step (:class:`TrainingInterrupted`)."""
        self._started = time.perf_counter()
        handlers = self._install_signal_handlers()
        try:
            self.setup(resume=resume, overwrite=overwrite)
            self.train()
            self._testing = True
            try:
                results = self.finish()
            finally:
                self._testing = False
            # A stop asked during a test that was not cut short: no result, the resume
            # runs the test again.
            self._stop_if_asked(in_test=True)
            if self.is_main:
                assert self.run_dir is not None
                self.run_dir.write_json(RunDir.RESULTS, results)
            return results
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
            self.close()

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Route SIGTERM and SIGINT to :meth:`_handle_stop_signal`; the previous handlers
        (to put back). Only the main thread can set handlers: elsewhere, none."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        self._stop_signal = None
        return {
            number: signal.signal(number, self._handle_stop_signal)
            for number in (signal.SIGTERM, signal.SIGINT)
        }

"""The config schema of few-shot meta-learning runs (``fewshot-nsl train`` / ``eval``).

Loaded with the generic engine of :mod:`fewshot_nsl.config` (defaults ← YAML ← dotted
overrides); every key is documented in ``docs/cli.md``. The ``learner`` section is checked
against the learner registry (``list_learners``, ``learner_options``, ``BN_POLICIES``): its
options are those of the named learner, typed like their defaults, all filled in.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fewshot_nsl.config import (
    ConfigError,
    Field,
    Open,
    check_device,
    check_value,
    iter_runs,
    load_config,
    milestones,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_config,
)
from fewshot_nsl.model_config import check_backbone, check_conv

__all__ = [
    "FEWSHOT_DEFAULTS",
    "GRAD_CLIP_MODES",
    "LR_SCHEDULES",
    "SELECTION_METRICS",
    "iter_seed_runs",
    "META_BATCH_MODES",
    "load_fewshot_config",
    "resolve_fewshot_config",
    "seed_run_dir",
]

LR_SCHEDULES = ("constant", "cosine", "step")
#: How ``train.grad_clip`` clips the meta-gradient: its global L2 norm
#: (``clip_grad_norm_``), or every element to ``[-c, c]`` (``clip_grad_value_``; cbfinn/maml's
#: ``tf.clip_by_value(grad, -10, 10)`` on Mini-ImageNet).
GRAD_CLIP_MODES = ("norm", "value")
#: The validation metric that chooses ``best.pt`` (and that ``train.patience`` watches).
SELECTION_METRICS = ("val_accuracy", "val_loss")
#: How the tasks of a meta-batch run (``train.meta_batch``): one after another (the reference),
#: or together under ``torch.func.vmap`` where the learner supports it (same results to float
#: rounding; :mod:`fewshot_nsl.learners.vectorised`).
META_BATCH_MODES = ("sequential", "vectorised")


def _datasets() -> list[str]:
    from episodes import list_datasets

    return list(list_datasets())


def _check_learner(learner: dict[str, Any]) -> dict[str, Any]:
    """Name among the registered learners; options among its keyword arguments, typed like
    their defaults. Returns the section with every option filled in (an explicit record)."""
    from fewshot_nsl.learners import BN_POLICIES, learner_options, list_learners

    name = learner.get("name")
    if name not in list_learners():
        raise ConfigError(f"learner.name: got {name!r}; allowed: {list_learners()}")
    allowed = learner_options(name)
    resolved: dict[str, Any] = {"name": name}
    for key, value in learner.items():
        if key == "name":
            continue
        if key not in allowed:
            raise ConfigError(
                f"learner.{key}: unknown option for learner {name!r}; allowed options: "
                f"{sorted(allowed)}"
            )
        resolved[key] = check_value(f"learner.{key}", value, allowed[key])
    for key, default in allowed.items():
        if key not in resolved:
            resolved[key] = list(default) if isinstance(default, tuple) else default
    for key, value in resolved.items():  # NaN/inf options make every step NaN; rates are > 0
        if isinstance(value, float):
            try:
                positive_float(value) if key.endswith("lr") else _finite(value)
            except ValueError as error:
                raise ConfigError(f"learner.{key}: {error}") from None
    if "bn" in resolved and resolved["bn"] not in BN_POLICIES:  # the inner-loop BN policy
        raise ConfigError(f"learner.bn: got {resolved['bn']!r}; allowed: {list(BN_POLICIES)}")
    return resolved


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def _shot_list(value: list[Any]) -> list[int]:
    if not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(f"must be a non-empty list of ints >= 1, got {value!r}")
    return [int(v) for v in value]


def _seed_list(value: list[Any]) -> list[int]:
    if not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"must be a non-empty list of ints >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"must not repeat a seed, got {value!r}")
    return [int(v) for v in value]


FEWSHOT_DEFAULTS: dict[str, Any] = {
    "name": Field(None, types=(str, None)),
    "reference": Open(),
    "data": {
        "dataset": Field("synthetic", choices=_datasets),
        "root": Field(None, types=(str, None)),
        "options": Open(follows="dataset"),  # another dataset: not the old one's options
        "augment": False,
    },
    "episodes": {
        "way": Field(5, check=positive_int),
        "shot": Field(1, check=positive_int),
        "query": Field(15, check=positive_int),
        "tasks_per_batch": Field(4, check=positive_int),
        "val_episodes": Field(100, check=non_negative_int),
        "test_episodes": Field(600, check=positive_int),
        "test_shots": Field([1, 5], check=_shot_list),
        "test_query": Field(15, check=positive_int),
        # Way of the validation and test episodes (null: episodes.way). ProtoNet's reference
        # trains with more ways than it tests (30/20/60-way training, 5-way test).
        "test_way": Field(None, types=(int, None), check=positive_int),
        # Queries per class of the validation episodes (null: episodes.query).
        "val_query": Field(None, types=(int, None), check=positive_int),
        "eval_seed": Field(0, check=non_negative_int),
        "manifest": Field(None, types=(str, None)),
    },
    "model": {
        "backbone": Field("conv4", check=check_backbone),
        "backbone_options": Open({"filters": 32}),
        "conv": Open({"kind": "plain"}, check=check_conv),
    },
    "learner": Open({"name": "maml"}, check=_check_learner, switch_key="name"),
    "train": {
        "steps": Field(60000, check=positive_int),
        "lr": Field(1e-3, types=(float,), check=positive_float),
        "lr_schedule": Field("constant", choices=LR_SCHEDULES),
        "lr_milestones": Field([], check=milestones),
        "lr_gamma": 0.1,
        # null: no clipping; else the max global gradient norm (> 0: 0 would zero every step)
        # null: no clipping; else > 0 (0 would zero every step), see grad_clip_mode
        "grad_clip": Field(None, types=(float, None), check=positive_float),
        "grad_clip_mode": Field("norm", choices=GRAD_CLIP_MODES),
        "select_by": Field("val_accuracy", choices=SELECTION_METRICS),
        # Early stopping: stop once more than this many validations in a row brought no new
        # best (null: never; jakesnell/prototypical-networks: patience 200, `wait > patience`).
        "patience": Field(None, types=(int, None), check=non_negative_int),
        "meta_batch": Field("sequential", choices=META_BATCH_MODES),
        "compile": False,
        "val_every": Field(1000, check=non_negative_int),
        "checkpoint_every": Field(1000, check=non_negative_int),
        "log_every": Field(50, check=positive_int),
        "seed": Field(0, check=non_negative_int),
        "seeds": Field(None, types=(list, None), check=_seed_list),
        "device": Field("auto", check=check_device),
        "threads": Field(None, types=(int, None), check=positive_int),
        "out_dir": Field(None, types=(str, None)),
        "tensorboard": False,
    },
}


def resolve_fewshot_config(
    file_config: Mapping[str, Any] | None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """:func:`fewshot_nsl.config.resolve_config` with the few-shot schema."""
    return resolve_config(file_config, overrides, FEWSHOT_DEFAULTS)


def load_fewshot_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """:func:`fewshot_nsl.config.load_config` with the few-shot schema."""
    return load_config(path, overrides, FEWSHOT_DEFAULTS)


def seed_run_dir(root: str | Path, seed: int) -> Path:
    """The folder of training seed ``seed``'s run inside ``root``: ``root/seed-S``."""
    return Path(root) / f"seed-{seed}"


def iter_seed_runs(config: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(name, config)`` of every single run to train: :func:`~fewshot_nsl.config.iter_runs`,
    where a run with ``train.seeds`` becomes one run per seed ``S``: ``train.seed = S``,
    ``train.seeds = None``, ``train.out_dir = OUT/seed-S`` (``OUT``: the run's
    ``train.out_dir``, which must be set), named ``NAME/seed-S``; its ``name`` is kept, so
    ``report`` groups the seeds under it."""
    for name, run in iter_runs(config):
        seeds = run["train"].get("seeds")
        if not seeds:
            yield name, run
            continue
        out_dir = run["train"]["out_dir"]
        if out_dir is None:
            raise ConfigError(f"{name}: train.seeds needs train.out_dir (or --out) to be set")
        for seed in seeds:
            seeded = copy.deepcopy(run)
            seeded["train"].update(seed=seed, seeds=None, out_dir=str(seed_run_dir(out_dir, seed)))
            yield f"{name}/seed-{seed}", seeded

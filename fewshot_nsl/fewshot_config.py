"""The config schema of few-shot meta-learning runs (``fewshot-nsl train`` / ``eval``).

Loaded with the generic engine of :mod:`fewshot_nsl.config` (defaults ← YAML ← dotted
overrides); every key is documented in ``docs/cli.md``. The ``learner`` section is checked
against the learner registry (``list_learners``, ``learner_options``, ``BN_POLICIES``): its
options are those of the named learner, typed like their defaults, all filled in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fewshot_nsl.config import (
    ConfigError,
    Field,
    Open,
    check_device,
    check_value,
    load_config,
    milestones,
    non_negative_int,
    positive_int,
    resolve_config,
)
from fewshot_nsl.model_config import check_backbone, check_conv

__all__ = [
    "FEWSHOT_DEFAULTS",
    "LR_SCHEDULES",
    "META_BATCH_MODES",
    "load_fewshot_config",
    "resolve_fewshot_config",
]

LR_SCHEDULES = ("constant", "cosine", "step")
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
    if "bn" in resolved and resolved["bn"] not in BN_POLICIES:  # the inner-loop BN policy
        raise ConfigError(f"learner.bn: got {resolved['bn']!r}; allowed: {list(BN_POLICIES)}")
    return resolved


def _shot_list(value: list[Any]) -> list[int]:
    if not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(f"must be a non-empty list of ints >= 1, got {value!r}")
    return [int(v) for v in value]


FEWSHOT_DEFAULTS: dict[str, Any] = {
    "name": Field(None, types=(str, None)),
    "reference": Open(),
    "data": {
        "dataset": Field("synthetic", choices=_datasets),
        "root": Field(None, types=(str, None)),
        "options": Open(),
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
        "steps": Field(60000, check=non_negative_int),
        "lr": Field(1e-3, types=(float,)),
        "lr_schedule": Field("constant", choices=LR_SCHEDULES),
        "lr_milestones": Field([], check=milestones),
        "lr_gamma": 0.1,
        "grad_clip": Field(None, types=(float, None)),
        "meta_batch": Field("sequential", choices=META_BATCH_MODES),
        "compile": False,
        "val_every": Field(1000, check=non_negative_int),
        "checkpoint_every": Field(1000, check=non_negative_int),
        "log_every": Field(50, check=positive_int),
        "seed": Field(0, check=non_negative_int),
        "device": Field("auto", check=check_device),
        "threads": Field(None, types=(int, None), check=positive_int),
        "out_dir": Field(None, types=(str, None)),
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

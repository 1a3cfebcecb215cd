"""The config schema of supervised runs (``fewshot-nsl train-supervised``).

Loaded with :func:`fewshot_nsl.config.load_config` (defaults ← YAML ← dotted overrides); the
optimisation defaults are the NSL authors' CIFAR recipe (method doc §2), on the built-in
synthetic glyphs; the M penalty (5e-3 on ``M - I``), the zero-padded crop and the
standardised input are the toolkit's (the CIFAR configs set the authors' ones).
Every key is documented in ``docs/supervised.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fewshot_nsl.config import (
    Field,
    Open,
    check_device,
    load_config,
    milestones,
    non_negative_int,
    positive_float,
    positive_int,
)
from fewshot_nsl.model_config import check_backbone, check_conv
from fewshot_nsl.supervised.data import CROP_PADDINGS, DATASETS, INPUT_SCALES
from fewshot_nsl.supervised.model import HEADS

#: What the L2 penalty on the similarity matrices pulls ``M`` towards (docs/supervised.md).
PENALTY_TARGETS = ("zero", "identity")


def _non_negative_float(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number >= 0, got {value}")
    return value


def _channel_floats(value: list[Any]) -> list[float]:
    if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"must be a non-empty list of numbers (one per channel), got {value!r}")
    return [float(v) for v in value]


def _image_shape(value: list[Any]) -> list[int]:
    if len(value) != 3 or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ValueError(f"must be [C, H, W] (3 positive ints), got {value!r}")
    return [int(v) for v in value]


SUPERVISED_DEFAULTS: dict[str, Any] = {
    "name": Field(None, types=(str, None)),
    # What the config reproduces (paper, code, published number, deviations); not used by
    # the run, shown by `fewshot-nsl list configs` (the few-shot schema has the same key).
    "reference": Open(),
    "data": {
        "dataset": Field("synthetic", choices=DATASETS),
        "root": Field(None, types=(str, None)),
        # synthetic only: num_classes, train_per_class, test_per_class, image_size,
        # channels, seed (see fewshot_nsl.supervised.data.load_synthetic)
        "options": Open(follows="dataset"),  # another dataset: not the old one's options
        "augment": True,
        # Border of the pad-4 crop: zeros, or the authors' tf.pad(..., "SYMMETRIC") mirror.
        "crop_padding": Field("zeros", choices=CROP_PADDINGS),
        # What the network sees: train-set standardised pixels, or the authors' raw 0..255
        # (then data.mean/std are filled in as 0 and 1/255).
        "input_scale": Field("standardized", choices=INPUT_SCALES),
        # Filled in from the train images by the run (null = compute); when given, the
        # given mean/std are used and num_classes/image_shape are checked against the data.
        "mean": Field(None, types=(list, None), check=_channel_floats),
        "std": Field(None, types=(list, None), check=_channel_floats),
        "num_classes": Field(None, types=(int, None), check=positive_int),
        "image_shape": Field(None, types=(list, None), check=_image_shape),
    },
    "model": {
        "backbone": Field("cnn9", check=check_backbone),
        "backbone_options": Open(),
        "conv": Open({"kind": "plain"}, check=check_conv),
        "head": Field("backbone", choices=HEADS),
    },
    "train": {
        "iterations": Field(42500, check=positive_int),
        "batch_size": Field(128, check=positive_int),
        "lr": Field(0.1, types=(float,), check=positive_float),
        "lr_milestones": Field([20000, 30000, 37500], check=milestones),
        "lr_gamma": Field(0.1, types=(float,), check=_non_negative_float),
        # Linear warm-up over the first N iterations; 0 (the recipe) = none.
        "warmup_iterations": Field(0, check=non_negative_int),
        "momentum": Field(0.9, types=(float,), check=_non_negative_float),
        "nesterov": False,
        "weight_decay": Field(5e-4, types=(float,), check=_non_negative_float),
        "similarity_penalty": Field(5e-3, types=(float,), check=_non_negative_float),
        "penalty_target": Field("identity", choices=PENALTY_TARGETS),
        "label_smoothing": Field(0.01, types=(float,), check=_non_negative_float),
        "seed": Field(0, check=non_negative_int),
        "device": Field("auto", check=check_device),
        "threads": Field(None, types=(int, None), check=positive_int),
        "log_every": Field(100, check=positive_int),
        "eval_every": Field(2500, check=non_negative_int),
        "checkpoint_every": Field(2500, check=non_negative_int),
        "out_dir": Field(None, types=(str, None)),
    },
    "eval": {
        "batch_size": Field(500, check=positive_int),
        "speed_batch_size": Field(128, check=positive_int),
        "speed_rounds": Field(5, check=non_negative_int),
        "speed_repeats": Field(3, check=positive_int),
    },
}


def load_supervised_config(path: str | Path, overrides: list[str] | tuple = ()) -> dict[str, Any]:
    """Load a ``train-supervised`` YAML config (defaults ← file ← overrides), validated."""
    return load_config(path, list(overrides), SUPERVISED_DEFAULTS)

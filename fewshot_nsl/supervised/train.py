"""Supervised training of CNN / static NSN / dynamic NSN classifiers (method doc §2 and §4).

The recipe is the NSL authors' CIFAR one: SGD with momentum 0.9, batch 128, learning rate 0.1
multiplied by 0.1 at 20k / 30k / 37.5k of 42.5k iterations, weight decay 5e-4 on every
parameter except the similarity matrices ``M``, label smoothing 0.01, pad-4 random crop
(``data.crop_padding``) + horizontal flip. The ``M`` penalty is configurable: the toolkit's
default is 5e-3·‖M − I‖²; the authors' is 2.5e-3·‖M‖² on a static full ``M`` only
(``train.similarity_penalty``/``penalty_target``; see docs/supervised.md).

Reproducibility: the model is initialised from ``train.seed``; train batch ``i`` and its
augmentation are pure functions of ``(train.seed, i)`` (see :class:`TrainBatches`), so a run
resumed from a checkpoint at iteration ``k`` continues exactly the same stream.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from episodes.transforms import Compose, Normalize
from fewshot_nsl.engine import Engine, Evaluation, LRFactor
from fewshot_nsl.nn import fold_model, similarity_penalty
from fewshot_nsl.supervised.config import SUPERVISED_DEFAULTS
from fewshot_nsl.supervised.data import (
    ClassificationData,
    TrainBatches,
    crop_flip_augmentation,
    input_statistics,
    iterate_batches,
    load_data,
    to_float_images,
)
from fewshot_nsl.supervised.model import (
    count_parameters,
    model_from_config,
    parameter_groups,
    plain_twin_config,
)
from fewshot_nsl.supervised.speed import compare_throughput


def run_dir_for(config: Mapping[str, Any]) -> Path:
    """``train.out_dir``, else ``runs/supervised/NAME``."""
    name = str(config.get("name") or "run")
    return Path(config["train"]["out_dir"] or Path("runs") / "supervised" / name)


def train_transform(
    image_shape: tuple[int, int, int],
    augment: bool,
    normalize: Normalize,
    crop_padding: str = "zeros",
) -> Compose:
    """Pad-4 random crop (border: ``crop_padding``, :data:`CROP_PADDINGS`) + horizontal flip
    (if ``augment``), then ``normalize``."""
    steps = crop_flip_augmentation(image_shape, 4, crop_padding) if augment else []
    return Compose([*steps, normalize])


def record_data_properties(data_config: dict[str, Any], data: ClassificationData) -> None:
    """Fill ``data.{mean,std,num_classes,image_shape}`` of a config from ``data``, in place.

    The resolved config then holds all that a checkpoint needs to rebuild (and export) the
    model without reading the data again. Values already set are kept (mean/std) or checked
    against the data (num_classes, image_shape). mean/std follow ``data.input_scale``
    (:func:`input_statistics`: the train statistics, or 0 and 1/255 for raw pixels).
    """
    for key, actual in (
        ("num_classes", data.num_classes),
        ("image_shape", list(data.image_shape)),
    ):
        given = data_config.get(key)
        if given is not None and list(np.atleast_1d(given)) != list(np.atleast_1d(actual)):
            raise ValueError(f"data.{key} is {given} but the {data.name} data has {actual}")
        data_config[key] = actual
    channels = data.image_shape[0]
    mean, std = input_statistics(data, data_config.get("input_scale", "standardized"))
    for key, statistic in (("mean", mean), ("std", std)):
        if data_config.get(key) is None:
            data_config[key] = [float(v) for v in statistic]
        if len(data_config[key]) != channels:
            raise ValueError(
                f"data.{key} has {len(data_config[key])} values, the images have {channels} "
                "channels"
            )


def classification_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float,
    penalty_weight: float,
    penalty_target: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy with label smoothing plus the weighted ``M`` penalty; also the logits."""
    logits = model(images)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if penalty_weight:
        penalty = similarity_penalty(model, relative_to_identity=penalty_target == "identity")
        loss = loss + penalty_weight * penalty
    return loss, logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    normalize: Normalize,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Test error (fraction misclassified), mean cross-entropy and predictions in eval mode.

    Args:
        images: uint8 ``(N, H, W, C)``; labels: int64 ``(N,)``.

    Returns:
        ``{"error": float, "loss": float, "predictions": int64 tensor (N,)}``.
    """
    was_training = model.training
    model.eval()
    predictions, loss_sum = [], 0.0
    try:
        for batch, batch_labels in iterate_batches(images, labels, batch_size):
            logits = model(normalize(batch.to(device)))
            loss_sum += F.cross_entropy(logits, batch_labels.to(device), reduction="sum").item()
            predictions.append(logits.argmax(1).cpu())
    finally:
        model.train(was_training)
    predicted = torch.cat(predictions)
    errors = (predicted != torch.as_tensor(labels)).sum().item()
    return {"error": errors / len(labels), "loss": loss_sum / len(labels), "predictions": predicted}


class SupervisedTrainer(Engine):
    """The supervised classification task of the training engine (:mod:`fewshot_nsl.engine`).

    Supplies the data (and fills ``data.{mean,std,num_classes,image_shape}`` of its config
    copy), the model, SGD with the recipe's parameter groups, the step schedule with warm-up,
    one SGD step per training batch, and the test-split evaluation every ``train.eval_every``
    iterations and at the end.

    Args:
        config: a resolved config (:data:`fewshot_nsl.supervised.SUPERVISED_DEFAULTS` layout).
        out_dir: run directory (default :func:`run_dir_for`).
        data: preloaded data (tests and benchmarks reuse one dataset across models); loaded
            from ``config["data"]`` when ``None``.
        quiet, log: as for :class:`~fewshot_nsl.engine.Engine`.
    """

    #: Keys that may change between an interrupted run and its resumption: they do not
    #: change the trajectory up to the checkpoint.
    resumable_changes = (
        "name",
        "train.iterations",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.device",
        "train.threads",
        "train.out_dir",
        "eval.",
    )
    schema = SUPERVISED_DEFAULTS
    eval_event = "test"
    final_evaluation = True

    def __init__(
        self,
        config: Mapping[str, Any],
        out_dir: str | Path | None = None,
        *,
        data: ClassificationData | None = None,
        quiet: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config, out_dir, quiet=quiet, log=log)
        self.data = data
        self._evaluated: tuple[int, dict[str, Any]] | None = None  # (step, result) of the last

    default_out_dir = staticmethod(run_dir_for)

    @property
    def total_steps(self) -> int:
        return self.config["train"]["iterations"]

    @property
    def iteration(self) -> int:
        """Training iterations done (the engine's step)."""
        return self.step

    @property
    def eval_every(self) -> int:
        return self.config["train"]["eval_every"]

    def prepare(self) -> None:
        data_config = self.config["data"]
        if self.data is None:
            self.data = load_data(
                data_config["dataset"], data_config["root"], **dict(data_config["options"] or {})
            )
        record_data_properties(data_config, self.data)

    def fingerprints(self) -> dict[str, str]:
        assert self.data is not None, "call build() first"
        return {"train+test": self.data.fingerprint}

    def build_model(self) -> nn.Module:
        return model_from_config(self.config)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        train = self.config["train"]
        return torch.optim.SGD(
            parameter_groups(model, train["weight_decay"]),
            lr=train["lr"],
            momentum=train["momentum"],
            nesterov=bool(train["nesterov"]),
        )

    def lr_schedule(self) -> LRFactor:
        train = self.config["train"]
        return LRFactor(
            "step",
            train["iterations"],
            train["lr_milestones"],
            train["lr_gamma"],
            warmup=train["warmup_iterations"],
        )

    def build_inputs(self) -> None:
        assert self.data is not None
        train, data_config = self.config["train"], self.config["data"]
        self.batches = TrainBatches(
            self.data.train_images, self.data.train_labels, train["batch_size"], train["seed"]
        )
        self.normalize = Normalize(data_config["mean"], data_config["std"])
        self.transform = train_transform(
            self.data.image_shape,
            bool(data_config["augment"]),
            self.normalize,
            data_config["crop_padding"],
        )

    def gradient_step(self, step: int) -> dict[str, float]:
        """Gradients of the loss on train batch ``step``; its loss and accuracy."""
        assert self.model is not None, "call build() first"
        train = self.config["train"]
        uint8_images, labels = self.batches.batch(step)
        # Augmentation drawn from (seed, iteration): reproducible and resumable.
        generator = torch.Generator().manual_seed(train["seed"] * 1_000_003 + step)
        images = self.transform(to_float_images(uint8_images), generator)
        images, labels = images.to(self.device), labels.to(self.device)
        self.model.train()
        loss, logits = classification_loss(
            self.model,
            images,
            labels,
            label_smoothing=train["label_smoothing"],
            penalty_weight=train["similarity_penalty"],
            penalty_target=train["penalty_target"],
        )
        loss.backward()  # a non-finite loss stops the run in the engine (TrainingDiverged)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        return {"loss": loss.item(), "train_accuracy": accuracy}

    def test_evaluation(self) -> dict[str, Any]:
        """Test error and loss of the current model on the data's test split."""
        assert self.model is not None and self.data is not None, "call build() first"
        if self._evaluated is not None and self._evaluated[0] == self.step:
            return self._evaluated[1]
        result = evaluate(
            self.model,
            self.data.test_images,
            self.data.test_labels,
            self.normalize,
            batch_size=self.config["eval"]["batch_size"],
            device=self.device,
        )
        self._evaluated = (self.step, result)
        return result

    def evaluate(self, step: int) -> Evaluation:
        result = self.test_evaluation()
        return Evaluation(
            values={"test_error": result["error"], "test_loss": result["loss"]},
            message=f"[{self.config.get('name')}] iteration {step} test error "
            f"{100 * result['error']:.2f}% (loss {result['loss']:.4g})",
        )

    def finish(self) -> dict[str, Any]:
        """:meth:`summary` with the run directory and the run's name."""
        results = self.summary()
        results["run_dir"] = str(self.out_dir)
        results["name"] = self.config.get("name")
        return results

    # ----------------------------------------------------------------- report
    def summary(self) -> dict[str, Any]:
        """``results.json`` content: test error, parameter counts, inference images/s.

        Parameter counts: ``parameters`` (all learned scalars), ``nsl_parameters`` (those an NSN
        adds to the same network with plain convolutions: ``M`` matrices, similarity
        predictors) and, for a static NSN, ``folded_parameters``. Inference images/s is
        measured for the model and, for a static NSN, for its folded plain-conv copy, timed
        interleaved (:func:`compare_throughput`).
        """
        config = self.config
        assert self.model is not None and self.data is not None, "call build() first"
        result = self.test_evaluation()
        twin = model_from_config({**config, "model": plain_twin_config(config["model"])})
        total_parameters = count_parameters(self.model)
        summary: dict[str, Any] = {
            "dataset": self.data.name,
            "backbone": config["model"]["backbone"],
            "conv": dict(config["model"]["conv"]),
            "iterations": self.step,
            "test_error": result["error"],
            "test_loss": result["loss"],
            "test_images": len(self.data.test_labels),
            "parameters": total_parameters,
            "nsl_parameters": total_parameters - count_parameters(twin),
            "data_fingerprint": self.data.fingerprint,
        }
        summary["train_time_s"] = self.train_time_s
        models: dict[str, nn.Module] = {"model": self.model.eval()}
        if config["model"]["conv"].get("kind") == "static":
            folded = fold_model(copy.deepcopy(self.model)).eval()
            folded_result = evaluate(
                folded,
                self.data.test_images,
                self.data.test_labels,
                self.normalize,
                batch_size=config["eval"]["batch_size"],
                device=self.device,
            )
            summary["folded_test_error"] = folded_result["error"]
            summary["folded_parameters"] = count_parameters(folded)
            models["folded"] = folded
        speed_config = config["eval"]
        if speed_config["speed_rounds"] > 0:
            speeds = compare_throughput(
                models,
                self.data.image_shape,
                batch_size=speed_config["speed_batch_size"],
                rounds=speed_config["speed_rounds"],
                repeats=speed_config["speed_repeats"],
                device=self.device,
            )
            summary["inference_images_per_s"] = speeds["model"]["images_per_s"]
            if "folded" in speeds:
                summary["folded_inference_images_per_s"] = speeds["folded"]["images_per_s"]
                summary["folded_time_ratio"] = speeds["folded"]["time_ratio"]
        self.model.train()
        return summary

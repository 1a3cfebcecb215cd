"""Supervised training of CNN / static NSN / dynamic NSN classifiers (method doc §2 and §4).

The recipe is the NSL authors' CIFAR one: SGD with momentum 0.9, batch 128, learning rate 0.1
multiplied by 0.1 at 20k / 30k / 37.5k of 42.5k iterations, weight decay 5e-4 on every
parameter except the similarity matrices ``M``, an L2 penalty (5e-3) on ``M`` (on ``M - I`` by
default, ``train.penalty_target``; see docs/supervised.md), label smoothing 0.01, pad-4 random
crop + horizontal flip.

Reproducibility: the model is initialised from ``train.seed``; train batch ``i`` and its
augmentation are pure functions of ``(train.seed, i)`` (see :class:`TrainBatches`), so a run
resumed from a checkpoint at iteration ``k`` continues exactly the same stream.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from episodes.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip
from fewshot_nsl.nn import fold_model, similarity_penalty
from fewshot_nsl.runner import resolve_device
from fewshot_nsl.supervised.data import (
    ClassificationData,
    TrainBatches,
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

PENALTY_TARGETS = ("zero", "identity")


def train_transform(
    image_shape: tuple[int, int, int], augment: bool, normalize: Normalize
) -> Compose:
    """Pad-4 random crop + horizontal flip (if ``augment``), then ``normalize``."""
    _, height, width = image_shape
    steps = [RandomCrop((height, width), padding=4), RandomHorizontalFlip()] if augment else []
    return Compose([*steps, normalize])


def record_data_properties(data_config: dict[str, Any], data: ClassificationData) -> None:
    """Fill ``data.{mean,std,num_classes,image_shape}`` of a config from ``data``, in place.

    The resolved config then holds all that a checkpoint needs to rebuild (and export) the
    model without reading the data again. Values already set are kept (mean/std) or checked
    against the data (num_classes, image_shape).
    """
    for key, actual in (("num_classes", data.num_classes),
                        ("image_shape", list(data.image_shape))):
        given = data_config.get(key)
        if given is not None and list(np.atleast_1d(given)) != list(np.atleast_1d(actual)):
            raise ValueError(f"data.{key} is {given} but the {data.name} data has {actual}")
        data_config[key] = actual
    channels = data.image_shape[0]
    for key, statistic in (("mean", data.mean), ("std", data.std)):
        if data_config.get(key) is None:
            data_config[key] = [float(v) for v in statistic]
        if len(data_config[key]) != channels:
            raise ValueError(
                f"data.{key} has {len(data_config[key])} values, the images have {channels} "
                "channels"
            )


def lr_multiplier(
    iteration: int, milestones: list[int], gamma: float, warmup: int = 0
) -> float:
    """Step schedule ``gamma ** (number of milestones <= iteration)``, times a linear warm-up
    ``(iteration + 1) / warmup`` during the first ``warmup`` iterations (0: no warm-up)."""
    factor = gamma ** sum(iteration >= milestone for milestone in milestones)
    if warmup > 0:
        factor *= min(1.0, (iteration + 1) / warmup)
    return factor


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


class SupervisedTrainer:
    """Builds data, model and optimiser from a resolved config and runs the training loop.

    Args:
        config: a resolved config (:data:`fewshot_nsl.supervised.SUPERVISED_DEFAULTS` layout);
            copied, and its ``data.{mean,std,num_classes,image_shape}`` filled in from the data.
        data: preloaded data (tests and benchmarks reuse one dataset across models); loaded
            from ``config["data"]`` when ``None``.
    """

    def __init__(self, config: Mapping[str, Any], data: ClassificationData | None = None):
        self.config = copy.deepcopy(dict(config))
        train = self.config["train"]
        self.device = resolve_device(train["device"])
        data_config = self.config["data"]
        self.data = data if data is not None else load_data(
            data_config["dataset"], data_config["root"], **dict(data_config["options"] or {})
        )
        record_data_properties(data_config, self.data)
        torch.manual_seed(train["seed"])
        self.model = model_from_config(self.config).to(self.device)
        self.optimizer = torch.optim.SGD(
            parameter_groups(self.model, train["weight_decay"]),
            lr=train["lr"],
            momentum=train["momentum"],
            nesterov=bool(train["nesterov"]),
        )
        self.batches = TrainBatches(
            self.data.train_images, self.data.train_labels, train["batch_size"], train["seed"]
        )
        self.normalize = Normalize(data_config["mean"], data_config["std"])
        self.transform = train_transform(
            self.data.image_shape, bool(data_config["augment"]), self.normalize
        )
        self.iteration = 0
        self.train_time_s = 0.0  # wall time spent in step() (not in evaluation)

    def _set_lr(self) -> float:
        train = self.config["train"]
        lr = train["lr"] * lr_multiplier(self.iteration, train["lr_milestones"], train["lr_gamma"],
                                         train["warmup_iterations"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> dict[str, float]:
        """One SGD step on train batch ``self.iteration``; returns its loss and accuracy."""
        start = time.perf_counter()
        train = self.config["train"]
        lr = self._set_lr()
        uint8_images, labels = self.batches.batch(self.iteration)
        # Augmentation drawn from (seed, iteration): reproducible and resumable.
        generator = torch.Generator().manual_seed(train["seed"] * 1_000_003 + self.iteration)
        images = self.transform(to_float_images(uint8_images), generator)
        images, labels = images.to(self.device), labels.to(self.device)
        self.model.train()
        loss, logits = classification_loss(
            self.model, images, labels,
            label_smoothing=train["label_smoothing"],
            penalty_weight=train["similarity_penalty"],
            penalty_target=train["penalty_target"],
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at iteration {self.iteration} "
                f"(lr {lr}); lower train.lr"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        loss_value = loss.item()
        self.train_time_s += time.perf_counter() - start
        return {"loss": loss_value, "accuracy": accuracy, "lr": lr}

    def evaluate(self) -> dict[str, Any]:
        """Test error and loss of the current model on the data's test split."""
        return evaluate(
            self.model, self.data.test_images, self.data.test_labels, self.normalize,
            batch_size=self.config["eval"]["batch_size"], device=self.device,
        )

    def train(
        self,
        *,
        progress: bool = True,
        on_log: Any = None,
        on_checkpoint: Any = None,
    ) -> list[dict[str, float]]:
        """Train up to ``train.iterations``; returns the logged metric records.

        ``on_log(record)`` receives every log record (train metrics every ``log_every``
        iterations, test metrics every ``eval_every``); ``on_checkpoint(trainer)`` is called
        every ``checkpoint_every`` iterations.
        """
        train = self.config["train"]
        total = train["iterations"]
        records: list[dict[str, float]] = []
        window: list[dict[str, float]] = []
        bar = tqdm(total=total, initial=self.iteration, disable=not progress, desc="train",
                   dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        try:
            while self.iteration < total:
                window.append(self.step())
                bar.update(1)
                done = self.iteration
                if done % train["log_every"] == 0 or done == total:
                    record = {
                        "iteration": done,
                        "loss": float(np.mean([m["loss"] for m in window])),
                        "train_accuracy": float(np.mean([m["accuracy"] for m in window])),
                        "lr": window[-1]["lr"],
                        "elapsed_s": time.perf_counter() - start,
                    }
                    window = []
                    bar.set_postfix(loss=f"{record['loss']:.3f}",
                                    acc=f"{record['train_accuracy']:.3f}")
                    records.append(record)
                    if on_log is not None:
                        on_log(record)
                if train["eval_every"] and done % train["eval_every"] == 0 and done < total:
                    result = self.evaluate()
                    record = {"iteration": done, "test_error": result["error"],
                              "test_loss": result["loss"]}
                    records.append(record)
                    if on_log is not None:
                        on_log(record)
                if on_checkpoint is not None and train["checkpoint_every"] and (
                    done % train["checkpoint_every"] == 0
                ):
                    on_checkpoint(self)
        finally:
            bar.close()
        return records

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
        result = self.evaluate()
        twin = model_from_config({**config, "model": plain_twin_config(config["model"])})
        total_parameters = count_parameters(self.model)
        summary: dict[str, Any] = {
            "dataset": self.data.name,
            "backbone": config["model"]["backbone"],
            "conv": dict(config["model"]["conv"]),
            "iterations": self.iteration,
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
                folded, self.data.test_images, self.data.test_labels, self.normalize,
                batch_size=config["eval"]["batch_size"], device=self.device,
            )
            summary["folded_test_error"] = folded_result["error"]
            summary["folded_parameters"] = count_parameters(folded)
            models["folded"] = folded
        speed_config = config["eval"]
        if speed_config["speed_rounds"] > 0:
            speeds = compare_throughput(
                models, self.data.image_shape, batch_size=speed_config["speed_batch_size"],
                rounds=speed_config["speed_rounds"], repeats=speed_config["speed_repeats"],
                device=self.device,
            )
            summary["inference_images_per_s"] = speeds["model"]["images_per_s"]
            if "folded" in speeds:
                summary["folded_inference_images_per_s"] = speeds["folded"]["images_per_s"]
                summary["folded_time_ratio"] = speeds["folded"]["time_ratio"]
        self.model.train()
        return summary

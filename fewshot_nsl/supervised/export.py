"""Export a trained classifier as a self-contained ``torch.export`` program (``.pt2``).

``--fold`` replaces every static NSL layer by the ``nn.Conv2d`` carrying its effective kernel
``W_eff = Mᵀ W`` (method doc §1), so the exported network *is* a plain CNN: same predictions,
CNN speed, and loadable with ``torch.export.load`` alone — without this package.

The exported module takes float images ``(B, C, H, W)`` in [0, 1] and returns logits
``(B, num_classes)``: the dataset normalisation is part of the graph. Metadata (classes, input
shape, mean/std, the run's config) travels inside the file as ``extra_files["meta.json"]``.

Why ``torch.export`` rather than TorchScript: on torch 2.13 ``torch.jit.trace/save/load`` emit
deprecation warnings pointing to ``torch.export``; an exported program is a graph of ATen ops
(no Python code of ours inside) with a dynamic batch dimension, which
``torch.export.load(path).module()`` runs with nothing but torch. The network has no
data-dependent control flow, so the capture is exact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from episodes.fileio import check_writable
from fewshot_nsl.checkpoint import load_checkpoint, load_model_state, require_kind
from fewshot_nsl.nn import DynamicNSLConv2d, fold_model
from fewshot_nsl.runlog import atomic_write
from fewshot_nsl.supervised.model import model_from_config

META_FILE = "meta.json"


class NormalizedClassifier(nn.Module):
    """``model((x - mean) / std)`` for float images ``(B, C, H, W)`` in [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        mean_tensor = torch.tensor(list(mean), dtype=torch.float32)
        self.register_buffer("mean", mean_tensor.view(1, -1, 1, 1))
        # The same reciprocal as episodes.transforms.Normalize, so outputs match it exactly.
        inverse = (1.0 / torch.tensor(list(std), dtype=torch.float64)).float()
        self.register_buffer("inv_std", inverse.view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) * self.inv_std)


def load_trained_model(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the classifier of a ``train-supervised`` checkpoint in eval mode.

    Returns:
        ``(model, config)`` with the run's resolved config.

    Raises:
        FileNotFoundError: no file at ``checkpoint``.
        ValueError: not a fewshot-nsl checkpoint (truncated, damaged, garbage), or one of a
            few-shot (not supervised) run.
    """
    payload = load_checkpoint(checkpoint)
    require_kind(payload, "supervised", checkpoint)
    config = payload["config"]
    data = config.get("data", {}) if isinstance(config, Mapping) else {}
    missing = [
        key for key in ("num_classes", "image_shape", "mean", "std") if data.get(key) is None
    ]
    if missing or "head" not in config.get("model", {}):
        raise ValueError(
            f"{str(checkpoint)!r} is not a train-supervised checkpoint (its config lacks "
            f"{['data.' + key for key in missing] or ['model.head']})"
        )
    model = model_from_config(config)
    load_model_state(model, payload["model"], str(checkpoint))
    return model.eval(), config


def export_model(
    checkpoint: str | Path, out: str | Path, *, fold: bool = False, overwrite: bool = False
) -> Path:
    """Write the classifier of ``checkpoint`` as an exported program to ``out``; returns it.

    Args:
        checkpoint: a checkpoint written by ``fewshot-nsl train-supervised``.
        out: the ``.pt2`` file to write (parent folders are created; written atomically with
            the user's umask). An existing file is replaced only with ``overwrite``
            (``FileExistsError`` otherwise, before any work); an unwritable folder raises
            :class:`~episodes.fileio.StorageError` before the export too.
        fold: fold static NSL layers into plain convolutions (``--fold``): the file is then a
            plain CNN. A network with dynamic NSL layers or ``normalize="sphere"`` cannot be
            folded and raises ``ValueError``; without ``fold`` every layer is exported as is.
    """
    out = Path(out)
    if out.is_dir():
        raise FileExistsError(f"{out} is a folder; give the file to write, e.g. {out}/model.pt2")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (--overwrite replaces it)")
    check_writable(out.parent)
    model, config = load_trained_model(checkpoint)
    data = config["data"]
    if fold:
        dynamic = [name for name, m in model.named_modules() if isinstance(m, DynamicNSLConv2d)]
        if dynamic:
            raise ValueError(
                f"--fold: the network has dynamic NSL layers ({dynamic[0]}, ...) whose M depends "
                "on the input; only static NSNs fold into a plain CNN (export without --fold)"
            )
        model = fold_model(model)  # raises for normalize="sphere" layers (not foldable)
    wrapped = NormalizedClassifier(model, data["mean"], data["std"]).eval()
    example = torch.rand(2, *data["image_shape"], generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    meta = {
        "format": "fewshot-nsl supervised classifier",
        "input": "float images (B, C, H, W) in [0, 1]; normalisation is inside the graph",
        "image_shape": data["image_shape"],
        "num_classes": data["num_classes"],
        "mean": data["mean"],
        "std": data["std"],
        "folded": fold,
        "config": config,
    }
    extra_files = {META_FILE: json.dumps(meta)}
    return atomic_write(
        out, lambda handle: torch.export.save(program, handle, extra_files=extra_files)
    )


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported file with plain ``torch.export.load``; returns (module, metadata).

    The module maps float images ``(B, C, H, W)`` in [0, 1] to logits ``(B, num_classes)``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"exported model {str(path)!r} does not exist")
    extra = {META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra[META_FILE])

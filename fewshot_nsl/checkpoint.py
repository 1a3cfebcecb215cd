"""Checkpoints that resume exactly, written atomically.

A checkpoint is one ``torch.save`` file holding::

    {"format": "fewshot-nsl-checkpoint", "version": 1,
     "step": int,                         # outer steps completed
     "model": learner.state_dict(),
     "optimizer": ..., "scheduler": ...,  # outer Adam and LR-schedule states
     "rng": {"torch", "cuda", "numpy", "python"},
     "config": resolved config, "versions": library versions,
     "data": {"train": fingerprint, ...}, "best": {"step", "accuracy"} | None}

Episodes are a pure function of (seed, split, index), so the step counter is all the data
pipeline needs; the RNG states cover everything else that draws random numbers (dropout,
initialisation of lazily built modules). Loading uses ``torch.load(weights_only=True)``:
every entry is a tensor or a plain Python value (the numpy RNG key array is stored as a
tensor for that reason), so a checkpoint cannot run code when loaded.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_nsl.runlog import atomic_write, library_versions

__all__ = [
    "CheckpointMismatch",
    "FORMAT",
    "capture_rng_state",
    "config_differences",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "fewshot-nsl-checkpoint"
VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the config/model it is loaded into; says what differs."""


def capture_rng_state() -> dict[str, Any]:
    """The states of every global RNG a run draws from (torch CPU and CUDA, numpy, python)."""
    kind, key, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [version, list(python_state), gauss],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global RNGs back to a :func:`capture_rng_state` snapshot."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    config: Mapping[str, Any],
    data: Mapping[str, str],
    best: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of the run at ``step`` to ``path`` atomically (see module doc)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "config": dict(config),
        "versions": library_versions(),
        "data": dict(data),
        "best": dict(best) if best is not None else None,
    }
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable fewshot-nsl checkpoint (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a truncated/foreign file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"checkpoint {path} is unreadable ({type(error).__name__}: {first_line})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fewshot-nsl checkpoint (no {FORMAT!r} header)")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {payload.get('version')}, expected {VERSION}"
        )
    return payload


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """``"key: checkpoint X, config Y"`` for every dotted key whose values differ."""
    differences = []
    for key in sorted(set(saved) | set(current), key=str):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            differences.extend(config_differences(a, b, f"{dotted}."))
        elif a != b:
            differences.append(f"{dotted}: checkpoint {a!r}, config {b!r}")
    return differences


def load_model_state(model: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """``model.load_state_dict(state)`` with a :class:`CheckpointMismatch` that lists the
    missing/unexpected parameters and the shape differences instead of torch's error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{name} {tuple(state[name].shape)} vs {tuple(own[name].shape)}"
        for name in sorted(set(own) & set(state))
        if hasattr(state[name], "shape") and tuple(state[name].shape) != tuple(own[name].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in checkpoint: {_short(missing)}")
        if unexpected:
            parts.append(f"not in this model: {_short(unexpected)}")
        if shapes:
            parts.append(f"shape (checkpoint vs model): {_short(shapes)}")
        raise CheckpointMismatch(
            f"{source}: architecture mismatch, the checkpoint comes from another config: "
            + "; ".join(parts)
        )
    model.load_state_dict(state)


def _short(items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more

"""Checkpoints that resume exactly, written atomically, verified on load.

A checkpoint is one ``torch.save`` file holding::

    {"format": "fewshot-nsl-checkpoint", "version": 2,
     "sha256": content hash of everything else (see state_digest),
     "kind": "episodic" | "supervised" | None,  # written by train / train-supervised
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

The content hash is computed over the loaded values (every key, every tensor's dtype, shape
and bytes, every plain value), not over the file's bytes, so it does not depend on how torch
lays the file out and survives ``map_location``. Loading recomputes it: a truncated, foreign
or garbage file raises :class:`CheckpointCorrupt` "truncated or not a fewshot-nsl checkpoint",
a flipped bit that changes any value "content hash mismatch (file damaged)" (one line, never
torch's advice to load unsafely). Version-1 checkpoints (written before the hash and the kind
existed) still load, unverified, with ``"sha256": None``.
"""

from __future__ import annotations

import hashlib
import random
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_nsl.runlog import atomic_write, library_versions

__all__ = [
    "CheckpointCorrupt",
    "CheckpointMismatch",
    "FORMAT",
    "KINDS",
    "NonFiniteState",
    "capture_rng_state",
    "checkpoint_kind",
    "config_differences",
    "find_non_finite",
    "load_checkpoint",
    "require_kind",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "state_digest",
    "write_checkpoint_state",
]

FORMAT = "fewshot-nsl-checkpoint"
VERSION = 2
#: Versions :func:`load_checkpoint` reads (1: no envelope, no hash, no kind).
READABLE_VERSIONS = (1, 2)
#: Task kind -> the command that writes such checkpoints.
KINDS = {"episodic": "train", "supervised": "train-supervised"}


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the config/model it is loaded into; says what differs."""


class CheckpointCorrupt(ValueError):
    """A checkpoint file is truncated, damaged (hash mismatch) or not a checkpoint at all."""


class NonFiniteState(ValueError):
    """A checkpoint was not written because the state holds NaN or infinite values."""


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


def infer_kind(config: Mapping[str, Any]) -> str | None:
    """``"episodic"`` for a ``train`` config (it has ``episodes``), ``"supervised"`` for a
    ``train-supervised`` one (``train.iterations``), else None."""
    if "episodes" in config:
        return "episodic"
    train = config.get("train")
    if isinstance(train, Mapping) and "iterations" in train:
        return "supervised"
    return None


def find_non_finite(state: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating tensors (and floats) in a nested state dict that hold NaN
    or ±inf, e.g. ``["model.fc.weight", "optimizer.state.0.exp_avg"]``."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            return [] if bool(torch.isfinite(state).all()) else [prefix or "<tensor>"]
        return []
    if isinstance(state, float):
        return [] if np.isfinite(state) else [prefix or "<value>"]
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    found = []
    for key, value in items:
        found.extend(find_non_finite(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


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
    kind: str | None = None,
    require_finite: bool = False,
) -> Path:
    """Write a checkpoint of the run at ``step`` to ``path`` atomically (see module doc).

    Args:
        kind: ``"episodic"`` or ``"supervised"``; default: inferred from ``config`` (None,
            stored as such, when the config is neither).
        require_finite: refuse (:class:`NonFiniteState`, nothing written, the old file kept)
            when the model or optimizer state or ``best`` holds NaN/inf.
    Raises :class:`~episodes.fileio.StorageError` when the disk is full or the folder
    is not writable.
    """
    kind = kind if kind is not None else infer_kind(config)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"checkpoint {path}: kind must be one of {sorted(KINDS)}, got {kind!r}")
    state = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
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
    if require_finite:
        bad = find_non_finite({key: state[key] for key in ("model", "optimizer", "best")})
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise NonFiniteState(
                f"checkpoint {path} not written: non-finite values at step {step} in "
                f"{', '.join(bad[:3])}{more}"
            )
    return write_checkpoint_state(path, state)


def write_checkpoint_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write a checkpoint state (as :func:`load_checkpoint` returns it, possibly edited, or
    a version-1 one being upgraded) atomically as version 2 with a fresh content hash."""
    state = {**state, "version": VERSION}
    state.setdefault("kind", infer_kind(state.get("config") or {}))
    state["sha256"] = state_digest(state)
    return atomic_write(path, lambda handle: torch.save(state, handle))


def _corrupt(path: Path, what: str = "truncated or not a fewshot-nsl checkpoint") -> str:
    return f"checkpoint {path} is unreadable: {what}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`; returns its state
    (module doc) with ``"sha256"`` added (None for an unverified version-1 file).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointCorrupt: truncated, damaged (content hash mismatch) or garbage file.
        ValueError: a readable file that is not a fewshot-nsl checkpoint, or of an unknown
            version (all messages one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = _torch_load(path, path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointCorrupt(
            _corrupt(path, f"not a fewshot-nsl checkpoint (no {FORMAT!r} header)")
        )
    version = state.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"checkpoint {path} has format version {version}, expected one of "
            f"{list(READABLE_VERSIONS)} (written by a newer fewshot-nsl?)"
        )
    if version == 1:
        return {**state, "sha256": None}
    digest = state_digest(state)
    if digest != state.get("sha256"):
        raise CheckpointCorrupt(
            _corrupt(
                path,
                "content hash mismatch (file damaged); use another checkpoint "
                "of the run or a backup",
            )
        )
    return state


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 (hex) of a checkpoint state without its ``"sha256"`` entry: keys in sorted
    order, tensors by dtype, shape and bytes (on CPU), plain values by type and ``repr``."""
    hasher = hashlib.sha256()
    _digest_into(hasher, {key: value for key, value in state.items() if key != "sha256"})
    return hasher.hexdigest()


def _digest_into(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"T{value.dtype};{tuple(value.shape)};".encode())
        if flat.numel():
            hasher.update(flat.view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(value, Mapping):
        hasher.update(b"D%d;" % len(value))
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _digest_into(hasher, key)
            _digest_into(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(b"%s%d;" % (b"L" if isinstance(value, list) else b"U", len(value)))
        for item in value:
            _digest_into(hasher, item)
    else:  # None, bool, int, float, str, bytes: type and exact repr
        text = f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode()
        hasher.update(struct.pack("<Q", len(text)) + text)


def _torch_load(source: Path, path: Path, map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` with any failure as :class:`CheckpointCorrupt` (its
    message would advise loading unsafely, which a damaged file is no reason for)."""
    try:
        with warnings.catch_warnings():  # a damaged protocol byte makes torch warn, then fail
            warnings.simplefilter("ignore")
            return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a truncated/foreign file
        raise CheckpointCorrupt(
            _corrupt(path, f"truncated or not a fewshot-nsl checkpoint ({type(error).__name__})")
        ) from None


def checkpoint_kind(state: Mapping[str, Any]) -> str | None:
    """The task kind of a loaded checkpoint: stored (version 2) or inferred from its config."""
    kind = state.get("kind")
    if kind is None and isinstance(state.get("config"), Mapping):
        kind = infer_kind(state["config"])
    return kind


def require_kind(state: Mapping[str, Any], expected: str, source: str | Path) -> None:
    """:class:`CheckpointMismatch` (one line) unless the checkpoint ``state`` read from
    ``source`` is of task kind ``expected`` (``"episodic"`` for ``eval``)."""
    kind = checkpoint_kind(state)
    if kind != expected:
        written = f"written by `{KINDS[kind]}`" if kind in KINDS else "of unknown kind"
        raise CheckpointMismatch(
            f"{source} is a {kind or 'unknown'} checkpoint ({written}); this needs one "
            f"written by `{KINDS[expected]}`"
        )


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself for a file; for a run directory its ``best.pt`` (else ``last.pt``).
    ``FileNotFoundError`` naming what was looked for otherwise."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} is a folder without best.pt or last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


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

"""Inference throughput, measured side by side so that models share the same machine load.

On a shared CPU a single timing of model A followed by one of model B mostly measures what
the other jobs did meanwhile. :func:`compare_throughput` therefore interleaves the models
(A, B, C, A, B, C, ...) for several rounds and reports, per model, the median images/s and the
median over rounds of its time relative to a reference model timed in the same round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

Forward = Callable[[torch.Tensor], torch.Tensor] | nn.Module


def _time_forward(forward: Forward, images: torch.Tensor, repeats: int) -> float:
    """Seconds per forward pass of ``images``, the minimum over ``repeats`` passes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        forward(images)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        best = min(best, time.perf_counter() - start)
    return best


def compare_throughput(
    models: Mapping[str, Forward],
    image_shape: tuple[int, int, int],
    *,
    batch_size: int = 128,
    rounds: int = 5,
    repeats: int = 3,
    reference: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Inference images/s of several models on random images ``(batch_size, *image_shape)``.

    Models are timed as given (put them in eval mode first; a ``torch.export`` module cannot
    be switched) under ``torch.inference_mode``, in interleaved rounds after one warm-up pass
    each. Within a round each model's time is the minimum of
    ``repeats`` passes.

    Returns:
        ``{name: {"images_per_s": median over rounds, "time_ratio": median over rounds of
        time / time of reference in the same round}}``; ``reference`` defaults to the first
        model, whose ratio is 1.
    """
    if not models:
        raise ValueError("compare_throughput needs at least one model")
    reference = reference if reference is not None else next(iter(models))
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    if rounds < 1 or repeats < 1 or batch_size < 1:
        raise ValueError(
            f"rounds, repeats and batch_size must be >= 1, got {rounds}, {repeats}, {batch_size}"
        )
    images = torch.randn(batch_size, *image_shape, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(images)  # warm-up: allocator, lazy init, TorchScript profiling passes
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(_time_forward(model, images, repeats))
    results = {}
    for name, seconds in times.items():
        ratios = [own / ref for own, ref in zip(seconds, times[reference])]
        results[name] = {
            "images_per_s": batch_size / statistics.median(seconds),
            "time_ratio": statistics.median(ratios),
        }
    return results

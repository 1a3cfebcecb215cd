"""Accuracy statistics of few-shot evaluation: mean ± 95% confidence interval, paired tests.

The few-shot convention (MAML, ProtoNet papers) reports the mean accuracy over ``n`` test
episodes with the half-width of a normal-approximation 95% interval, ``1.96 · std / √n``,
where ``std`` is the sample standard deviation (``ddof=1``) of the per-episode accuracies.
Comparing two models on the *same* episodes, the per-episode differences are paired: their
interval is much tighter than what the two separate intervals suggest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Z95", "MeanCI", "mean_ci", "paired_difference"]

#: Two-sided 95% quantile of the standard normal distribution.
Z95 = 1.96


@dataclass(frozen=True)
class MeanCI:
    """``mean ± ci95`` over ``n`` values (``std``: sample standard deviation, ddof=1)."""

    mean: float
    ci95: float
    std: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def format(self, scale: float = 100.0, digits: int = 2) -> str:
        """``"48.70 ± 1.84"`` (accuracies in percent by default)."""
        return f"{self.mean * scale:.{digits}f} ± {self.ci95 * scale:.{digits}f}"


def mean_ci(values: Sequence[float] | np.ndarray) -> MeanCI:
    """Mean and 95% CI half-width ``1.96 · std / √n`` of ``values`` (shape ``(n,)``).

    One value has no spread to estimate: its ``ci95``/``std`` are reported as ``nan``.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"mean_ci needs a non-empty 1-D sequence, got shape {array.shape}")
    n = int(array.size)
    std = float(array.std(ddof=1)) if n > 1 else math.nan
    return MeanCI(mean=float(array.mean()), ci95=Z95 * std / math.sqrt(n), std=std, n=n)


def paired_difference(
    values_a: Sequence[float] | np.ndarray, values_b: Sequence[float] | np.ndarray
) -> MeanCI:
    """Mean ± 95% CI of ``a_i - b_i`` for two models scored on the same ``n`` episodes."""
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"paired_difference needs the same episodes for both: shapes {a.shape} and {b.shape}"
        )
    return mean_ci(a - b)

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

__all__ = ["Z95", "MeanCI", "RunErrors", "mean_ci", "paired_difference", "run_errors"]

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


@dataclass(frozen=True)
class RunErrors:
    """Error per one-shot run and the mean ± 95% CI over runs, as Lake et al. (Science 2015)
    report their 20 within-alphabet runs: each run is one episode, its error ``1 − accuracy``.

    ``errors``: shape ``(runs,)``, in run order (run 1 first), fractions in [0, 1].
    """

    errors: tuple[float, ...]
    summary: MeanCI

    def format(self, per_line: int = 10) -> str:
        """``error per run (%)`` lines (``run:error`` pairs) and ``mean error over N runs``."""
        pairs = [f"{run:02d}:{100 * error:5.1f}" for run, error in enumerate(self.errors, 1)]
        lines = ["error per run (%):"]
        lines += ["  " + "  ".join(pairs[i : i + per_line]) for i in range(0, len(pairs), per_line)]
        lines.append(
            f"mean error over {self.summary.n} runs: {self.summary.format()} % (95% CI over runs)"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {"errors": [round(e, 6) for e in self.errors], **self.summary.as_dict()}


def run_errors(accuracies: Sequence[float] | np.ndarray) -> RunErrors:
    """Per-run errors ``1 − accuracy`` of one-shot runs scored one episode each (``(runs,)``
    accuracies in run order) and their mean ± 95% CI over runs (:func:`mean_ci`)."""
    errors = 1.0 - np.asarray(accuracies, dtype=np.float64)
    if errors.ndim != 1 or errors.size == 0 or not ((errors >= 0) & (errors <= 1)).all():
        raise ValueError(
            f"run_errors needs per-run accuracies in [0, 1] (shape (runs,)), got {accuracies!r}"
        )
    return RunErrors(errors=tuple(float(e) for e in errors), summary=mean_ci(errors))

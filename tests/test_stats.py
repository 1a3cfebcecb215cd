"""Statistics of few-shot evaluation (fewshot_nsl.stats) against naive float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fewshot_nsl.stats import Z95, mean_ci, paired_difference


def test_mean_ci_matches_a_naive_float64_computation() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, size=37)
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    result = mean_ci(values)
    assert result.mean == pytest.approx(mean, abs=1e-12)
    assert result.std == pytest.approx(math.sqrt(variance), abs=1e-12)
    assert result.ci95 == pytest.approx(1.96 * math.sqrt(variance) / math.sqrt(37), abs=1e-12)
    assert result.n == 37 and Z95 == 1.96
    assert result.format() == f"{100 * mean:.2f} ± {100 * result.ci95:.2f}"
    assert math.isnan(mean_ci([0.5]).ci95)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        mean_ci([])


def test_paired_difference_is_the_ci_of_the_differences() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0.4, 0.9, size=50)
    b = a - 0.02 + rng.normal(0, 0.01, size=50)  # b tracks a closely: pairing matters
    paired = paired_difference(a, b)
    assert paired.mean == pytest.approx(np.mean(a - b))
    assert paired.ci95 == pytest.approx(1.96 * np.std(a - b, ddof=1) / math.sqrt(50))
    # The paired interval is far tighter than the unpaired intervals would suggest.
    assert paired.ci95 < 0.2 * (mean_ci(a).ci95 + mean_ci(b).ci95)
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(a, b[:-1])

"""Per-run error report for the 20 one-shot runs of Lake et al. (Science 2015).

When a run's test episodes are exactly the published runs (``episodes.manifest`` is a lake
cache's ``lake_runs.json``, checked by :func:`episodes.datasets.omniglot_runs.replays_lake_runs`,
not by the file name), ``train`` and ``eval`` print the error of every run and the mean ±
95% CI over the 20 runs, as the paper reports them, after the usual accuracy table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from episodes import ImageSplit, load_manifest
from episodes.datasets.omniglot_runs import replays_lake_runs
from fewshot_nsl.stats import RunErrors, run_errors

__all__ = ["lake_run_errors", "lake_run_report", "report_from_results"]


def lake_run_errors(
    split: ImageSplit,
    manifest: str | None,
    shot: int,
    accuracies: Sequence[float] | np.ndarray,
) -> RunErrors | None:
    """Per-run errors of ``accuracies`` (``(20,)``, one per test episode) when the test
    episodes of ``shot`` (``manifest``, ``{shot}`` replaced, on the test ``split``) are the 20
    Lake runs in run order; None for any other test set."""
    if not manifest:
        return None
    source = load_manifest(manifest.format(shot=shot), split)
    return run_errors(accuracies) if replays_lake_runs(source) else None


def lake_run_report(
    name: str,
    split: ImageSplit,
    manifest: str | None,
    test: Mapping[int, Sequence[float] | np.ndarray],
) -> list[str]:
    """Printable blocks, one per shot of ``test`` (shot → per-episode accuracies) scored on
    the Lake runs: a title line naming ``name``, the errors per run and their mean ± CI."""
    blocks = []
    for shot, accuracies in test.items():
        errors = lake_run_errors(split, manifest, int(shot), accuracies)
        if errors is not None:
            title = f"{name}, {shot}-shot: the 20 one-shot runs of Lake et al. (2015)"
            blocks.append(f"{title}\n{errors.format()}")
    return blocks


def report_from_results(config: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    """:func:`lake_run_report` of a ``results.json`` payload trained with ``config``."""
    manifest = config["episodes"]["manifest"]
    if not manifest:
        return []
    from fewshot_nsl.runner import load_split

    test = {int(shot): entry["accuracies"] for shot, entry in results["test"].items()}
    return lake_run_report(str(results["name"]), load_split(config, "test"), manifest, test)

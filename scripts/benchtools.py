"""Shared method of the benchmark scripts: wall-clock time at low load, variants interleaved.

Process CPU time on a shared VM is not an idle core (time stolen by other guests is charged
differently), so every script times wall-clock, prints the 1-minute load average before and
after, refuses a run on a machine loaded beyond its core count (unless told otherwise, then
flags every figure), runs the compared variants in interleaved rounds with the order rotated,
and reports median [min-max] of per-round values and of paired per-round ratios.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping


def load_guard(allow_loaded: bool) -> tuple[float, int]:
    """Print the 1-minute load average and core count; refuse (exit non-zero) a run on a
    machine loaded beyond its core count unless ``allow_loaded``, then flag it loudly."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    print(f"load average (1 min) before: {load:.2f} on {cores} cores")
    if load > cores:
        message = (
            f"the machine is loaded (1-minute load {load:.2f} > {cores} cores): wall-clock "
            "figures would measure the other jobs"
        )
        if not allow_loaded:
            raise SystemExit(f"REFUSED: {message}. Wait for an idle machine or pass --allow-loaded")
        print(f"!!! WARNING: {message}. Every figure below is INVALID as an idle-core number !!!")
    return load, cores


def load_report(before: float, cores: int) -> None:
    """Print the load after the measurements, flagged when either end exceeded the cores."""
    after = os.getloadavg()[0]
    print(f"load average (1 min) after: {after:.2f} (before: {before:.2f}, {cores} cores)")
    if max(before, after) > cores:
        print("!!! the machine was loaded during this run: figures are not idle-core figures !!!")


def median_range(values: list[float], digits: int = 2) -> str:
    """``median [min-max]`` of ``values``."""
    return (
        f"{statistics.median(values):.{digits}f} "
        f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
    )


def interleaved_seconds(
    variants: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Wall seconds of one call of each variant per round; variants interleaved, the order
    rotated every round so none always runs first (cache, frequency) or last."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            variants[name]()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-round ratios of two variants measured in the same rounds."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]

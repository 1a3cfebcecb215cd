"""``fewshot-nsl report``: one table (Markdown, CSV) and figures of every run under folders.

A *run* is a folder with a few-shot ``results.json`` (written by ``train``), next to its
``config.yaml`` and ``metrics.jsonl``. Runs whose configs differ only by ``train.seed``
(``train --seeds``: ``RUN/seed-S``, :func:`fewshot_nsl.fewshot_config.iter_seed_runs`) form
one *group*, reported on one row per test shot:

* ``accuracy ± 95% CI``: over test episodes, of the per-episode accuracies averaged over
  the group's seeds (one seed: the run's own ``results.json`` numbers). It measures how much
  the *test episodes* drawn move the mean, for these trained models; it says nothing about
  how much another training seed would move it.
* ``over seeds mean ± std``: the mean test accuracy of each seed, their mean and sample
  standard deviation (ddof = 1): the training-seed variation the CI above leaves out.
* ``Δ vs BASELINE``: the paired difference ``mean(a_i − b_i) ± 1.96·std/√n`` over the same
  episodes (:func:`fewshot_nsl.stats.paired_difference`) against the group named
  ``--baseline`` scored on the same episodes (same test data fingerprint, way, shot,
  queries, episode source and count); blank where no such baseline row exists.

Figures (PNG, only when matplotlib is installed, the ``plot`` extra): learning curves (train
loss and validation accuracy against the step, from ``metrics.jsonl``) and accuracy with
95% CI bars per method, one panel per test setting.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from episodes.fileio import atomic_write
from fewshot_nsl.config import normalized_config
from fewshot_nsl.evaluation import stored_accuracies
from fewshot_nsl.fewshot_config import FEWSHOT_DEFAULTS
from fewshot_nsl.stats import MeanCI, mean_ci, paired_difference

__all__ = [
    "Report",
    "ReportRow",
    "Run",
    "RunGroup",
    "build_report",
    "find_runs",
    "group_runs",
    "plot_available",
]

#: ``train`` keys that may differ between runs of one group: the seed, where the run was
#: written and how it was logged (none changes what was trained or tested).
SEED_KEYS = ("seed", "seeds", "out_dir", "tensorboard", "log_every", "checkpoint_every")


@dataclass
class Run:
    """One trained few-shot run: its folder, ``results.json`` and resolved ``config.yaml``."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.results.get("name") or self.path.name)

    @property
    def seed(self) -> int | None:
        """The training seed (``results.json``; ``config.yaml`` for runs made before)."""
        seed = self.results.get("seed", self.config.get("train", {}).get("seed"))
        return None if seed is None else int(seed)

    def metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (a torn last line, from a kill, is skipped)."""
        path = self.path / "metrics.jsonl"
        records = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records


def _is_fewshot_results(results: Any) -> bool:
    """Whether a ``results.json`` payload is a few-shot run's (per-shot per-episode scores)."""
    test = results.get("test") if isinstance(results, dict) else None
    return isinstance(test, dict) and all(
        isinstance(entry, dict) and "accuracies" in entry for entry in test.values()
    )


def find_runs(folders: Sequence[str | Path]) -> tuple[list[Run], list[Path]]:
    """Every few-shot run in or under ``folders`` (sorted by path, each once), and the
    ``results.json`` files skipped because they are not few-shot results (supervised runs).

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: a ``results.json`` / ``config.yaml`` is not valid JSON / YAML (named).
    """
    files: dict[Path, None] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"report: {folder} is not a folder")
        for path in sorted(folder.rglob("results.json")):
            files.setdefault(path.resolve(), None)
    runs, skipped = [], []
    for path in files:
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        if not _is_fewshot_results(results):
            skipped.append(path)
            continue
        config_path = path.with_name("config.yaml")
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = yaml.safe_load(config_path.read_text()) or {}
            except yaml.YAMLError as error:
                raise ValueError(f"{config_path}: not valid YAML ({error})") from error
        runs.append(Run(path.parent, results, config))
    return runs, skipped


@dataclass
class RunGroup:
    """Runs of one config that differ only by the training seed (ordered by seed)."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def name(self) -> str:
        return self.first.name

    @property
    def seeds(self) -> list[int | None]:
        return [run.seed for run in self.runs]

    @property
    def shots(self) -> list[str]:
        """Test shots every run of the group was tested on (in the first run's order)."""
        return [
            shot
            for shot in self.first.results["test"]
            if all(shot in r.results["test"] for r in self.runs)
        ]

    def accuracies(self, shot: str) -> np.ndarray:
        """Per-episode accuracies of ``shot``, averaged over the seeds: ``(episodes,)``."""
        return np.mean([self.seed_accuracies(run, shot) for run in self.runs], axis=0)

    @staticmethod
    def seed_accuracies(run: Run, shot: str) -> np.ndarray:
        """Per-episode accuracies of ``shot`` of one run, as scored (``(episodes,)``)."""
        return stored_accuracies(run.results["test"][shot])

    def episodes_key(self, shot: str) -> tuple[Any, ...]:
        """What makes two rows' test episodes the same (only then are they paired)."""
        results, test = self.first.results, self.first.results["test"][shot]
        return (
            results.get("data", {}).get("test"),
            test["way"],
            test["shot"],
            test["query"],
            test["source"],
            len(test["accuracies"]),
        )


def _group_key(run: Run) -> str:
    """Runs with equal keys differ at most by seed: the config (resolved again with today's
    schema, so runs from before a field was added still match) without :data:`SEED_KEYS`,
    and the test data fingerprint. A run without ``config.yaml`` is a group of its own."""
    if not run.config:
        return f"path:{run.path}"
    resolved = normalized_config(run.config, FEWSHOT_DEFAULTS)
    config = {key: value for key, value in resolved.items() if key != "train"}
    train = {k: v for k, v in resolved.get("train", {}).items() if k not in SEED_KEYS}
    data = run.results.get("data", {}).get("test")
    return json.dumps([run.name, config, train, data], sort_keys=True, default=str)


def group_runs(runs: Iterable[Run]) -> list[RunGroup]:
    """Runs grouped by :func:`_group_key` (groups in order of first appearance, runs by seed).
    Two runs of the same seed are repeats, not seeds: they go to separate groups."""
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        key, repeat = _group_key(run), 0
        while any(other.seed == run.seed for other in groups.get((key, repeat), [])):
            repeat += 1
        groups.setdefault((key, repeat), []).append(run)
    return [
        RunGroup(sorted(members, key=lambda r: (r.seed is None, r.seed or 0, str(r.path))))
        for members in groups.values()
    ]


@dataclass
class ReportRow:
    """One row of the report: a group's test accuracy at one shot (fractions, not percent).

    ``accuracy``: mean ± 95% CI over episodes of the seed-averaged per-episode accuracies;
    ``over_seeds``: mean ± std over the seeds' mean accuracies (``None`` with one seed);
    ``difference``: paired difference to the baseline row (``None`` when there is none).
    """

    method: str
    learner: str
    backbone: str
    dataset: str
    way: int
    shot: int
    query: int
    steps: int
    seeds: list[int | None]
    accuracy: MeanCI
    over_seeds: MeanCI | None
    baseline: str | None = None
    difference: MeanCI | None = None
    run_dirs: list[str] = field(default_factory=list)

    @property
    def episodes(self) -> int:
        return self.accuracy.n

    def csv_record(self) -> dict[str, Any]:
        """The row for the CSV file: numbers in percent (``*_pct``), blanks for none."""

        def pct(value: float | None) -> float | str:
            return "" if value is None or not np.isfinite(value) else round(100 * value, 4)

        return {
            "method": self.method,
            "learner": self.learner,
            "backbone": self.backbone,
            "dataset": self.dataset,
            "way": self.way,
            "shot": self.shot,
            "query": self.query,
            "steps": self.steps,
            "seeds": " ".join(str(seed) for seed in self.seeds),
            "n_seeds": len(self.seeds),
            "episodes": self.episodes,
            "accuracy_pct": pct(self.accuracy.mean),
            "ci95_pct": pct(self.accuracy.ci95),
            "seed_mean_pct": pct(self.over_seeds.mean if self.over_seeds else None),
            "seed_std_pct": pct(self.over_seeds.std if self.over_seeds else None),
            "baseline": self.baseline or "",
            "diff_pct": pct(self.difference.mean if self.difference else None),
            "diff_ci95_pct": pct(self.difference.ci95 if self.difference else None),
            "run_dirs": " ".join(self.run_dirs),
        }


def _rows(group: RunGroup) -> list[tuple[ReportRow, tuple[Any, ...], np.ndarray]]:
    """The rows of ``group`` (one per shot) with their episodes key and per-episode scores."""
    run, config = group.first, group.first.config
    out = []
    for shot in group.shots:
        test = run.results["test"][shot]
        accuracies = group.accuracies(shot)
        seed_means = [float(np.mean(group.seed_accuracies(r, shot))) for r in group.runs]
        row = ReportRow(
            method=group.name,
            learner=str(config.get("learner", {}).get("name", run.results.get("method", ""))),
            backbone=str(run.results.get("backbone", "")),
            dataset=str(config.get("data", {}).get("dataset", "")),
            way=int(test["way"]),
            shot=int(test["shot"]),
            query=int(test["query"]),
            steps=int(run.results.get("steps", 0)),
            seeds=group.seeds,
            accuracy=mean_ci(accuracies),
            over_seeds=mean_ci(seed_means) if len(seed_means) > 1 else None,
            run_dirs=[str(r.path) for r in group.runs],
        )
        out.append((row, group.episodes_key(shot), accuracies))
    return out


@dataclass
class Report:
    """The rows of a report (ordered by dataset, way, shot, query) and its baseline."""

    rows: list[ReportRow]
    groups: list[RunGroup]
    baseline: str | None = None

    def markdown(self) -> str:
        """The table in Markdown (accuracies in percent)."""
        header = [
            "method",
            "learner",
            "backbone",
            "dataset",
            "way",
            "shot",
            "query",
            "steps",
            "seeds",
            "episodes",
            "accuracy (%) ± 95% CI over episodes",
            "over seeds (%) mean ± std",
        ]
        if self.baseline:
            header.append(f"Δ vs {self.baseline} (points) ± 95% CI, paired")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            seeds = " ".join("?" if seed is None else str(seed) for seed in row.seeds)
            cells = [
                row.method,
                row.learner,
                row.backbone,
                row.dataset,
                str(row.way),
                str(row.shot),
                str(row.query),
                str(row.steps),
                seeds,
                str(row.episodes),
                row.accuracy.format(),
                f"{100 * row.over_seeds.mean:.2f} ± {100 * row.over_seeds.std:.2f}"
                if row.over_seeds
                else "",
            ]
            if self.baseline:
                if row.method == self.baseline:
                    cells.append("(baseline)")
                elif row.difference is not None:
                    cells.append(
                        f"{100 * row.difference.mean:+.2f} ± {100 * row.difference.ci95:.2f}"
                    )
                else:
                    cells.append("")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv(self) -> str:
        """The table as CSV (one header line, numbers in percent)."""
        buffer = io.StringIO()
        records = [row.csv_record() for row in self.rows]
        fields = list(records[0]) if records else list(_EMPTY_ROW_FIELDS)
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()


_EMPTY_ROW_FIELDS = ("method", "shot", "accuracy_pct", "ci95_pct")


def build_report(runs: Sequence[Run], baseline: str | None = None) -> Report:
    """The report of ``runs`` (grouped by seed), with paired differences to ``baseline``.

    Raises:
        ValueError: no run is named ``baseline``, or two of its groups were scored on the
            same episodes (which one to compare with would be a guess).
    """
    groups = group_runs(runs)
    entries = [entry for group in groups for entry in _rows(group)]
    if baseline is not None:
        names = sorted({group.name for group in groups})
        if baseline not in names:
            raise ValueError(f"--baseline {baseline}: no run of that name; runs: {names}")
        base: dict[tuple[Any, ...], np.ndarray] = {}
        for row, key, accuracies in entries:
            if row.method == baseline:
                if key in base:
                    raise ValueError(
                        f"--baseline {baseline}: several runs of that name on the same "
                        f"{row.way}-way {row.shot}-shot test episodes; report fewer folders"
                    )
                base[key] = accuracies
        for row, key, accuracies in entries:
            row.baseline = baseline
            if row.method != baseline and key in base:
                row.difference = paired_difference(accuracies, base[key])
    rows = sorted((row for row, _, _ in entries), key=lambda r: (r.dataset, r.way, r.shot, r.query))
    return Report(rows, groups, baseline)


# -- figures ---------------------------------------------------------------------------------


def plot_available() -> bool:
    """Whether matplotlib (the ``plot`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def learning_curves_png(groups: Sequence[RunGroup]) -> bytes:
    """Train loss and validation accuracy against the step (``metrics.jsonl``), one line per
    run, one colour per group (its seeds share it)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    loss_axes, val_axes = figure.subplots(1, 2)
    for index, group in enumerate(groups):
        color = f"C{index % 10}"
        for number, run in enumerate(group.runs):
            label = group.name if number == 0 else None
            records = run.metrics()
            for axes, event, key in ((loss_axes, "train", "loss"), (val_axes, "val", "accuracy")):
                points = [
                    (r["step"], r[key])
                    for r in records
                    if r.get("event") == event and r.get(key) is not None
                ]
                if points:
                    steps, values = zip(*points)
                    axes.plot(steps, values, color=color, label=label, linewidth=1.2, marker=".")
    loss_axes.set(xlabel="step", ylabel="train loss", title="training loss")
    val_axes.set(xlabel="step", ylabel="accuracy", title="validation accuracy")
    for axes in (loss_axes, val_axes):
        axes.grid(alpha=0.3)
    if groups:
        val_axes.legend(fontsize=8)
    return _png(figure)


def accuracy_png(rows: Sequence[ReportRow]) -> bytes:
    """Test accuracy with 95% CI bars per method, one panel per (dataset, way, shot, query)."""
    from matplotlib.figure import Figure

    settings: dict[tuple[str, int, int, int], list[ReportRow]] = {}
    for row in rows:
        settings.setdefault((row.dataset, row.way, row.shot, row.query), []).append(row)
    count = max(1, len(settings))
    figure = Figure(figsize=(1.0 + 3.2 * count, 4))
    axes_list = np.atleast_1d(figure.subplots(1, count))
    for axes, ((dataset, way, shot, _), members) in zip(axes_list, settings.items()):
        positions = np.arange(len(members))
        axes.errorbar(
            positions,
            [100 * r.accuracy.mean for r in members],
            yerr=[100 * np.nan_to_num(r.accuracy.ci95) for r in members],
            fmt="o",
            capsize=4,
        )
        axes.set_xticks(positions, [r.method for r in members], rotation=30, ha="right")
        axes.set_title(f"{dataset} {way}-way {shot}-shot")
        axes.grid(axis="y", alpha=0.3)
    axes_list[0].set_ylabel("test accuracy (%) ± 95% CI")
    return _png(figure)


# -- writing ---------------------------------------------------------------------------------


def write_new(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically, refusing to replace a file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; give --overwrite to replace it")
    return atomic_write(path, lambda handle: handle.write(data))


def write_report(
    report: Report, out_dir: str | Path, overwrite: bool = False, figures: bool = True
) -> list[Path]:
    """``report.md``, ``report.csv`` and (with ``figures`` and matplotlib)
    ``learning_curves.png`` and ``accuracy.png`` in ``out_dir``; the paths written."""
    out = Path(out_dir)
    files = {
        "report.md": (report.markdown() + "\n").encode(),
        "report.csv": report.csv().encode(),
    }
    if figures and plot_available():
        files["learning_curves.png"] = learning_curves_png(report.groups)
        files["accuracy.png"] = accuracy_png(report.rows)
    if not overwrite:  # refuse before writing any, so a refusal leaves nothing half-done
        for name in files:
            if (out / name).exists():
                raise FileExistsError(f"{out / name} exists; give --overwrite to replace it")
    return [write_new(out / name, data, overwrite=True) for name, data in files.items()]

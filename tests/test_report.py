"""``fewshot-nsl report`` (fewshot_nsl.report): the table, its CSV, seeds grouped, paired
differences, figures; and the per-seed runs of ``train --seeds``."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fewshot_nsl.cli import main
from fewshot_nsl.fewshot_config import seed_run_dir
from fewshot_nsl.report import build_report, find_runs, plot_available

TEST_DATA = "96871434335121b58fdbf836cee89225"


def write_run(
    folder: Path,
    name: str,
    accuracies: dict[int, list[float]],
    *,
    seed: int = 0,
    learner: str = "maml",
    steps: int = 40,
    query: int = 15,
    source: str = "sampler seed 0",
    data: str = TEST_DATA,
) -> Path:
    """A run folder as ``train`` writes it (results.json, config.yaml, metrics.jsonl), with
    the given per-episode test accuracies per shot."""
    folder.mkdir(parents=True, exist_ok=True)
    test = {
        str(shot): {
            "way": 5,
            "shot": shot,
            "query": query,
            "episodes": len(values),
            "source": source,
            "mean": sum(values) / len(values),
            "accuracies": values,
        }
        for shot, values in accuracies.items()
    }
    results = {
        "name": name,
        "method": learner,
        "backbone": "conv4",
        "steps": steps,
        "data": {"test": data},
        "test": test,
    }
    (folder / "results.json").write_text(json.dumps(results))
    config = {
        "name": name,
        "data": {"dataset": "synthetic", "root": None},
        "learner": {"name": learner},
        "train": {"steps": steps, "seed": seed, "out_dir": str(folder)},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = [
        {"event": "train", "step": 10, "loss": 1.5, "accuracy": 0.3},
        {"event": "val", "step": 10, "accuracy": 0.4, "ci95": 0.1},
        {"event": "train", "step": 20, "loss": 1.2, "accuracy": 0.5},
        {"event": "val", "step": 20, "accuracy": 0.5, "ci95": 0.1},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two methods: ``base`` (one seed) and ``nsn`` (seeds 0 and 1), 3 test episodes each."""
    root = tmp_path / "runs"
    write_run(root / "base", "base", {1: [0.4, 0.6, 0.8]})
    write_run(seed_run_dir(root / "nsn", 0), "nsn", {1: [0.5, 0.7, 0.9]}, learner="static_nsn")
    write_run(
        seed_run_dir(root / "nsn", 1), "nsn", {1: [0.3, 0.7, 0.5]}, seed=1, learner="static_nsn"
    )
    (root / "notes").mkdir()  # a folder without a run is ignored
    return root


def test_seeds_are_grouped_with_hand_computed_statistics(runs: Path) -> None:
    found, skipped = find_runs([runs])
    assert len(found) == 3 and skipped == []
    report = build_report(found, baseline="base")
    assert [(row.method, row.seeds) for row in report.rows] == [("base", [0]), ("nsn", [0, 1])]
    base, nsn = report.rows
    # base: one seed, its own episodes: mean 0.6, std 0.2, CI 1.96·0.2/√3.
    assert base.accuracy.mean == pytest.approx(0.6)
    assert base.accuracy.ci95 == pytest.approx(1.96 * 0.2 / math.sqrt(3))
    assert base.over_seeds is None and base.difference is None
    # nsn: seed means 0.7 and 0.5 -> 0.6 ± std √((0.1² + 0.1²)/1).
    assert nsn.over_seeds.mean == pytest.approx(0.6)
    assert nsn.over_seeds.std == pytest.approx(math.sqrt(0.02))
    # Per episode, averaged over seeds: [0.4, 0.7, 0.7]: mean 0.6, std √(0.06/2).
    assert nsn.accuracy.mean == pytest.approx(0.6)
    assert nsn.accuracy.ci95 == pytest.approx(1.96 * math.sqrt(0.03) / math.sqrt(3))
    # Paired against base on the same episodes: differences [0.0, 0.1, -0.1].
    assert nsn.difference.mean == pytest.approx(0.0, abs=1e-12)
    assert nsn.difference.ci95 == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    assert (nsn.query, nsn.steps, nsn.learner, nsn.dataset) == (15, 40, "static_nsn", "synthetic")


def test_only_the_same_episodes_are_paired(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "a", {1: [0.4, 0.6], 5: [0.7, 0.9]})
    write_run(tmp_path / "b", "b", {1: [0.5, 0.5], 5: [0.8, 0.8]}, query=10)  # other queries
    write_run(tmp_path / "c", "c", {1: [0.2, 0.6]}, data="another-test-set")
    write_run(tmp_path / "d", "d", {1: [0.3, 0.9]}, source="manifest m.json")
    write_run(tmp_path / "e", "e", {1: [0.6, 0.4], 5: [0.5, 0.9]})
    report = build_report(find_runs([tmp_path])[0], baseline="a")
    difference = {(row.method, row.shot): row.difference for row in report.rows}
    assert difference[("b", 1)] is None and difference[("c", 1)] is None
    assert difference[("d", 1)] is None
    assert difference[("e", 1)].mean == pytest.approx(0.0)
    assert difference[("e", 5)].mean == pytest.approx(-0.1)
    # Rows are ordered by setting: every 1-shot row, then the 5-shot ones.
    assert [row.shot for row in report.rows] == [1, 1, 1, 1, 1, 5, 5, 5]


def test_runs_of_another_config_are_not_grouped(tmp_path: Path) -> None:
    write_run(tmp_path / "x" / "seed-0", "x", {1: [0.5, 0.5]})
    write_run(tmp_path / "y" / "seed-1", "x", {1: [0.5, 0.5]}, seed=1, steps=80)
    report = build_report(find_runs([tmp_path])[0])
    assert [(row.steps, row.seeds) for row in report.rows] == [(40, [0]), (80, [1])]


def test_unknown_baseline_names_the_runs(runs: Path) -> None:
    with pytest.raises(ValueError, match=r"--baseline maml: no run of that name.*'base', 'nsn'"):
        build_report(find_runs([runs])[0], baseline="maml")


def test_report_cli_markdown_csv_and_files(runs: Path, tmp_path: Path, capsys) -> None:
    out, table = tmp_path / "out", tmp_path / "table.csv"
    status = main(
        ["report", str(runs), "--baseline", "base", "--csv", str(table), "--out", str(out)]
    )
    stdout, stderr = capsys.readouterr()
    assert status == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("| method | learner | backbone | dataset | way | shot | query |")
    assert "Δ vs base" in lines[0] and len(lines) == 4
    base = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert base[10:] == ["60.00 ± 22.63", "", "(baseline)"]  # 1.96·0.2/√3; one seed: no std
    nsn = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert nsn[:10] == ["nsn", "static_nsn", "conv4", "synthetic", "5", "1", "15", "40"] + [
        "0 1",
        "3",
    ]
    assert nsn[10] == "60.00 ± 19.60"  # 1.96·√0.03/√3 = 0.196
    assert nsn[11] == "60.00 ± 14.14"  # std over the seed means 70 and 50
    assert nsn[12] in ("+0.00 ± 11.32", "-0.00 ± 11.32")

    records = list(csv.DictReader(io.StringIO(table.read_text())))
    assert [r["method"] for r in records] == ["base", "nsn"]
    assert float(records[1]["accuracy_pct"]) == pytest.approx(60.0)
    assert float(records[1]["ci95_pct"]) == pytest.approx(19.6, abs=1e-3)
    assert float(records[1]["seed_std_pct"]) == pytest.approx(100 * math.sqrt(0.02), abs=1e-3)
    assert records[1]["seeds"] == "0 1" and records[1]["n_seeds"] == "2"
    assert records[0]["seed_std_pct"] == "" and records[0]["diff_pct"] == ""
    assert (out / "report.csv").read_text() == table.read_text()
    assert (out / "report.md").read_text() == stdout
    if plot_available():
        for name in ("learning_curves.png", "accuracy.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
            assert (out / name).stat().st_size > 5000, name

    # A second report refuses to replace the files, unless --overwrite.
    assert main(["report", str(runs), "--csv", str(table)]) == 2
    assert "table.csv exists; give --overwrite" in capsys.readouterr().err
    assert main(["report", str(runs), "--out", str(out), "--overwrite"]) == 0


def test_report_without_matplotlib_writes_the_table(
    runs: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import fewshot_nsl.report as report_module

    monkeypatch.setattr(report_module, "plot_available", lambda: False)
    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.md"]
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_report_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "absent is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no few-shot run" in capsys.readouterr().err
    supervised = tmp_path / "sup"
    supervised.mkdir()
    (supervised / "results.json").write_text(json.dumps({"test_error": 0.1}))
    write_run(tmp_path / "sup" / "fs", "fs", {1: [0.5, 0.5]})
    assert main(["report", str(supervised)]) == 0
    _, stderr = capsys.readouterr()
    assert "skipped" in stderr and "not a few-shot run" in stderr


TINY_YAML = """
name: tiny
data:
  dataset: synthetic
  options: {image_size: 16, images_per_class: 8, num_classes: {train: 10, val: 6, test: 6}}
episodes: {way: 3, shot: 1, query: 2, tasks_per_batch: 2, val_episodes: 3, test_episodes: 4,
           test_shots: [1], test_query: 2}
model: {backbone: conv4, backbone_options: {filters: 4, image_size: 16}}
learner: {name: maml, inner_steps: 1, inner_steps_eval: 1, inner_lr: 0.1}
train: {steps: 2, val_every: 1, checkpoint_every: 1, log_every: 1, device: cpu, threads: 1}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.mark.slow
def test_train_seeds_runs_per_seed_and_report_groups_them(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "seeds"
    assert (
        main(["train", "--config", str(tiny), "--out", str(out), "--quiet", "--seeds", "0", "1"])
        == 0
    )
    stdout = capsys.readouterr().out
    assert "seed  method" in stdout  # the table has a seed column
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seeds"] == [0, 1]
    results = {}
    for seed in (0, 1):
        folder = seed_run_dir(out, seed)
        config = yaml.safe_load((folder / "config.yaml").read_text())["train"]
        assert (config["seed"], config["seeds"], config["out_dir"]) == (seed, None, str(folder))
        results[seed] = json.loads((folder / "results.json").read_text())
        assert results[seed]["seed"] == seed and results[seed]["name"] == "tiny"
    # A seed's run is the run of that train.seed, trained alone (same per-episode scores).
    alone = tmp_path / "alone"
    assert (
        main(["train", "--config", str(tiny), "--out", str(alone), "--quiet", "train.seed=1"]) == 0
    )
    alone_results = json.loads((alone / "results.json").read_text())
    assert alone_results["test"]["1"]["accuracies"] == results[1]["test"]["1"]["accuracies"]

    summary = json.loads((out / "summary.json").read_text())
    assert [row["seed"] for row in summary["rows"]] == [0, 1]
    assert summary["runs"] == {f"tiny/seed-{s}": str(seed_run_dir(out, s)) for s in (0, 1)}

    (row,) = build_report(find_runs([out])[0]).rows
    means = [results[s]["test"]["1"]["mean"] for s in (0, 1)]
    assert row.seeds == [0, 1]
    assert row.over_seeds.mean == pytest.approx(sum(means) / 2)
    assert row.over_seeds.std == pytest.approx(abs(means[0] - means[1]) / math.sqrt(2))

    # Resuming the root folder finds both seeds finished; train.seeds=[] is refused.
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err.count("already finished") == 2
    assert main(["train", "--config", str(tiny), "train.seeds=[1, 1]"]) == 2
    assert "train.seeds: must not repeat a seed" in capsys.readouterr().err


def test_stored_accuracies_are_the_scored_ones() -> None:
    import numpy as np

    from fewshot_nsl.evaluation import EvalResult, stored_accuracies

    rng = np.random.default_rng(0)
    for way, query in ((5, 15), (3, 2), (20, 1), (5, 97)):
        scored = rng.integers(0, way * query + 1, size=50) / (way * query)
        entry = EvalResult(way, 1, query, scored, "sampler seed 0").as_dict()
        assert np.array_equal(stored_accuracies(entry), scored)  # 6 decimals, recovered exactly
    # Values that are no k/(way·query) (hand-written, other query counts) are kept as stored.
    entry = {"way": 5, "query": 15, "accuracies": [0.7, 0.5]}
    assert stored_accuracies(entry).tolist() == [0.7, 0.5]


@pytest.mark.slow
def test_eval_compare_reuses_stored_scores_equal_to_rescoring(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    import numpy as np

    from fewshot_nsl.cli import _loaded_learner
    from fewshot_nsl.evaluation import evaluate_shots, stored_test_results

    out = tmp_path / "run"
    argv = ["train", "--config", str(tiny), "--out", str(out), "--quiet"]
    assert main([*argv, "episodes.test_shots=[1, 5]"]) == 0
    capsys.readouterr()
    best, last = out / "best.pt", out / "last.pt"

    # The stored accuracies of best.pt (the tested checkpoint) are those scoring gives, bit
    # for bit, for all its episodes and for the first 3.
    cpu = torch.device("cpu")
    learner, config, split = _loaded_learner(best, cpu, "sampled")
    for count in (4, 3):
        stored = stored_test_results(best, config, split, [1, 5], count)
        scored = evaluate_shots(learner, config, split, [1, 5], count, cpu, show_progress=False)
        for shot in (1, 5):
            assert np.array_equal(stored[shot].accuracies, scored[shot].accuracies)
            assert stored[shot].as_dict() == scored[shot].as_dict()
    # Not stored: more episodes than were tested, a manifest, last.pt (best.pt was tested).
    assert stored_test_results(best, config, split, [1], 5) is None
    assert stored_test_results(best, config, split, [1], 3, manifest="m.json") is None
    assert stored_test_results(last, config, split, [1], 3) is None

    # eval --compare: B (best.pt) reused, the JSON the same as with --rescore.
    def compare(*extra: str) -> tuple[dict[str, Any], str]:
        json_path = tmp_path / "compare.json"
        status = main(
            ["eval", "--checkpoint", str(last), "--compare", str(best), "--episodes", "3"]
            + ["--json", str(json_path), "--overwrite", *extra]
        )
        assert status == 0
        return json.loads(json_path.read_text()), capsys.readouterr().err

    reused, stderr = compare()
    assert f"{best}: reusing the per-episode accuracies" in stderr
    assert f"{last}: reusing" not in stderr
    rescored, stderr = compare("--rescore")
    assert "reusing" not in stderr
    assert reused == rescored
    assert "reusing" not in compare("--quiet")[1]  # --quiet: reused without a word

    # results.json of another best step (best.pt replaced since the test): scored again.
    results = json.loads((out / "results.json").read_text())
    results["best"]["step"] += 1
    (out / "results.json").write_text(json.dumps(results))
    assert stored_test_results(best, config, split, [1], 3) is None


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what it is given."""

    made: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_scalars_of_a_metrics_record() -> None:
    from fewshot_nsl.tensorboard_log import scalars

    assert scalars("train", {"loss": 1.5, "accuracy": 0.25, "lr": 1e-3}) == {
        "train/loss": 1.5,
        "train/accuracy": 0.25,
        "train/lr": 1e-3,
    }
    assert scalars("val", {"accuracy": 0.5, "ci95": 0.1, "best": True}) == {
        "val/accuracy": 0.5,
        "val/ci95": 0.1,
    }
    assert scalars("test", {"shot": 5, "accuracy": 0.7, "episodes": 4}) == {
        "test/5-shot/accuracy": 0.7,
        "test/5-shot/episodes": 4.0,
    }


@pytest.mark.slow
def test_train_tensorboard_writes_the_metrics_scalars(
    tiny: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import sys
    import types

    from fewshot_nsl.tensorboard_log import scalars

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.made.clear()
    out = tmp_path / "run"
    argv = ["train", "--config", str(tiny), "--out", str(out), "--quiet"]
    assert main([*argv, "train.tensorboard=true"]) == 0
    (writer,) = FakeSummaryWriter.made
    assert writer.log_dir == str(out / "tensorboard") and writer.closed
    expected = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        event, step = record.pop("event"), record.pop("step")
        record.pop("time")
        expected += [(tag, value, step) for tag, value in scalars(event, record).items()]
    assert writer.scalars == expected
    assert {"train/loss", "val/accuracy", "test/1-shot/accuracy"} <= {t for t, _, _ in expected}

    # Without the package: one line saying what to install, before any training.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    capsys.readouterr()
    other = ["train", "--config", str(tiny), "--out", str(tmp_path / "other"), "--quiet"]
    assert main([*other, "train.tensorboard=true"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "fewshot-nsl[tensorboard]" in stderr


@pytest.mark.slow
def test_train_tensorboard_with_the_real_package(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert (
        main(
            ["train", "--config", str(tiny), "--out", str(out), "--quiet", "train.tensorboard=true"]
        )
        == 0
    )
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_repeats_of_one_seed_are_not_seeds(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "x", {1: [0.5, 0.7]})
    write_run(tmp_path / "b", "x", {1: [0.5, 0.7]})  # the same config and seed, again
    write_run(tmp_path / "c" / "seed-1", "x", {1: [0.3, 0.7]}, seed=1)
    report = build_report(find_runs([tmp_path])[0])
    assert [row.seeds for row in report.rows] == [[0, 1], [0]]

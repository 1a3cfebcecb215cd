"""The `fewshot-nsl` command line end to end, on a tiny synthetic config (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fewshot_nsl.checkpoint import write_checkpoint_state
from fewshot_nsl.cli import format_table, main

TINY_YAML = """
name: tiny
data:
  dataset: synthetic
  options: {image_size: 16, images_per_class: 8, num_classes: {train: 10, val: 6, test: 6}}
episodes: {way: 3, shot: 1, query: 2, tasks_per_batch: 2, val_episodes: 3, test_episodes: 4,
           test_shots: [1, 5], test_query: 2}
model: {backbone: conv4, backbone_options: {filters: 4, image_size: 16}}
learner: &opts {name: maml, inner_steps: 1, inner_steps_eval: 1, inner_lr: 0.1}
train: {steps: 2, val_every: 1, checkpoint_every: 1, log_every: 1, device: cpu, threads: 1}
"""


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.slow
def test_train_then_eval_and_compare(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    status, stdout, stderr = run_cli(
        capsys, "train", "--config", str(tiny), "--out", str(out), "train.steps=3"
    )
    assert status == 0, stderr
    assert "steps: 3" not in stdout + stderr  # the resolved config: in the run directory only
    assert f"[tiny] run directory {out}" in stderr
    assert "accuracy (%) ± 95% CI" in stdout
    assert "step 3/3" in stderr  # progress lines when stderr is not a TTY
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "best.pt", "last.pt", "results.json"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 3

    status, stdout, stderr = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        str(out / "best.pt"),
        "--shots",
        "1",
        "5",
        "--episodes",
        "6",
        "--compare",
        str(out / "last.pt"),
        "--json",
        str(tmp_path / "e.json"),
    )
    assert status == 0, stderr
    assert "paired difference" in stdout
    payload = json.loads((tmp_path / "e.json").read_text())
    assert set(payload["paired"]) == {"1", "5"}
    models = list(payload["models"].values())
    assert len(models) == 2
    for shot in ("1", "5"):
        a, b = (m["test"][shot]["accuracies"] for m in models)
        assert len(a) == len(b) == 6
        assert payload["paired"][shot]["mean"] == pytest.approx(
            sum(x - y for x, y in zip(a, b)) / 6, abs=1e-6
        )


@pytest.mark.slow
def test_multi_run_config_prints_one_table_and_resumes(tiny: Path, tmp_path: Path, capsys) -> None:
    config = tiny.read_text() + (
        "runs:\n"
        "  plain: {}\n"
        "  static: {learner: {<<: *opts, name: static_nsn}, model: {conv: {kind: static}}}\n"
    )
    path = tmp_path / "multi.yaml"
    path.write_text(config)
    out = tmp_path / "multi"
    status, stdout, stderr = run_cli(
        capsys,
        "train",
        "--config",
        str(path),
        "--out",
        str(out),
        "--quiet",
        "episodes.test_shots=[1]",
    )
    assert status == 0, stderr
    table = stdout.split("accuracy (%)")[1]
    assert "plain" in table and "static" in table
    assert (out / "plain" / "results.json").is_file() and (out / "static" / "best.pt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["plain", "static"]
    for row, name in zip(summary["rows"], ("plain", "static")):  # numbers, not "73.99 ± 0.84"
        test = json.loads((out / name / "results.json").read_text())["test"]["1"]
        assert (row["mean"], row["ci95"], row["episodes"], row["query"]) == (
            test["mean"],
            test["ci95"],
            4,
            2,
        )

    # Resuming a finished multi-run directory reuses results; extending trains on.
    status, stdout, stderr = run_cli(
        capsys, "train", "--resume", str(out), "--quiet", "train.steps=3"
    )
    assert status == 0, stderr
    assert "resumed" in stderr
    results = json.loads((out / "static" / "results.json").read_text())
    assert results["steps"] == 3


def test_unknown_config_key_is_one_line_exit_2(tiny: Path, capsys) -> None:
    status, stdout, stderr = run_cli(capsys, "train", "--config", str(tiny), "train.stepz=3")
    assert status == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "train.stepz" in stderr and "allowed keys" in stderr and "'steps'" in stderr


def test_bad_learner_name_lists_allowed_values(tiny: Path, capsys) -> None:
    status, _, stderr = run_cli(capsys, "train", "--config", str(tiny), "learner.name=reptile")
    assert status == 2 and "learner.name" in stderr and "'protonet'" in stderr


def test_missing_dataset_says_how_to_prepare_it(tiny: Path, tmp_path: Path, capsys) -> None:
    status, _, stderr = run_cli(
        capsys,
        "train",
        "--config",
        str(tiny),
        "--out",
        str(tmp_path / "r"),
        "data.dataset=mini-imagenet",
        f"data.root={tmp_path / 'absent'}",
        "data.options={}",
    )
    assert status == 2 and stderr.count("\n") == 1
    assert "fewshot-nsl prepare-data --dataset mini-imagenet" in stderr


def test_resume_with_another_architecture_is_refused(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert (
        run_cli(
            capsys,
            "train",
            "--config",
            str(tiny),
            "--out",
            str(out),
            "--quiet",
            "train.steps=1",
            "episodes.test_shots=[1]",
        )[0]
        == 0
    )
    status, _, stderr = run_cli(
        capsys, "train", "--resume", str(out), "--quiet", "model.backbone_options.filters=8"
    )
    assert status == 2
    assert "model.backbone_options.filters: checkpoint 4, config 8" in stderr

    # eval of a checkpoint whose weights do not fit its (edited) config: what differs.
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    checkpoint["config"]["model"]["backbone_options"]["filters"] = 8
    write_checkpoint_state(tmp_path / "edited.pt", checkpoint)  # with a fresh content hash
    status, _, stderr = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "edited.pt"))
    assert status == 2 and "architecture mismatch" in stderr and "shape" in stderr


def test_eval_compare_refuses_other_way(tiny: Path, tmp_path: Path, capsys) -> None:
    for name, way in (("a", 3), ("b", 2)):
        assert (
            run_cli(
                capsys,
                "train",
                "--config",
                str(tiny),
                "--out",
                str(tmp_path / name),
                "--quiet",
                "train.steps=1",
                "train.val_every=0",
                f"episodes.way={way}",
                "episodes.test_shots=[1]",
            )[0]
            == 0
        )
    status, _, stderr = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        str(tmp_path / "a" / "last.pt"),
        "--compare",
        str(tmp_path / "b" / "last.pt"),
    )
    assert status == 2 and "way 3 vs 2" in stderr


def test_missing_checkpoint_and_config(tmp_path: Path, capsys) -> None:
    status, _, stderr = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "x.pt"))
    assert status == 2 and "x.pt does not exist" in stderr
    status, _, stderr = run_cli(capsys, "train", "--config", str(tmp_path / "none.yaml"))
    assert status == 2 and "none.yaml does not exist" in stderr


def test_list(capsys) -> None:
    status, stdout, _ = run_cli(capsys, "list")
    assert status == 0
    for item in (
        "datasets:",
        "synthetic",
        "mini-imagenet",
        "backbones:",
        "conv4",
        "learners:",
        "dynamic_nsn",
        "configs (in ",
        "\n  quickstart.yaml\n",  # relative to the configs folder named in the heading
    ):
        assert item in stdout
    # each config with what it reproduces (its reference block), briefly
    configs = run_cli(capsys, "list", "configs")[1].splitlines()
    at = next(
        i
        for i, line in enumerate(configs)
        if line.endswith("maml_conv4_miniimagenet_1shot_reference.yaml")
    )
    assert configs[at + 1].strip() == (
        "reproduces: MAML, MiniImagenet 5-way 1-shot, as main.py's command line and the "
        "reference graph"
    )
    assert configs[at + 2].strip().startswith("published: 48.70 ± 1.84 %")
    assert configs[at + 2].strip().endswith("; 0 deviation(s) listed in the file")
    assert run_cli(capsys, "list", "learners")[1].split() == [
        "learners:",
        "dynamic_nsn",
        "maml",
        "protonet",
        "static_nsn",
    ]


def test_prepare_data_errors_cleanly(tmp_path: Path, capsys) -> None:
    status, _, stderr = run_cli(
        capsys,
        "prepare-data",
        "--dataset",
        "mini-imagenet",
        "--source",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "cache"),
    )
    assert status == 2 and "nope" in stderr


def test_prepare_data_converts_a_dataset(tmp_path: Path, capsys) -> None:
    from episodes import load_cache
    from tests.conftest import write_mini_imagenet_layouts

    layouts = write_mini_imagenet_layouts(tmp_path / "src")
    out = tmp_path / "cache"
    status, stdout, stderr = run_cli(
        capsys,
        "prepare-data",
        "--dataset",
        "mini-imagenet",
        "--source",
        str(layouts["pickle"]),
        "--out",
        str(out),
        "--no-strict",
    )
    assert status == 0, stderr
    assert f"data.root={out}" in stdout
    assert load_cache(out, "train").num_classes > 0


def test_format_table_aligns_columns() -> None:
    text = format_table([{"method": "maml", "shot": 1}, {"method": "dynamic_nsn", "shot": 5}])
    lines = text.splitlines()
    assert lines[0].startswith("method       shot") and len(lines) == 4


def test_console_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fewshot_nsl.cli", "list", "backbones"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "conv4" in result.stdout


def test_eval_replays_a_manifest(tiny: Path, tmp_path: Path, capsys) -> None:
    from episodes import EpisodeSampler, build_split, save_manifest

    out = tmp_path / "run"
    assert (
        run_cli(
            capsys,
            "train",
            "--config",
            str(tiny),
            "--out",
            str(out),
            "--quiet",
            "train.steps=1",
            "train.val_every=0",
            "episodes.test_shots=[1]",
        )[0]
        == 0
    )
    split = build_split(
        "synthetic",
        "test",
        image_size=16,
        images_per_class=8,
        num_classes={"train": 10, "val": 6, "test": 6},
    )
    sampler = EpisodeSampler(split, 3, 1, 2, seed=5, num_episodes=3)
    save_manifest(tmp_path / "test_1shot.json", sampler, 3)
    status, stdout, stderr = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        str(out / "last.pt"),
        "--shots",
        "1",
        "--manifest",
        str(tmp_path / "test_{shot}shot.json"),
        "--json",
        str(tmp_path / "m.json"),
    )
    assert status == 0, stderr
    test = json.loads((tmp_path / "m.json").read_text())["models"]["tiny"]["test"]["1"]
    assert test["episodes"] == 3 and test["source"].startswith("manifest")
    # A manifest of another shot setting is refused, naming both values.
    status, _, stderr = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        str(out / "last.pt"),
        "--shots",
        "5",
        "--manifest",
        str(tmp_path / "test_1shot.json"),
    )
    assert status == 2 and "shot" in stderr

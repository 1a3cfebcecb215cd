"""A quiet, responsive command line (issue 15): the version, a reader that goes away, config
listing, errors that name their source, overrides that switch datasets cleanly, one line per
run on the terminal, and progress of the long evaluation phases."""

from __future__ import annotations

import io
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fewshot_nsl import __version__
from fewshot_nsl.cli import main
from fewshot_nsl.config import ConfigError
from fewshot_nsl.evaluation import episode_progress
from fewshot_nsl.fewshot_config import load_fewshot_config, resolve_fewshot_config
from fewshot_nsl.supervised.config import load_supervised_config
from tests.test_cli import TINY_YAML, run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"


# -- version, pipes, listing ------------------------------------------------------------------


def test_version_prints_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"fewshot-nsl {__version__}\n"


def test_list_into_a_closed_pipe_ends_quietly() -> None:
    """The reader is gone before anything is written: no BrokenPipeError traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fewshot_nsl.cli", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before the interpreter has even imported the package
    stderr = process.stderr.read()
    assert process.wait(timeout=120) in (0, 141)
    assert stderr == b""


def test_list_piped_into_head() -> None:
    command = f"set -o pipefail; {shlex.quote(sys.executable)} -m fewshot_nsl.cli list | head -1"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 141), result.stderr
    assert result.stdout == "datasets:\n" and result.stderr == ""


def test_a_closed_stdout_in_process_gives_status_141(monkeypatch) -> None:
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())  # no file descriptor to redirect
    assert main(["list"]) == 141


def test_list_configs_are_relative_to_the_configs_folder(capsys) -> None:
    status, stdout, _ = run_cli(capsys, "list", "configs")
    assert status == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("configs (in ") and lines[0].endswith("):")
    folder = Path(lines[0][len("configs (in ") : -2])
    # Each name at two spaces; what it reproduces (its reference: block) indented below it.
    names = [line.strip() for line in lines[1:] if line.startswith("  ") and line[2] != " "]
    assert "quickstart.yaml" in names
    assert any(line.startswith("      reproduces: ") for line in lines)
    assert all((folder / name).is_file() and not name.startswith("configs") for name in names)


# -- where an error comes from ----------------------------------------------------------------


def test_an_override_error_names_the_command_line(tiny: Path, capsys) -> None:
    status, _, stderr = run_cli(capsys, "train", "--config", str(tiny), "train.stepz=3")
    assert status == 2
    assert stderr.startswith("fewshot-nsl: error: command line: train.stepz: unknown key")
    assert str(tiny) not in stderr
    status, _, stderr = run_cli(capsys, "train", "--config", str(tiny), "trainsteps3")
    assert status == 2 and stderr.startswith("fewshot-nsl: error: command line: override")
    status, _, stderr = run_cli(capsys, "train", "--config", str(tiny), "runs.a.train.steps=3")
    assert status == 2 and "command line: override runs.a.train.steps" in stderr


def test_a_file_error_still_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_YAML.replace("steps: 2", "stepz: 2"))
    with pytest.raises(ConfigError, match=f"^{bad}: train.stepz: unknown key"):
        load_fewshot_config(bad, ["train.steps=3"])  # fine on its own: the file is at fault
    with pytest.raises(ConfigError, match=f"^{bad}: train.stepz"):
        load_fewshot_config(bad, ["train.stepz=3"])  # the same error with or without it
    # An override that mends the file is no error at all.
    fixed = tmp_path / "fixable.yaml"
    fixed.write_text(TINY_YAML.replace("log_every: 1", "log_every: 0"))
    assert load_fewshot_config(fixed, ["train.log_every=5"])["train"]["log_every"] == 5


# -- a dataset switched on the command line or in a run drops the old dataset's options -----


def test_overriding_the_dataset_drops_the_configs_options() -> None:
    config = load_fewshot_config(QUICKSTART, ["data.dataset=imagefolder", "data.root=/x"])
    for name, run in config["runs"].items():
        assert run["data"] == {**run["data"], "dataset": "imagefolder", "options": {}}, name
    # Options given on the command line apply on top, in either order.
    for overrides in (
        ["data.dataset=imagefolder", "data.options.channels=1"],
        ["data.options.channels=1", "data.dataset=imagefolder"],
    ):
        config = load_fewshot_config(QUICKSTART, overrides)
        assert config["data"]["options"] == {"channels": 1}
    # The same dataset, or another root of it, keeps them.
    kept = load_fewshot_config(QUICKSTART)["data"]["options"]
    assert kept["image_size"] == 20
    assert load_fewshot_config(QUICKSTART, ["data.dataset=synthetic"])["data"]["options"] == kept
    root_only = load_fewshot_config(QUICKSTART, ["data.root=/elsewhere"])
    assert root_only["data"]["options"] == kept


def test_a_run_switching_the_dataset_drops_the_base_options() -> None:
    base = {"data": {"options": {"image_size": 20}}}  # dataset left at its default, synthetic
    config = resolve_fewshot_config(
        {
            **base,
            "runs": {
                "same": {"data": {"dataset": "synthetic"}},
                "other": {"data": {"dataset": "imagefolder", "root": "/x"}},
                "own": {"data": {"dataset": "imagefolder", "options": {"channels": 1}}},
            },
        }
    )
    runs = config["runs"]
    assert runs["same"]["data"]["options"] == {"image_size": 20}
    assert runs["other"]["data"]["options"] == {}
    assert runs["own"]["data"]["options"] == {"channels": 1}


def test_supervised_dataset_override_drops_the_synthetic_options() -> None:
    path = CONFIGS / "supervised_quickstart.yaml"
    assert load_supervised_config(path)["data"]["options"]  # the synthetic data's sizes
    config = load_supervised_config(path, ["data.dataset=cifar10", "data.root=/x"])
    assert config["data"]["options"] == {}


def write_image_folder(root: Path) -> None:
    """``root/{train,val,test}/<class>/*.png``: 5 classes per split, 4 grayscale images of
    mixed sizes per class (prepare-data --image-size makes them one size)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(5):
            folder = root / split / f"{split}{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, size=(24 + i, 22), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.slow
def test_quickstart_trains_on_an_image_folder_with_two_overrides(tmp_path: Path, capsys) -> None:
    """The README's three lines: prepare-data, then the quickstart with data.dataset and
    data.root overridden (no data.options={} needed), on a tiny generated image folder."""
    write_image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    status, stdout, stderr = run_cli(
        capsys,
        "prepare-data",
        "--dataset",
        "imagefolder",
        "--source",
        str(tmp_path / "images"),
        "--out",
        str(cache),
        "--image-size",
        "20",  # the quickstart's model.backbone_options.image_size
    )
    assert status == 0, stderr
    out = tmp_path / "runs"
    status, stdout, stderr = run_cli(
        capsys,
        "train",
        "--config",
        str(QUICKSTART),
        "--out",
        str(out),
        "--quiet",
        "data.dataset=imagefolder",
        f"data.root={cache}",
        # small: seconds, not minutes
        "train.steps=1",
        "episodes.query=2",
        "episodes.test_query=2",
        "episodes.val_episodes=0",
        "episodes.test_episodes=2",
        "episodes.test_shots=[1]",
    )
    assert status == 0, stderr
    for name in ("maml", "static_nsn", "dynamic_nsn", "protonet"):
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        assert config["data"]["options"] == {} and config["data"]["root"] == str(cache)
        assert (out / name / "results.json").is_file()


# -- the terminal: one line per run, nothing else under --quiet -------------------------------


@pytest.mark.slow
def test_quiet_train_prints_one_line_per_run_and_the_results(tmp_path: Path, capsys) -> None:
    config = tmp_path / "two.yaml"
    config.write_text(TINY_YAML + "runs: {a: {}, b: {train: {seed: 1}}}\n")
    out = tmp_path / "out"
    status, stdout, stderr = run_cli(
        capsys, "train", "--config", str(config), "--out", str(out), "--quiet"
    )
    assert status == 0, stderr
    assert stderr.splitlines() == [
        f"[a] run directory {out / 'a'}",
        f"[b] run directory {out / 'b'}",
    ]
    assert "accuracy (%) ± 95% CI" in stdout and "learner:" not in stdout
    assert stdout.rstrip().splitlines()[-1].endswith(f"run directory {out}")
    for name in ("a", "b"):
        saved = yaml.safe_load((out / name / "config.yaml").read_text())  # the config: here
        assert saved["name"] == name and saved["learner"]["name"] == "maml"


@pytest.mark.slow
def test_train_supervised_accepts_threads_and_prints_no_config(tmp_path: Path, capsys) -> None:
    from tests.test_supervised import TINY_BACKBONE

    config = tmp_path / "sup.yaml"
    config.write_text(
        "data: {dataset: synthetic, augment: false, options: {num_classes: 3, "
        "train_per_class: 6, test_per_class: 2, image_size: 16}}\n"
        f"model: {{backbone: cnn9, backbone_options: {TINY_BACKBONE}}}\n"
    )
    out = tmp_path / "run"
    torch.set_num_threads(2)
    status, stdout, stderr = run_cli(
        capsys,
        "train-supervised",
        "--config",
        str(config),
        "--out",
        str(out),
        "--quiet",
        "train.threads=1",
        "train.iterations=1",
        "train.batch_size=4",
        "train.device=cpu",
        "eval.speed_rounds=0",
    )
    assert status == 0, stderr
    assert torch.get_num_threads() == 1  # train.threads was applied
    assert stderr.splitlines() == [f"[sup] run directory {out}"]
    assert "test error" in stdout and "backbone_options" not in stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["threads"] == 1


# -- progress of the long phases ----------------------------------------------------------


def test_progress_lines_every_tenth_and_at_the_end() -> None:
    lines: list[str] = []
    with episode_progress(25, "[x] test 1-shot", False, lines.append) as update:
        for _ in range(25):
            update(1)
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert done == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert all(line.startswith("[x] test 1-shot: ") and "/25 episodes (" in line for line in lines)


def test_progress_interval_keeps_a_short_phase_silent(capsys) -> None:
    lines: list[str] = []
    with episode_progress(10, "val", False, lines.append, min_interval_s=3600) as update:
        for _ in range(10):
            update(1)
    with episode_progress(10, "val", False, None) as update:  # no log: nothing
        update(10)
    assert lines == [] and capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_bar_not_lines(capsys) -> None:
    lines: list[str] = []
    with episode_progress(4, "[x] test 5-shot", True, lines.append) as update:
        for _ in range(4):
            update(1)
    assert lines == [] and "[x] test 5-shot" in capsys.readouterr().err


@pytest.mark.slow
def test_test_phase_and_eval_report_progress_in_a_log(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    status, _, stderr = run_cli(
        capsys, "train", "--config", str(tiny), "--out", str(out), "episodes.test_episodes=10"
    )
    assert status == 0, stderr
    assert "[tiny] test 1-shot: 5/10 episodes" in stderr
    assert "[tiny] test 5-shot: 10/10 episodes" in stderr
    checkpoint = str(out / "best.pt")
    status, _, stderr = run_cli(capsys, "eval", "--checkpoint", checkpoint, "--episodes", "20")
    assert status == 0, stderr
    assert "[tiny] test 1-shot: 2/20 episodes" in stderr and "20/20" in stderr
    status, _, stderr = run_cli(capsys, "eval", "--checkpoint", checkpoint, "--quiet")
    assert status == 0 and stderr == ""

"""Fault injection through the command line (issue 12, training side): run directories a fresh
run must not touch, one writer, divergence, values that cannot be right, SIGTERM, damaged or
missing checkpoints on resume. Each case runs ``fewshot-nsl train`` / ``train-supervised`` on
tiny synthetic runs (in-process ``main`` or real subprocesses) and checks that nothing was
lost and that every error is one ``fewshot-nsl: error:`` line without a traceback.
The table of these cases is in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fewshot_nsl.checkpoint import load_checkpoint
from fewshot_nsl.cli import main
from fewshot_nsl.runlog import RunLock
from tests.test_cli import TINY_YAML
from tests.test_cli import run_cli as run
from tests.test_supervised import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]

SUPERVISED_YAML = (
    "data: {dataset: synthetic, augment: true, options: {num_classes: 3, "
    "train_per_class: 10, test_per_class: 4, image_size: 16}}\n"
    f"model: {{backbone: cnn9, backbone_options: {json.dumps(TINY_BACKBONE)}}}\n"
    "train: {iterations: 4, batch_size: 8, device: cpu, log_every: 1, eval_every: 2, "
    "checkpoint_every: 2, lr_milestones: []}\n"
    "eval: {speed_rounds: 0}\n"
)


@pytest.fixture
def supervised(tmp_path: Path) -> Path:
    path = tmp_path / "supervised.yaml"
    path.write_text(SUPERVISED_YAML)
    return path


def one_line_error(stderr: str) -> str:
    """The error line; asserts it is the last line, one line, and no traceback was shown."""
    assert "Traceback" not in stderr, stderr
    last = stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("fewshot-nsl: error: "), stderr
    return last


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "run.lock"
    }


def strict_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a metrics file parsed by a reader that refuses NaN/Infinity."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{path}: bare {constant} in JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# -- a fresh run never touches an existing run -------------------------------------------------


@pytest.mark.slow
def test_a_second_fresh_run_is_refused_and_overwrite_replaces_the_run_whole(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    status, _, stderr = run(capsys, "train", "--config", str(tiny), "--out", str(out), "--quiet")
    assert status == 0, stderr
    before = snapshot(out)

    status, stdout, stderr = run(
        capsys, "train", "--config", str(tiny), "--out", str(out), "--quiet", "train.seed=1"
    )
    line = one_line_error(stderr)
    assert status == 2 and "--resume" in line and "--overwrite" in line and str(out) in line
    assert "accuracy" not in stdout
    assert snapshot(out) == before  # not one byte of the old run changed

    (out / "notes.txt").write_text("mine")  # a user's file in the run directory
    (out / "extra.pt").write_text("x")
    status, _, stderr = run(
        capsys,
        "train", "--config", str(tiny), "--out", str(out), "--quiet", "--overwrite",
        "train.seed=1", "train.steps=1",
    )  # fmt: skip
    assert status == 0, stderr
    assert "removed the run" in stderr and "notes.txt" in stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "extra.pt").is_file()
    steps = {record["step"] for record in strict_json_lines(out / "metrics.jsonl")}
    assert steps == {1}  # no record of the old 2-step run left
    assert load_checkpoint(out / "last.pt")["config"]["train"]["seed"] == 1

    with pytest.raises(SystemExit) as exit_info:  # argparse: the two exclude each other
        main(["train", "--config", str(tiny), "--resume", str(out), "--overwrite"])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_fresh_multi_run_is_refused(tiny: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "multi.yaml"
    config.write_text(TINY_YAML + "runs:\n  a: {}\n  b: {train: {seed: 1}}\n")
    out = tmp_path / "multi"
    argv = ["train", "--config", str(config), "--out", str(out), "--quiet", "train.steps=1"]
    argv += ["episodes.test_shots=[1]"]
    status, _, stderr = run(capsys, *argv)
    assert status == 0, stderr
    before = snapshot(out)
    status, _, stderr = run(capsys, *argv)
    assert status == 2 and "--overwrite" in one_line_error(stderr)
    assert snapshot(out) == before
    status, _, stderr = run(capsys, *argv, "--overwrite")
    assert status == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "a", "b", "config.yaml", "run.lock", "summary.json",
    ]  # fmt: skip


def test_missing_data_leaves_no_run_folder(tiny: Path, tmp_path: Path, capsys) -> None:
    multi = tmp_path / "multi.yaml"
    multi.write_text(TINY_YAML + "runs:\n  a: {}\n")
    for config in (tiny, multi):
        out = tmp_path / "never"
        status, _, stderr = run(
            capsys, "train", "--config", str(config), "--out", str(out),
            "data.dataset=mini-imagenet",
            f"data.root={tmp_path / 'absent'}", "data.options={}",
        )  # fmt: skip
        assert status == 2 and "prepare-data" in one_line_error(stderr)
        assert not out.exists()


# -- one writer ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_writer_is_refused_then_sigterm_stops_and_resumes_bit_for_bit(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    """A real process trains; a second writer (this process) is refused naming its pid;
    SIGTERM stops it after a step with last.pt written (exit 143, the resume command with the
    real path); resuming gives the uninterrupted run's weights and test accuracies exactly."""
    out = tmp_path / "run"
    # Many steps so that it is still training when the signal comes; constant learning rate,
    # so a shorter uninterrupted run follows the same trajectory.
    writer = subprocess.Popen(
        [sys.executable, "-m", "fewshot_nsl.cli", "train", "--config", str(tiny), "--out",
         str(out), "--quiet", "train.steps=100000", "train.val_every=3"],
        env=subprocess_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").is_file():  # the lock is held and a step is done
            assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
            assert time.monotonic() < deadline, "the writer never started training"
            time.sleep(0.05)
        assert RunLock.is_held(out)
        before = (out / "config.yaml").read_bytes()
        for argv in (
            ["--config", str(tiny), "--out", str(out)],
            ["--config", str(tiny), "--out", str(out), "--overwrite"],
            ["--resume", str(out)],
        ):
            status, _, stderr = run(capsys, "train", *argv, "--quiet")
            line = one_line_error(stderr)
            assert status == 2 and f"pid {writer.pid}" in line and "in use" in line
        assert (out / "config.yaml").read_bytes() == before
        writer.send_signal(signal.SIGTERM)
        _, stderr = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 143, stderr
    last = stderr.rstrip("\n").splitlines()[-1]
    assert "Traceback" not in stderr and "SIGTERM" in last
    assert last.endswith(f"resume with: fewshot-nsl train --resume {out.resolve()}")
    stopped = load_checkpoint(out / "last.pt")["step"]
    assert f"at step {stopped};" in last
    strict_json_lines(out / "metrics.jsonl")
    assert not RunLock.is_held(out)

    steps = f"train.steps={stopped + 2}"
    status, _, stderr = run(capsys, "train", "--resume", str(out), "--quiet", steps)
    assert status == 0, stderr
    full = tmp_path / "full"
    argv = ["train", "--config", str(tiny), "--out", str(full), "--quiet", steps]
    status, _, stderr = run(capsys, *argv, "train.val_every=3")
    assert status == 0, stderr
    assert_same_run(out, full)


@pytest.mark.slow
def test_sigterm_during_the_final_test_stops_without_results_and_resume_only_tests(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    """SIGTERM to a real process in its final test (training over, last.pt written at the last
    step): the test stops at once, exit 143, no results.json, the resume command; the resume
    runs only the test and gives the uninterrupted run's results and metrics."""
    out = tmp_path / "run"
    # A test of many episodes, so the signal lands in it; training is the tiny run's 2 steps.
    writer = subprocess.Popen(
        [sys.executable, "-m", "fewshot_nsl.cli", "train", "--config", str(tiny), "--out",
         str(out), "--quiet", "episodes.test_episodes=100000"],
        env=subprocess_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").is_file() or load_checkpoint(out / "last.pt")["step"] != 2:
            assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
            assert time.monotonic() < deadline, "the writer never finished training"
            time.sleep(0.05)
        time.sleep(0.5)  # from saving last.pt into the test
        trained = (out / "last.pt").read_bytes()
        writer.send_signal(signal.SIGTERM)
        stdout, stderr = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 143, stderr
    last = stderr.rstrip("\n").splitlines()[-1]
    assert "Traceback" not in stderr and "accuracy" not in stdout
    assert "stopped by SIGTERM during the test after the last step (2)" in last
    assert last.endswith(f"resume with: fewshot-nsl train --resume {out.resolve()}")
    assert not (out / "results.json").exists() and not RunLock.is_held(out)
    assert (out / "last.pt").read_bytes() == trained  # not rewritten (with the best weights)
    strict_json_lines(out / "metrics.jsonl")

    status, _, stderr = run(  # the tiny run's test, as the uninterrupted run's
        capsys, "train", "--resume", str(out), "--quiet", "episodes.test_episodes=4"
    )
    assert status == 0, stderr
    assert (out / "last.pt").read_bytes() == trained  # no training step on resume
    full = tmp_path / "full"
    status, _, stderr = run(capsys, "train", "--config", str(tiny), "--out", str(full), "--quiet")
    assert status == 0, stderr
    assert_same_run(out, full)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights, identical per-episode test accuracies and metrics."""
    last_a, last_b = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert last_a["step"] == last_b["step"]
    for name, tensor in last_a["model"].items():
        assert torch.equal(tensor, last_b["model"][name]), name
    results_a = json.loads((a / "results.json").read_text())
    results_b = json.loads((b / "results.json").read_text())
    for key in ("test", "test_error", "tested_step", "best"):
        assert results_a.get(key) == results_b.get(key), key
    records_a, records_b = (
        [
            {k: v for k, v in r.items() if k != "time"}
            for r in strict_json_lines(run / "metrics.jsonl")
        ]
        for run in (a, b)
    )
    assert records_a == records_b  # each record once, the same values


@pytest.mark.slow
def test_train_supervised_sigterm_then_resume_equals_an_uninterrupted_run(
    supervised: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """SIGTERM delivered in the middle of the third of 4 steps: the step finishes and last.pt
    is written at step 3, off the checkpoint cadence (every 2)."""
    from fewshot_nsl.supervised.train import SupervisedTrainer

    original = SupervisedTrainer.gradient_step

    def signalled(self: SupervisedTrainer, step: int) -> dict[str, float]:
        if step == 2 and os.environ.get("FAULTS_SIGTERM") == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)

    monkeypatch.setattr(SupervisedTrainer, "gradient_step", signalled)
    handler = signal.getsignal(signal.SIGTERM)
    out, full = tmp_path / "run", tmp_path / "full"
    monkeypatch.setenv("FAULTS_SIGTERM", "1")
    status, _, stderr = run(
        capsys, "train-supervised", "--config", str(supervised), "--out", str(out), "--quiet"
    )
    assert status == 143, stderr
    assert load_checkpoint(out / "last.pt")["step"] == 3  # the step in progress finished
    assert not (out / "results.json").exists()
    where = out.resolve()
    assert stderr.rstrip().endswith(
        f"resume with: fewshot-nsl train-supervised --config {where / 'config.yaml'} "
        f"--resume {where}"
    )
    monkeypatch.setenv("FAULTS_SIGTERM", "0")
    status, _, stderr = run(
        capsys, "train-supervised", "--config", str(where / "config.yaml"), "--resume",
        str(where), "--quiet",
    )  # fmt: skip
    assert status == 0, stderr
    status, _, stderr = run(
        capsys, "train-supervised", "--config", str(supervised), "--out", str(full), "--quiet"
    )
    assert status == 0, stderr
    assert_same_run(out, full)
    assert signal.getsignal(signal.SIGTERM) == handler  # the handler is put back


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_with_last_pt_and_exit_130(
    tiny: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from fewshot_nsl.runner import MetaTrainer

    original = MetaTrainer.gradient_step

    def interrupted(self: MetaTrainer, step: int) -> dict[str, float]:
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C
        return original(self, step)

    monkeypatch.setattr(MetaTrainer, "gradient_step", interrupted)
    out = tmp_path / "run"
    status, stdout, stderr = run(
        capsys, "train", "--config", str(tiny), "--out", str(out), "--quiet",
        "train.steps=4", "train.checkpoint_every=3",
    )  # fmt: skip
    assert status == 130 and "Traceback" not in stderr
    assert "stopped by SIGINT at step 2" in stderr and "accuracy" not in stdout
    assert load_checkpoint(out / "last.pt")["step"] == 2  # off the checkpoint cadence
    assert not RunLock.is_held(out) and not (out / "results.json").exists()

    def pressed_twice(self: MetaTrainer, step: int) -> dict[str, float]:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second stops at once
        return original(self, step)

    monkeypatch.setattr(MetaTrainer, "gradient_step", pressed_twice)
    status, stdout, stderr = run(
        capsys, "train", "--resume", str(out), "--quiet", "train.steps=6",
    )  # fmt: skip
    assert status == 130 and "Traceback" not in stderr and "interrupted" in stderr
    assert load_checkpoint(out / "last.pt")["step"] == 3  # the last checkpoint (every 3)
    assert not RunLock.is_held(out)


# -- divergence and values that cannot be right ------------------------------------------------


@pytest.mark.slow
def test_divergence_stops_naming_the_step_and_keeps_finite_checkpoints(
    tiny: Path, supervised: Path, tmp_path: Path, capsys
) -> None:
    for command, config, extra in (
        ("train", tiny, ["train.steps=6", "train.lr=1e30"]),
        ("train-supervised", supervised, ["train.lr=1e30", "train.iterations=6"]),
    ):
        out = tmp_path / command
        status, stdout, stderr = run(
            capsys, command, "--config", str(config), "--out", str(out), "--quiet", *extra
        )
        line = one_line_error(stderr)
        assert status == 2 and "training diverged at step" in line and "lower train.lr" in line
        assert "accuracy" not in stdout and "test error" not in stdout
        assert not (out / "results.json").exists()
        for name in ("last.pt", "best.pt"):  # what was written is whole and finite
            if (out / name).exists():
                state = load_checkpoint(out / name)
                assert all(torch.isfinite(t).all() for t in state["model"].values()), name
        step = int(line.split("training diverged at step ")[1].split(":")[0])
        if (out / "last.pt").exists():
            assert load_checkpoint(out / "last.pt")["step"] < step
            assert f"(step {load_checkpoint(out / 'last.pt')['step']})" in line
        records = strict_json_lines(out / "metrics.jsonl")
        # The diverged step's own training record may be there (its loss was finite: the
        # weights it produced are what overflowed); no evaluation of them, nothing later.
        assert all(record["step"] <= step for record in records)
        assert not [r for r in records if r["step"] == step and r["event"] != "train"]


@pytest.mark.parametrize(
    "command, override, key",
    [
        ("train", "train.grad_clip=0", "train.grad_clip"),
        ("train", "train.grad_clip=-1", "train.grad_clip"),
        ("train", "train.grad_clip=.nan", "train.grad_clip"),
        ("train", "train.lr=nan", "train.lr"),
        ("train", "train.lr=-0.1", "train.lr"),
        ("train", "train.lr=0", "train.lr"),
        ("train", "train.steps=0", "train.steps"),
        ("train", "learner.inner_lr=nan", "learner.inner_lr"),
        ("train", "learner.inner_lr=.inf", "learner.inner_lr"),
        ("train", "learner.inner_lr=0", "learner.inner_lr"),
        ("train-supervised", "train.lr=nan", "train.lr"),
        ("train-supervised", "train.lr=0", "train.lr"),
        ("train-supervised", "train.momentum=nan", "train.momentum"),
        ("train-supervised", "train.iterations=0", "train.iterations"),
    ],
)
def test_values_that_cannot_be_right_are_refused_before_anything_is_created(
    command: str, override: str, key: str, tiny: Path, supervised: Path, tmp_path: Path, capsys
) -> None:
    config = tiny if command == "train" else supervised
    out = tmp_path / "never"
    status, _, stderr = run(capsys, command, "--config", str(config), "--out", str(out), override)
    assert status == 2 and f" {key}: " in one_line_error(stderr)
    assert not out.exists()


# -- resume: missing or damaged checkpoints, fewer steps, what was tested -----------------------


@pytest.mark.slow
def test_resume_without_last_pt_says_so(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    status, _, stderr = run(capsys, "train", "--config", str(tiny), "--out", str(out), "--quiet")
    assert status == 0, stderr
    (out / "last.pt").unlink()
    before = snapshot(out)
    status, _, stderr = run(capsys, "train", "--resume", str(out), "--quiet")
    line = one_line_error(stderr)
    assert status == 2 and "last.pt is missing" in line and "--overwrite" in line
    assert snapshot(out) == before

    # A run stopped before its first checkpoint: said, restarted from step 0, metrics cut.
    for name in ("best.pt", "results.json"):
        (out / name).unlink()
    status, _, stderr = run(capsys, "train", "--resume", str(out), "--quiet")
    assert status == 0, stderr
    assert "no last.pt" in stderr and "starting from step 0" in stderr
    records = strict_json_lines(out / "metrics.jsonl")
    train_steps = [record["step"] for record in records if record["event"] == "train"]
    assert train_steps == [1, 2]  # each step once, not the old records as well

    # --resume of a folder that holds no run at all: said.
    status, _, stderr = run(
        capsys, "train", "--config", str(tiny), "--resume", str(tmp_path / "empty"), "--quiet"
    )
    assert status == 2 and "no config.yaml" in one_line_error(stderr)


@pytest.mark.slow
def test_damaged_best_pt_on_resume_says_how_to_recover(tiny: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    status, _, stderr = run(capsys, "train", "--config", str(tiny), "--out", str(out), "--quiet")
    assert status == 0, stderr
    state = torch.load(out / "best.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name].view(-1)[0] += 1.0  # a changed weight, the hash left as it was
    torch.save(state, out / "best.pt")
    before = snapshot(out)
    for _ in range(2):  # the same clear answer every time, before any training
        status, _, stderr = run(capsys, "train", "--resume", str(out), "--quiet", "train.steps=3")
        line = one_line_error(stderr)
        assert status == 2 and "best.pt is damaged" in line and "content hash mismatch" in line
        assert "--overwrite" in line and "backup" in line
        assert snapshot(out) == before
    status, _, stderr = run(
        capsys, "train", "--config", str(tiny), "--out", str(out), "--overwrite", "--quiet"
    )  # the way out the message names
    assert status == 0, stderr
    load_checkpoint(out / "best.pt")


@pytest.mark.slow
def test_resume_to_fewer_steps_and_changed_val_every_report_the_tested_checkpoint(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    status, _, stderr = run(
        capsys, "train", "--config", str(tiny), "--out", str(out), "--quiet", "train.steps=3"
    )
    assert status == 0, stderr
    stale = out / ".last.pt.99999.deadbeef.fsnl.tmp"  # left by a writer killed mid-write
    stale.write_bytes(b"torn")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    status, _, stderr = run(capsys, "train", "--resume", str(out), "--quiet", "train.steps=2")
    assert status == 0, stderr
    assert not stale.exists()  # removed on start
    tests = [r for r in strict_json_lines(out / "metrics.jsonl") if r["event"] == "test"]
    assert sorted(r["shot"] for r in tests) == [1, 5]  # one test record per shot

    # More steps without validation: the tested weights are still the old best.pt.
    status, _, stderr = run(
        capsys, "train", "--resume", str(out), "--quiet", "train.steps=4", "train.val_every=0"
    )
    assert status == 0, stderr
    results = json.loads((out / "results.json").read_text())
    best = load_checkpoint(out / "best.pt")
    assert results["tested"] == "best.pt" and results["steps"] == 4
    assert results["tested_step"] == best["step"] <= 3 and results["best"] == best["best"]


@pytest.mark.slow
def test_a_best_pt_written_after_last_pt_is_the_one_tested_after_resume(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    """A run killed between writing best.pt (step 3) and its next last.pt (still step 1):
    resumed with another val_every (no validation at step 3 any more), the run keeps that
    best.pt as the best so far, tests it, and says so in results.json, as the uninterrupted
    run does. (Seed 2 with 6 validation episodes has its best validation at step 3 of 4.)"""
    settings = ["train.seed=2", "episodes.val_episodes=6"]
    full, part, killed = tmp_path / "full", tmp_path / "part", tmp_path / "killed"
    for out, steps in ((full, 4), (part, 1)):
        status, _, stderr = run(
            capsys, "train", "--config", str(tiny), "--out", str(out), "--quiet",
            f"train.steps={steps}", *settings,
        )  # fmt: skip
        assert status == 0, stderr
    assert load_checkpoint(full / "best.pt")["step"] == 3
    shutil.copytree(full, killed)
    (killed / "results.json").unlink()
    shutil.copy(part / "last.pt", killed / "last.pt")  # last.pt of step 1, best.pt of step 3

    status, _, stderr = run(
        capsys, "train", "--resume", str(killed), "--quiet", *settings, "train.steps=4",
        "train.val_every=4",
    )  # fmt: skip
    assert status == 0, stderr
    assert "best.pt is from step 3, after last.pt (step 1): keeping it" in stderr
    results = json.loads((killed / "results.json").read_text())
    expected = json.loads((full / "results.json").read_text())
    assert results["tested"] == "best.pt" and results["tested_step"] == 3
    for key in ("best", "tested_step", "test"):
        assert results[key] == expected[key], key

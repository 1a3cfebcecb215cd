"""Faults of eval / export / prepare-data and of dataset caches, driven through the CLI (issue 12).

Each case runs ``fewshot-nsl`` (``cli.main`` in this process, or ``python -m fewshot_nsl.cli``
/ a small ``python -c`` driver in a real process where the process itself is the fault: kill
-9, an unprivileged user) on tiny data: an imagefolder of 16×16 PNGs prepared into a cache, a
2-step episodic run and a 2-iteration supervised run on it. Every error must be exit 2 and one
line ``fewshot-nsl: error: ...`` (no traceback), and nothing a user had may be lost.

The shared data and runs are made once per module under umask 002 (not the usual 022), so
that the permission test can tell the umask was followed; the folder is 0755 so that the
unprivileged user of the permission tests can reach it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from episodes.fileio import is_temp_file, sampled_rows
from fewshot_nsl.checkpoint import load_checkpoint, write_checkpoint_state
from fewshot_nsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
UMASK = 0o002
#: Test split: 5 classes × 14 = 70 rows, more than the 64 rows the sampled hash reads.
SPLITS = {"train": (6, 8), "val": (3, 8), "test": (5, 14)}

EPISODIC_YAML = """
name: tiny
data: {{dataset: imagefolder, root: {root}}}
episodes: {{way: 3, shot: 1, query: 2, tasks_per_batch: 2, val_episodes: 2, test_episodes: 3,
           test_shots: [1], test_query: 2}}
model: {{backbone: conv4, backbone_options: {{filters: 4, image_size: 16}}}}
learner: {{name: maml, inner_steps: 1, inner_steps_eval: 1, inner_lr: 0.1}}
train: {{steps: 2, val_every: 1, checkpoint_every: 1, log_every: 1, device: cpu, threads: 1}}
"""

SUPERVISED_YAML = """
data: {dataset: synthetic, augment: false, options: {num_classes: 3, train_per_class: 6,
       test_per_class: 2, image_size: 8}}
model: {backbone: cnn9, backbone_options: {widths: [4, 4, 4], root_width: 4},
        conv: {kind: static, similarity: full, sharing: shared}}
train: {iterations: 2, batch_size: 6, device: cpu}
eval: {speed_rounds: 1, speed_repeats: 1, speed_batch_size: 2}
"""


# -- helpers -----------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, stderr: str, *fragments: str) -> str:
    """Exit 2, stderr ending in one ``fewshot-nsl: error:`` line holding every fragment and
    no traceback anywhere; returns that line."""
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("fewshot-nsl: error: "), stderr
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def write_image_folder(root: Path) -> Path:
    """``root/{train,val,test}/<class>/<i>.png``: grayscale 16×16 noise (imagefolder layout)."""
    rng = np.random.default_rng(0)
    for split, (classes, per_class) in SPLITS.items():
        for number in range(classes):
            folder = root / split / f"{split}{number}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def prepare(capsys: pytest.CaptureFixture[str], source: Path, out: Path, *extra: str) -> None:
    status, _, stderr = run_cli(
        capsys,
        "prepare-data",
        "--dataset",
        "imagefolder",
        "--source",
        source,
        "--out",
        out,
        "--no-strict",
        *extra,
    )
    assert status == 0, stderr


def checkpoint_on(checkpoint: Path, cache: Path, out: Path) -> Path:
    """A valid copy of ``checkpoint`` whose config reads its data from ``cache``: lets a test
    damage a copy of the shared cache, not the cache itself."""
    state = load_checkpoint(checkpoint)
    state["config"]["data"]["root"] = str(cache)
    return write_checkpoint_state(out, state)


def python_process(code: str, *args: str) -> subprocess.Popen[str]:
    """A real Python process running ``code`` against this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


#: Runs ``fewshot-nsl ARGS`` as an unprivileged user: as root (which ignores permissions) the
#: process drops to 'nobody' after its imports (nobody may not read the interpreter's files).
_UNPRIVILEGED_CLI = """
    import os, sys
    import fewshot_nsl.cli, fewshot_nsl.engine, fewshot_nsl.evaluation, fewshot_nsl.stats
    import fewshot_nsl.runner, fewshot_nsl.supervised.export, fewshot_nsl.distributed
    if os.geteuid() == 0:
        os.setgid(65534); os.setuid(65534)
    sys.exit(fewshot_nsl.cli.main(sys.argv[1:]))
"""


def run_unprivileged(*argv: str | Path) -> tuple[int, str]:
    process = python_process(_UNPRIVILEGED_CLI, *(str(a) for a in argv))
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Path]]:
    """Source images, their cache, an episodic run and a supervised run (made under ``UMASK``),
    in a 0755 folder the unprivileged user can reach."""
    base = Path(tempfile.mkdtemp(prefix="fsnl-faults-io-"))
    os.chmod(base, 0o755)
    threads = torch.get_num_threads()
    previous = os.umask(UMASK)
    capture = _NoCapture()
    try:
        source = write_image_folder(base / "src")
        cache = base / "cache"
        prepare(capture, source, cache)
        config = base / "tiny.yaml"
        config.write_text(EPISODIC_YAML.format(root=cache))
        run = base / "run"
        status = main(["train", "--config", str(config), "--out", str(run), "--quiet"])
        assert status == 0
        supervised_config = base / "sup.yaml"
        supervised_config.write_text(SUPERVISED_YAML)
        supervised = base / "sup"
        status = main(
            ["train-supervised", "--config", str(supervised_config), "--out", str(supervised)]
            + ["--quiet"]
        )
        assert status == 0
    finally:
        os.umask(previous)
        torch.set_num_threads(threads)
    yield {
        "base": base,
        "source": source,
        "cache": cache,
        "config": config,
        "run": run,
        "supervised": supervised,
    }
    _make_writable(base)
    shutil.rmtree(base, ignore_errors=True)


class _NoCapture:
    """Stands in for capsys in the module fixture (pytest captures its output anyway)."""

    def readouterr(self) -> Any:
        return type("Captured", (), {"out": "", "err": ""})()


def _make_writable(base: Path) -> None:
    for folder in [base, *(p for p in base.rglob("*") if p.is_dir())]:
        os.chmod(folder, 0o755)


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # train.threads=1 in the checkpoints' configs


# -- cache content -----------------------------------------------------------------------------


def test_cache_stores_content_hashes_and_a_zeroed_cache_is_refused(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    index = json.loads((world["cache"] / "index.json").read_text())
    assert index["version"] == 2
    for split in SPLITS:
        assert set(index["splits"][split]["content"]) == {"sampled", "full"}

    zeroed = tmp_path / "zeroed"
    shutil.copytree(world["cache"], zeroed)
    images = np.load(zeroed / "test.npy", mmap_mode="r+")
    images[:] = 0
    images.flush()
    del images
    checkpoint = checkpoint_on(world["run"] / "best.pt", zeroed, tmp_path / "on_zeroed.pt")
    status, stdout, stderr = run_cli(capsys, "eval", "--checkpoint", checkpoint, "--quiet")
    assert_one_line_error(status, stderr, f"{zeroed / 'test.npy'}", "content differs")
    assert "accuracy" not in stdout

    # train refuses too, before it writes any file.
    out = tmp_path / "fresh"
    status, _, stderr = run_cli(
        capsys, "train", "--config", world["config"], "--out", out, f"data.root={zeroed}"
    )
    assert_one_line_error(status, stderr, f"{zeroed / 'test.npy'}", "content differs")
    assert not out.exists() or not any(out.iterdir())


def test_a_change_outside_the_sample_needs_verify_data_full(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(world["cache"], changed)
    images = np.load(changed / "test.npy", mmap_mode="r+")
    unsampled = sorted(set(range(len(images))) - set(sampled_rows(len(images), 64).tolist()))
    assert unsampled, "the test split must have rows the sampled hash does not read"
    images[unsampled[0]] ^= 1  # one bit of every pixel of one row
    images.flush()
    del images
    checkpoint = checkpoint_on(world["run"] / "best.pt", changed, tmp_path / "on_changed.pt")
    args = ("eval", "--checkpoint", checkpoint, "--quiet", "--json", tmp_path / "e.json")
    status, _, stderr = run_cli(capsys, *args)
    assert status == 0, stderr  # the limit of the sampled check, by design
    status, _, stderr = run_cli(capsys, *args, "--overwrite", "--verify-data", "full")
    assert_one_line_error(status, stderr, f"{changed / 'test.npy'}", "stored full hash")
    status, _, stderr = run_cli(
        capsys,
        "train",
        "--config",
        world["config"],
        "--out",
        tmp_path / "fresh",
        f"data.root={changed}",
        "--verify-data",
        "full",
    )
    assert_one_line_error(status, stderr, f"{changed / 'test.npy'}", "stored full hash")


def test_a_cache_without_hashes_loads_with_one_warning(
    world: dict[str, Path], tmp_path: Path, capsys, caplog
) -> None:
    old = tmp_path / "old"
    shutil.copytree(world["cache"], old)
    index = json.loads((old / "index.json").read_text())
    index["version"] = 1
    for meta in index["splits"].values():
        del meta["content"]
    (old / "index.json").write_text(json.dumps(index))
    checkpoint = checkpoint_on(world["run"] / "best.pt", old, tmp_path / "on_old.pt")
    with caplog.at_level("WARNING", logger="episodes.datasets"):
        status, _, stderr = run_cli(capsys, "eval", "--checkpoint", checkpoint, "--quiet")
    assert status == 0, stderr
    warnings = [r.getMessage() for r in caplog.records if r.name == "episodes.datasets"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(old / "index.json") in warnings[0] and "prepare-data" in warnings[0]
    status, _, stderr = run_cli(
        capsys, "eval", "--checkpoint", checkpoint, "--quiet", "--verify-data", "full"
    )
    assert_one_line_error(status, stderr, "cannot verify", "--overwrite")


# -- checkpoints given to eval / export --------------------------------------------------------


def _flip_a_weight_bit(source: Path, out: Path) -> Path:
    """A copy of ``source`` with one bit flipped inside the bytes of a weight tensor."""
    data = bytearray(source.read_bytes())
    weights = next(
        tensor
        for tensor in load_checkpoint(source)["model"].values()
        if tensor.is_floating_point() and tensor.numel() >= 16
    )
    position = bytes(data).find(weights.numpy().tobytes())
    assert position > 0
    data[position + 5] ^= 0x10
    out.write_bytes(bytes(data))
    return out


def test_damaged_checkpoints_are_one_line_errors(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    best = world["run"] / "best.pt"
    flipped = _flip_a_weight_bit(best, tmp_path / "flipped.pt")
    status, stdout, stderr = run_cli(capsys, "eval", "--checkpoint", flipped, "--quiet")
    assert_one_line_error(status, stderr, str(flipped), "content hash mismatch (file damaged)")
    assert "accuracy" not in stdout

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    for damaged in (truncated, garbage):
        status, _, stderr = run_cli(capsys, "eval", "--checkpoint", damaged, "--quiet")
        line = assert_one_line_error(
            status, stderr, str(damaged), "truncated or not a fewshot-nsl checkpoint"
        )
        assert "weights_only" not in line  # not torch's advice to load unsafely
        status, _, stderr = run_cli(
            capsys, "export", "--checkpoint", damaged, "--out", tmp_path / "m.pt2"
        )
        assert_one_line_error(status, stderr, "truncated or not a fewshot-nsl checkpoint")
    assert not (tmp_path / "m.pt2").exists()
    # The --compare checkpoint is checked the same way.
    status, _, stderr = run_cli(
        capsys, "eval", "--checkpoint", best, "--compare", flipped, "--json", tmp_path / "c.json"
    )
    assert_one_line_error(status, stderr, str(flipped), "content hash mismatch")


def test_eval_and_export_refuse_the_other_commands_checkpoints(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    supervised = world["supervised"] / "last.pt"
    status, _, stderr = run_cli(capsys, "eval", "--checkpoint", supervised, "--quiet")
    assert_one_line_error(
        status, stderr, str(supervised), "written by `train-supervised`", "written by `train`"
    )
    episodic = world["run"] / "best.pt"
    status, _, stderr = run_cli(
        capsys, "export", "--checkpoint", episodic, "--out", tmp_path / "m.pt2"
    )
    assert_one_line_error(
        status, stderr, str(episodic), "written by `train`", "written by `train-supervised`"
    )
    assert not (tmp_path / "m.pt2").exists()


def test_eval_of_a_run_directory_uses_its_best_checkpoint(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    status, stdout, stderr = run_cli(capsys, "eval", "--checkpoint", run, "--quiet")
    assert status == 0, stderr
    assert f"--checkpoint {run}: a run directory, using {run / 'best.pt'}" in stderr
    payload = json.loads((run / "eval_best.json").read_text())
    assert payload["checkpoint"] == str(run / "best.pt")
    # Scored like the file itself: the same episodes, the same accuracies.
    status, _, stderr = run_cli(
        capsys, "eval", "--checkpoint", run / "best.pt", "--json", tmp_path / "file.json"
    )
    assert status == 0, stderr
    by_file = json.loads((tmp_path / "file.json").read_text())
    assert by_file["models"] == payload["models"]

    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, stderr = run_cli(capsys, "eval", "--checkpoint", empty)
    assert_one_line_error(status, stderr, str(empty), "without best.pt or last.pt")


def test_eval_never_replaces_a_results_file_without_overwrite(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """``--json FILE`` that exists is refused before the evaluation (one line naming it and
    ``--overwrite``); the default ``eval_best.json`` of an earlier eval is kept and the next
    eval (another protocol) writes ``eval_best-2.json``, saying so; ``--overwrite`` replaces."""
    precious = tmp_path / "mine.json"
    precious.write_text("a user's file")
    checkpoint = tmp_path / "ckpt" / "best.pt"
    checkpoint.parent.mkdir()
    shutil.copyfile(world["run"] / "best.pt", checkpoint)
    args = ("eval", "--checkpoint", checkpoint, "--quiet", "--episodes", "3")
    status, stdout, stderr = run_cli(capsys, *args, "--json", precious)
    assert_one_line_error(status, stderr, f"--json {precious} already exists", "--overwrite")
    assert precious.read_text() == "a user's file" and "accuracy" not in stdout
    status, _, stderr = run_cli(capsys, *args, "--json", precious, "--overwrite")
    assert status == 0, stderr
    assert json.loads(precious.read_text())["checkpoint"] == str(checkpoint)

    def episodes(path: Path) -> set[int]:
        (model,) = json.loads(path.read_text())["models"].values()
        return {result["episodes"] for result in model["test"].values()}

    first = checkpoint.with_name("eval_best.json")
    status, _, stderr = run_cli(capsys, *args)
    assert status == 0, stderr
    assert episodes(first) == {3}
    kept = first.read_bytes()
    second = checkpoint.with_name("eval_best-2.json")
    status, stdout, stderr = run_cli(capsys, "eval", "--checkpoint", checkpoint, "--episodes", "4")
    assert status == 0, stderr
    assert f"eval: {first} exists (an earlier eval): writing {second}" in stderr
    assert f"wrote {second}" in stdout
    assert first.read_bytes() == kept and episodes(second) == {4}
    status, stdout, _ = run_cli(capsys, "eval", "--checkpoint", checkpoint, "--episodes", "3")
    assert f"wrote {checkpoint.with_name('eval_best-3.json')}" in stdout
    status, stdout, stderr = run_cli(capsys, *args[:-1], "5", "--overwrite")
    assert status == 0, stderr
    assert f"wrote {first}" in stdout and episodes(first) == {5}
    names = sorted(p.name for p in checkpoint.parent.iterdir())
    assert names == ["best.pt", "eval_best-2.json", "eval_best-3.json", "eval_best.json"]


def test_export_never_replaces_a_file_without_overwrite(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    precious = tmp_path / "model.pt2"
    precious.write_text("a user's file")
    args = ("export", "--checkpoint", world["supervised"], "--out", precious)
    status, _, stderr = run_cli(capsys, *args)
    assert_one_line_error(status, stderr, str(precious), "already exists", "--overwrite")
    assert precious.read_text() == "a user's file"
    status, _, stderr = run_cli(
        capsys, "export", "--checkpoint", world["supervised"], "--out", tmp_path
    )
    assert_one_line_error(status, stderr, "is a folder")

    previous = os.umask(UMASK)
    try:
        status, stdout, stderr = run_cli(capsys, *args, "--overwrite")
    finally:
        os.umask(previous)
    assert status == 0, stderr
    assert "a run directory, using" in stderr  # --checkpoint DIR of the supervised run
    assert json.loads(stdout)["exported"] == str(precious)
    assert precious.read_bytes()[:2] == b"PK"  # a torch.export archive now
    assert stat.S_IMODE(precious.stat().st_mode) == 0o664  # umask 002
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temp file left


# -- unwritable outputs (real permission errors) -------------------------------------------------


def test_unwritable_outputs_are_one_line_errors(world: dict[str, Path]) -> None:
    base = world["base"]
    locked = base / "locked"
    locked.mkdir(mode=0o755)
    run = locked / "run"
    shutil.copytree(world["run"], run)
    shutil.copy2(world["supervised"] / "last.pt", locked / "sup.pt")
    for folder in (run, locked):
        os.chmod(folder, 0o555)
    try:
        # export --out into a read-only folder: before the (slow) export.
        status, stderr = run_unprivileged(
            "export", "--checkpoint", locked / "sup.pt", "--out", locked / "m.pt2"
        )
        assert_one_line_error(status, stderr, f"cannot write in {locked}: permission denied")
        # eval of a read-only run: said before the evaluation, with the way out.
        status, stderr = run_unprivileged("eval", "--checkpoint", run / "best.pt", "--quiet")
        assert_one_line_error(
            status, stderr, f"cannot write in {run}: permission denied", "--json FILE"
        )
        # prepare-data into a read-only folder: before decoding the images.
        status, stderr = run_unprivileged(
            "prepare-data",
            "--dataset",
            "imagefolder",
            "--source",
            world["source"],
            "--out",
            locked / "cache",
            "--no-strict",
        )
        assert_one_line_error(status, stderr, f"{locked}", "permission denied")
        assert sorted(p.name for p in locked.iterdir()) == ["run", "sup.pt"]
        assert sorted(p.name for p in run.iterdir()) == sorted(
            p.name for p in world["run"].iterdir()
        )
    finally:
        for folder in (run, locked):
            os.chmod(folder, 0o755)


def test_prepare_data_on_a_full_disk_names_the_file_and_leaves_nothing(
    world: dict[str, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    def full_disk(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    out = tmp_path / "cache"
    status, _, stderr = run_cli(
        capsys,
        "prepare-data",
        "--dataset",
        "imagefolder",
        "--source",
        world["source"],
        "--out",
        out,
        "--no-strict",
    )
    assert_one_line_error(status, stderr, f"cannot write {out}/", "no space left on device")
    assert list(tmp_path.iterdir()) == []  # no cache, no temp folder


# -- prepare-data killed ---------------------------------------------------------------------

#: prepare-data whose first array write stalls after writing (a big dataset, a slow disk):
#: prints "writing" then waits to be killed.
_STALLED_PREPARE = """
    import sys, time
    import numpy
    real_save = numpy.save
    def stalled_save(*args, **kwargs):
        real_save(*args, **kwargs)
        print("writing", flush=True)
        time.sleep(300)
    numpy.save = stalled_save
    from fewshot_nsl.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _kill_prepare_mid_write(source: Path, out: Path, *extra: str) -> None:
    process = python_process(
        _STALLED_PREPARE,
        *("prepare-data", "--dataset", "imagefolder", "--no-strict", *extra),
        *("--source", str(source), "--out", str(out)),
    )
    try:
        line = process.stdout.readline().strip()  # type: ignore[union-attr]
        assert line == "writing", process.stderr.read()  # type: ignore[union-attr]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.communicate(timeout=60)


def test_a_killed_prepare_data_leaves_nothing_after_the_next_run(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cache"
    _kill_prepare_mid_write(world["source"], out)
    assert not out.exists()  # never a partial cache under the real name
    partial = [p for p in tmp_path.iterdir() if is_temp_file(p)]
    assert len(partial) == 1 and partial[0].is_dir()  # the killed writer's temp folder
    time.sleep(1.1)  # a temp folder must be a second old to be judged (a writer may be starting)
    prepare(capsys, world["source"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    expected = sorted(p.name for p in world["cache"].iterdir())
    assert sorted(p.name for p in out.iterdir()) == expected
    for split in SPLITS:
        again, first = np.load(out / f"{split}.npy"), np.load(world["cache"] / f"{split}.npy")
        assert np.array_equal(again, first)


def test_a_killed_overwrite_keeps_the_old_cache_and_overwrite_still_works(
    world: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cache"
    shutil.copytree(world["cache"], out)
    (out / "index.json").write_text(
        (out / "index.json").read_text().replace('"source": "', '"source": "old:')
    )
    _kill_prepare_mid_write(world["source"], out, "--overwrite")
    index = json.loads((out / "index.json").read_text())
    assert index["source"].startswith("old:")  # the old cache, whole
    checkpoint = checkpoint_on(world["run"] / "best.pt", out, tmp_path / "ckpt.pt")
    status, _, stderr = run_cli(
        capsys, "eval", "--checkpoint", checkpoint, "--verify-data", "full", "--quiet"
    )
    assert status == 0, stderr
    again = ("--dataset", "imagefolder", "--source", world["source"], "--out", out, "--no-strict")
    status, _, stderr = run_cli(capsys, "prepare-data", *again)
    assert_one_line_error(status, stderr, str(out), "already exists", "--overwrite")
    time.sleep(1.1)
    prepare(capsys, world["source"], out, "--overwrite")
    assert json.loads((out / "index.json").read_text())["source"] == str(world["source"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ckpt.pt", "eval_ckpt.json"]


# -- permissions -----------------------------------------------------------------------------


def test_files_and_folders_follow_the_umask(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    """Everything the commands wrote under umask 002 is 0664 (folders 0775), not mkstemp's
    0600 / mkdtemp's 0700: colleagues on a shared cluster can read caches and checkpoints."""
    previous = os.umask(UMASK)
    try:
        status, _, stderr = run_cli(
            capsys, "eval", "--checkpoint", world["run"] / "best.pt", "--quiet"
        )
    finally:
        os.umask(previous)
    assert status == 0, stderr
    written = [world["cache"], world["run"], world["supervised"]]
    paths = [p for folder in written for p in [folder, *folder.rglob("*")]]
    names = {p.name for p in paths}
    assert {"index.json", "test.npy", "best.pt", "last.pt", "eval_best.json"} <= names
    modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {str(p): 0o775 if p.is_dir() else 0o664 for p in paths}
    assert modes == expected

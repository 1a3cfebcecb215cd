"""Distributed meta-training (fewshot_nsl.distributed).

Over 400 lines: one multi-process run checked from several sides (gradients, buffers,
evaluation, resume), and the helpers of that run.

The multi-process test launches this very module under ``python -m torch.distributed.run``
(2 CPU processes, gloo, a free port on 127.0.0.1): ``python -m tests.test_distributed
--worker DIR`` is the worker. The parent runs the single-process references and compares:
parameters after k meta-steps (meta-batch 4 split 2+2, and 3 split 2+1), sharded vs
unsharded per-episode test accuracies, resume 1 → 2 ranks and 2 → 1 rank, the collective
primitives on rank-dependent inputs, and ``fewshot-nsl train`` in the same process group (one
copy of the output and of the files).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from episodes import TaskBatcher
from fewshot_nsl.cli import main as cli_main
from fewshot_nsl.config import dump_config
from fewshot_nsl.distributed import (
    BufferSync,
    DistributedContext,
    DistributedMetaTrainer,
    all_reduce_gradients,
    all_reduce_sums,
    build_trainer,
    gather_shards,
    init_distributed,
    shard_indices,
    shutdown,
    world_from_env,
)
from fewshot_nsl.evaluation import evaluate_shots
from fewshot_nsl.fewshot_config import resolve_fewshot_config
from fewshot_nsl.runner import MetaTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
# Reduction order differs (rank sums vs one running sum), so float32 results agree to
# rounding, not bitwise; Adam's normalisation keeps that at the 1e-7 level after a few steps.
ATOL = 1e-6


class BiasFreeNet(nn.Module):
    """2 × [conv3×3 without bias → BatchNorm → ReLU → 2×2 max-pool], global average pooling.

    No bias before BatchNorm: such a bias (Conv-4 has one) has an exactly zero gradient in
    training mode, so its computed gradient is rounding noise that Adam normalises into
    O(lr) steps; any other summation order (2 ranks, or just another thread count) then moves
    it differently and no tolerance could compare it.
    """

    def __init__(self, conv_factory: Any, in_channels: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_factory(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            conv_factory(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.out_features = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, width)``."""
        return self.features(images).mean(dim=(2, 3))


def bias_free_backbone(*, conv_factory: Any, in_channels: int, width: int = 8) -> BiasFreeNet:
    """Backbone plug-in ``tests.test_distributed:bias_free_backbone``."""
    return BiasFreeNet(conv_factory, in_channels, width)


def tiny_config(steps: int, tasks_per_batch: int = 4) -> dict[str, Any]:
    """A seconds-long run: 3-way 1-shot glyphs at 16×16, a bias-free 2-block CNN, MAML with a
    second-order inner step and the "running" BatchNorm policy (so buffers must be synced)."""
    return resolve_fewshot_config(
        {
            "name": "dist",
            "data": {
                "dataset": "synthetic",
                "options": {"num_classes": 8, "images_per_class": 8, "image_size": 16},
            },
            "episodes": {
                "way": 3,
                "shot": 1,
                "query": 2,
                "tasks_per_batch": tasks_per_batch,
                "val_episodes": 3,
                "test_episodes": 7,
                "test_shots": [1],
                "test_query": 5,
            },
            "model": {
                "backbone": "tests.test_distributed:bias_free_backbone",
                "backbone_options": {"width": 8},
            },
            "learner": {
                "name": "maml",
                "inner_steps": 1,
                "inner_steps_eval": 2,
                "inner_lr": 0.1,
                "bn": "running",
            },
            "train": {
                "steps": steps,
                "lr": 0.01,
                "val_every": 2,
                "checkpoint_every": 0,
                "log_every": 1,
                "device": "cpu",
            },
        }
    )


def model_state(trainer: MetaTrainer) -> dict[str, torch.Tensor]:
    assert trainer.learner is not None
    return {name: value.detach().clone() for name, value in trainer.learner.state_dict().items()}


def is_parameter(trainer: MetaTrainer, name: str) -> bool:
    assert trainer.learner is not None
    return name in dict(trainer.learner.named_parameters())


# -- the worker (runs under torchrun) --------------------------------------------------------


def _check_primitives(context: DistributedContext) -> dict[str, Any]:
    """The collectives on rank-dependent inputs; the parent checks the outputs."""
    rank = context.rank
    summed = nn.Parameter(torch.zeros(2, 3))
    summed.grad = torch.full((2, 3), float(rank + 1))
    partial = nn.Parameter(torch.zeros(4, dtype=torch.float64))  # its own dtype group
    partial.grad = torch.ones(4, dtype=torch.float64) if rank == 1 else None
    unused = nn.Parameter(torch.zeros(2))
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    all_reduce_gradients([summed, partial, unused, frozen])

    norm = nn.BatchNorm1d(3)
    sync = BufferSync(norm)
    with torch.no_grad():
        norm.running_mean.fill_(rank + 1.0)
        norm.num_batches_tracked += rank + 1
    sync.sync()

    indices = list(range(5))  # uneven: rank 0 gets 3, rank 1 gets 2
    mine = shard_indices(indices, rank, context.world_size)
    gathered = gather_shards(np.array(mine, dtype=np.float64) * 10.0, len(indices), context)
    return {
        "summed": summed.grad,
        "partial": partial.grad,
        "unused": unused.grad,
        "frozen": frozen.grad,
        "running_mean": norm.running_mean.clone(),
        "running_var": norm.running_var.clone(),
        "num_batches_tracked": int(norm.num_batches_tracked),
        "gathered": gathered,
        "sums": all_reduce_sums([1.0, float(rank)], context.device),
    }


def _worker(work: Path) -> None:
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    assert context.world_size == WORLD_SIZE and context.backend == "gloo", context
    out: dict[str, Any] = {"primitives": _check_primitives(context)}

    # A: 3 fresh steps, meta-batch 4 = 2 + 2; then sharded validation/test (fit's later half).
    trainer = build_trainer(tiny_config(steps=3), work / "A", context, quiet=True)
    trainer.setup()
    trainer.train()
    out["A_trained"] = model_state(trainer)
    out["A_test"] = {shot: r.accuracies for shot, r in trainer.test().items()}
    out["A_tested"] = model_state(trainer)

    # R: resume the parent's 1-process checkpoint at step 2 on 2 ranks, up to step 4.
    trainer = build_trainer(tiny_config(steps=4), work / "R", context, quiet=True)
    trainer.setup(resume=True)
    out["R_resumed_at"] = trainer.step
    trainer.train()
    out["R_trained"] = model_state(trainer)

    # U: uneven shares, meta-batch 3 = 2 + 1.
    trainer = build_trainer(
        tiny_config(steps=2, tasks_per_batch=3), work / "U", context, quiet=True
    )
    trainer.setup()
    trainer.train()
    out["U_trained"] = model_state(trainer)

    # C: the command line in the same process group (last: it shuts the group down).
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        out["C_status"] = cli_main(
            ["train", "--config", str(work / "cli.yaml"), "--out", str(work / "C"), "--quiet"]
        )
    out["C_stdout"] = captured.getvalue()
    torch.save(out, work / f"rank{context.rank}.pt")
    shutdown(context)


# -- single-process tests --------------------------------------------------------------------


def test_world_from_env_reads_torchrun_variables() -> None:
    assert world_from_env({}) == (0, 1, 0)
    assert world_from_env({"WORLD_SIZE": "1"}) == (0, 1, 0)
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 4, 1)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK is not set"),
        ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 must be in"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ],
)
def test_world_from_env_rejects_bad_variables(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        world_from_env(environ)


def test_one_process_creates_no_process_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    context = init_distributed("cpu")
    assert not context.is_distributed and context.is_main and context.world_size == 1
    assert not torch.distributed.is_initialized()
    trainer = build_trainer(tiny_config(steps=1), tmp_path, context, quiet=True)
    assert type(trainer) is MetaTrainer
    # The primitives are the identity without a process group.
    weight = nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([1.0, 2.0])
    all_reduce_gradients([weight])
    assert weight.grad.tolist() == [1.0, 2.0]
    assert all_reduce_sums([1.5, 2.0]) == [1.5, 2.0]
    assert gather_shards(np.array([0.5, 0.25]), 2, context).tolist() == [0.5, 0.25]


@pytest.mark.parametrize("tasks_per_batch", [4, 5])
def test_rank_streams_are_disjoint_and_independent_of_world_size(tasks_per_batch: int) -> None:
    single = TaskBatcher(None, tasks_per_batch)  # episode_indices never touches the sampler
    for world_size in (2, 3, 4):
        for step in (0, 1, 7):
            shares = [
                TaskBatcher(None, tasks_per_batch, rank, world_size).episode_indices(step)
                for rank in range(world_size)
            ]
            flat = [index for share in shares for index in share]
            assert len(flat) == len(set(flat))  # disjoint
            assert sorted(flat) == single.episode_indices(step)  # = the 1-process meta-batch


def test_nccl_group_rejects_a_cpu_run(tmp_path: Path) -> None:
    context = DistributedContext(rank=0, world_size=2, backend="nccl")
    with pytest.raises(ValueError, match="train.device='cpu' is not a GPU, but the process group"):
        DistributedMetaTrainer(tiny_config(steps=1), tmp_path, context=context, quiet=True)


def test_shard_indices_partition_round_robin() -> None:
    indices = list(range(10, 17))
    shares = [shard_indices(indices, rank, 3) for rank in range(3)]
    assert shares == [[10, 13, 16], [11, 14], [12, 15]]
    assert sorted(sum(shares, [])) == indices
    assert shard_indices([1, 2], 1, 4) == [2] and shard_indices([1, 2], 3, 4) == []
    with pytest.raises(ValueError, match="rank=4, world_size=4"):
        shard_indices(indices, 4, 4)


def test_gather_shards_rejects_a_wrong_share() -> None:
    context = DistributedContext(rank=1, world_size=2, backend="gloo")
    message = r"rank 1: local values have shape \(3,\), expected \(2,\)"
    with pytest.raises(ValueError, match=message):
        gather_shards(np.zeros(3), 5, context)


# -- the multi-process test ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _assert_states_close(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    what: str,
    parameters_only_of: MetaTrainer | None = None,
) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        if parameters_only_of is not None and not is_parameter(parameters_only_of, name):
            continue
        torch.testing.assert_close(actual[name], value, atol=ATOL, rtol=0, msg=f"{what}: {name}")


def _single_process_reference(work: Path) -> dict[str, Any]:
    """One process, meta-batch 4: states after 3, 4 and 5 steps; a checkpoint at step 2 in
    ``work/R`` for the 2-rank resume; and 2 steps with meta-batch 3."""
    reference: dict[str, Any] = {}
    trainer = MetaTrainer(tiny_config(steps=5), work / "R", quiet=True)
    trainer.setup()
    reference["metrics"] = []
    for step in range(5):
        reference["metrics"].append(trainer.meta_step(step))
        trainer.step = step + 1
        if trainer.step == 2:
            trainer.save("last.pt")
        if trainer.step >= 3:
            reference[f"step{trainer.step}"] = model_state(trainer)
    trainer.close()  # free work/R's run lock for the 2-rank resume (another process)
    reference["trainer"] = trainer
    uneven = MetaTrainer(tiny_config(steps=2, tasks_per_batch=3), work / "U1", quiet=True)
    uneven.setup()
    uneven.train()
    reference["uneven"] = model_state(uneven)
    return reference


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, like each worker: on a busy 2-core machine two threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    reference = _single_process_reference(tmp_path)
    dump_config(tiny_config(steps=2), tmp_path / "cli.yaml")
    port = _free_port()
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    environ["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "tests.test_distributed",
        "--worker",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=environ, capture_output=True, text=True, timeout=150
    )
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    single: MetaTrainer = reference["trainer"]

    # Collective primitives on rank-dependent inputs (same result on every rank).
    for outputs in ranks:
        primitives = outputs["primitives"]
        assert primitives["summed"].tolist() == [[3.0] * 3] * 2  # 1 + 2
        assert primitives["partial"].dtype == torch.float64
        assert primitives["partial"].tolist() == [1.0] * 4  # None on rank 0 counts as zeros
        assert primitives["unused"] is None and primitives["frozen"] is None
        assert primitives["running_mean"].tolist() == [1.5] * 3  # mean of 1 and 2
        assert primitives["running_var"].tolist() == [1.0] * 3  # untouched: bit-identical
        assert primitives["num_batches_tracked"] == 3  # 0 + 1 + 2 increments
        assert primitives["gathered"].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
        assert primitives["sums"] == [2.0, 1.0]

    # Every rank holds the same model, buffers included (they are synced after each step).
    for key in ("A_trained", "A_tested", "R_trained", "U_trained"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key}: ranks differ on {name}"

    # 2 ranks × 2 tasks == 1 process × 4 tasks, on the same episodes.
    _assert_states_close(
        ranks[0]["A_trained"], reference["step3"], "3 steps on 2 ranks", parameters_only_of=single
    )
    counters = [name for name in reference["step3"] if name.endswith("num_batches_tracked")]
    assert counters
    for name in counters:  # every task's query pass counted once, as in one process
        assert int(ranks[0]["A_trained"][name]) == int(reference["step3"][name]) == 3 * 4, name
    # Uneven shares (2 + 1) are weighted by task count, exactly as one process.
    _assert_states_close(
        ranks[0]["U_trained"],
        reference["uneven"],
        "meta-batch 3 on 2 ranks",
        parameters_only_of=single,
    )
    # Resume 1 → 2 ranks: 2 single-process steps + 2 distributed steps == 4 single steps.
    assert ranks[0]["R_resumed_at"] == ranks[1]["R_resumed_at"] == 2
    _assert_states_close(
        ranks[0]["R_trained"], reference["step4"], "resume 1 -> 2 ranks", parameters_only_of=single
    )

    # Sharded test accuracies == unsharded ones, episode by episode, on the same weights.
    config = tiny_config(steps=3)
    evaluated = MetaTrainer(config, tmp_path / "E", quiet=True)
    evaluated.setup()
    evaluated.learner.load_state_dict(ranks[0]["A_tested"])
    unsharded = evaluate_shots(
        evaluated.learner,
        config,
        evaluated.split("test"),
        [1],
        config["episodes"]["test_episodes"],
        torch.device("cpu"),
        show_progress=False,
    )
    np.testing.assert_array_equal(ranks[0]["A_test"][1], unsharded[1].accuracies)
    np.testing.assert_array_equal(ranks[1]["A_test"][1], unsharded[1].accuracies)
    assert len(np.unique(unsharded[1].accuracies)) > 1, "uninformative: all episodes score alike"

    # Logged training metrics are meta-batch means over both ranks (rank 0 alone wrote them).
    lines = (tmp_path / "A" / "metrics.jsonl").read_text().splitlines()
    logged = [record for record in map(json.loads, lines) if record["event"] == "train"]
    assert [record["step"] for record in logged] == [1, 2, 3]
    for record, (loss, accuracy) in zip(logged, reference["metrics"]):
        assert record["loss"] == pytest.approx(loss, abs=ATOL)
        assert record["accuracy"] == pytest.approx(accuracy, abs=ATOL)

    # `fewshot-nsl train` under torchrun: one copy of the output and of every file.
    assert ranks[0]["C_status"] == ranks[1]["C_status"] == 0
    assert ranks[1]["C_stdout"] == "" and ranks[0]["C_stdout"].count("accuracy (%)") == 1
    results = json.loads((tmp_path / "C" / "results.json").read_text())
    assert results["steps"] == 2 and results["test"]["1"]["episodes"] == 7
    records = [json.loads(line) for line in (tmp_path / "C" / "metrics.jsonl").open()]
    assert [(r["event"], r["step"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("val", 2),
        ("test", 2),
    ]

    # Resume 2 → 1 rank: the 2-rank checkpoint at step 3, then 2 single steps == 5 steps.
    resumed = MetaTrainer(tiny_config(steps=5), tmp_path / "A", quiet=True)
    resumed.setup(resume=True)
    assert resumed.step == 3
    resumed.train()
    _assert_states_close(
        model_state(resumed), reference["step5"], "resume 2 -> 1 rank", parameters_only_of=single
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="worker of test_two_gloo_ranks_match_one_process")
    parser.add_argument("--worker", type=Path, required=True, help="shared work directory")
    _worker(parser.parse_args().worker)

"""Checkpoints: content hash verified on load (bit flips, truncation), version-1 files still
read, non-finite states refused, task kind stored and checked."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewshot_nsl.checkpoint import (
    FORMAT,
    CheckpointCorrupt,
    CheckpointMismatch,
    NonFiniteState,
    capture_rng_state,
    checkpoint_kind,
    load_checkpoint,
    load_model_state,
    require_kind,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    write_checkpoint_state,
)

EPISODIC = {"name": "tiny", "episodes": {"way": 5}, "train": {"steps": 4}}
SUPERVISED = {"name": "cifar", "train": {"iterations": 10}}


def _save(
    path: Path, model: torch.nn.Module, config: dict[str, Any] = EPISODIC, **options: Any
) -> Path:
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()  # Adam state (exp_avg, ...) exists and is saved
    return save_checkpoint(
        path,
        model=model,
        optimizer=optimizer,
        scheduler=None,
        step=5,
        config=config,
        data={"train": "abc"},
        **options,
    )


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["step"] == b["step"]
        and a["config"] == b["config"]
        and a["kind"] == b["kind"]
        and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        and a["sha256"] == b["sha256"]
    )


def test_round_trip_stores_hash_and_kind(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    state = load_checkpoint(_save(tmp_path / "last.pt", model))
    assert state["step"] == 5 and state["kind"] == "episodic" and len(state["sha256"]) == 64
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert "exp_avg" in state["optimizer"]["state"][0]
    supervised = load_checkpoint(_save(tmp_path / "s.pt", model, SUPERVISED))
    assert supervised["kind"] == "supervised"


def test_every_flipped_bit_is_detected_or_harmless(tmp_path: Path) -> None:
    """Flip one bit at ~900 positions across the file: each load either fails with a one-line
    CheckpointCorrupt/ValueError or returns exactly the saved state (a bit torch never reads,
    e.g. zip padding); never a silently different model."""
    path = _save(tmp_path / "best.pt", torch.nn.Linear(3, 2))
    original = path.read_bytes()
    expected = load_checkpoint(path)
    damaged = tmp_path / "damaged.pt"
    detected = harmless = 0
    for position in range(0, len(original), max(1, len(original) // 900)):
        flipped = bytearray(original)
        flipped[position] ^= 1 << (position % 8)
        damaged.write_bytes(bytes(flipped))
        try:
            state = load_checkpoint(damaged)
        except ValueError as error:  # CheckpointCorrupt is a ValueError
            message = str(error)
            assert "\n" not in message and "weights_only" not in message, message
            assert str(damaged) in message
            detected += 1
            continue
        assert _same_state(state, expected), f"bit flip at byte {position} went unnoticed"
        harmless += 1
    assert detected > 3 * harmless  # sanity: most bytes matter (zip headers and padding do not)


def test_an_edited_state_needs_a_fresh_hash(tmp_path: Path) -> None:
    state = torch.load(_save(tmp_path / "last.pt", torch.nn.Linear(3, 2)), weights_only=True)
    state["step"] = 6  # what a hand edit (or a bit flip in an integer) does
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(CheckpointCorrupt, match="content hash mismatch"):
        load_checkpoint(tmp_path / "edited.pt")
    write_checkpoint_state(tmp_path / "edited.pt", state)
    assert load_checkpoint(tmp_path / "edited.pt")["step"] == 6


def test_flip_in_the_weights_says_hash_mismatch(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.2345678)  # a byte pattern easy to find in the file
    path = _save(tmp_path / "best.pt", model)
    data = bytearray(path.read_bytes())
    needle = torch.tensor([model.weight[0, 0].item()]).numpy().tobytes()
    position = bytes(data).index(needle)
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointCorrupt,
        match=r"best.pt is unreadable: content hash mismatch "
        r"\(file damaged\)",
    ):
        load_checkpoint(path)


def test_truncation_and_garbage_are_one_line_errors(tmp_path: Path) -> None:
    path = _save(tmp_path / "last.pt", torch.nn.Linear(3, 2))
    original = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for length in list(range(0, len(original), max(1, len(original) // 200))) + [len(original) - 1]:
        cut.write_bytes(original[:length])
        with pytest.raises(CheckpointCorrupt) as caught:
            load_checkpoint(cut)
        message = str(caught.value)
        assert "truncated or not a fewshot-nsl checkpoint" in message, (length, message)
        assert "\n" not in message and "weights_only" not in message
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointCorrupt, match="junk.pt is unreadable: truncated or not a "):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointCorrupt, match="other.pt is unreadable: not a fewshot-nsl checkpo"
    ):
        load_checkpoint(tmp_path / "other.pt")


def test_version_1_checkpoints_still_load_unverified(tmp_path: Path) -> None:
    """The layout written before the content hash (state saved directly, version 1)."""
    model = torch.nn.Linear(3, 2)
    state = {
        "format": FORMAT,
        "version": 1,
        "step": 3,
        "model": model.state_dict(),
        "optimizer": None,
        "scheduler": None,
        "rng": capture_rng_state(),
        "config": SUPERVISED,
        "versions": {},
        "data": {},
        "best": None,
    }
    torch.save(state, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["step"] == 3 and loaded["sha256"] is None
    assert checkpoint_kind(loaded) == "supervised"  # inferred from the config
    upgraded = load_checkpoint(write_checkpoint_state(tmp_path / "up.pt", loaded))
    assert upgraded["version"] == 2 and upgraded["kind"] == "supervised"
    assert upgraded["sha256"] is not None and torch.equal(
        upgraded["model"]["weight"], model.weight.detach()
    )
    buffer = io.BytesIO()
    torch.save({**state, "version": 7}, buffer)
    (tmp_path / "new.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="format version 7"):
        load_checkpoint(tmp_path / "new.pt")


def test_non_finite_state_is_refused_when_required(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = _save(tmp_path / "best.pt", model, require_finite=True)
    before = path.read_bytes()
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(
        NonFiniteState,
        match=r"best.pt not written: non-finite values at step 5 "
        r"in model.bias",
    ):
        _save(path, model, require_finite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
    _save(tmp_path / "last.pt", model)  # without the flag: written as it is
    assert torch.isnan(load_checkpoint(tmp_path / "last.pt")["model"]["bias"][1])
    with pytest.raises(NonFiniteState, match="best.accuracy"):
        _save(path, torch.nn.Linear(3, 2), require_finite=True, best={"accuracy": float("inf")})


def test_eval_can_tell_a_supervised_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    supervised = load_checkpoint(_save(tmp_path / "s.pt", model, SUPERVISED))
    with pytest.raises(
        CheckpointMismatch,
        match=r"s.pt is a supervised checkpoint \(written by "
        r"`train-supervised`\); this needs one written "
        r"by `train`",
    ):
        require_kind(supervised, "episodic", tmp_path / "s.pt")
    require_kind(load_checkpoint(_save(tmp_path / "e.pt", model)), "episodic", "e.pt")
    with pytest.raises(ValueError, match="kind must be one of"):
        _save(tmp_path / "x.pt", model, kind="other")


def test_resolve_checkpoint_of_a_run_directory(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(FileNotFoundError, match="without best.pt or last.pt"):
        resolve_checkpoint(tmp_path)
    _save(tmp_path / "last.pt", model)
    assert resolve_checkpoint(tmp_path) == tmp_path / "last.pt"
    _save(tmp_path / "best.pt", model)
    assert resolve_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert resolve_checkpoint(tmp_path / "last.pt") == tmp_path / "last.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")


# -- RNG, round trip, torn save, architecture mismatch (moved from test_runner.py) ----------


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def _save_small(path: Path, model: torch.nn.Module, step: int) -> Path:
    optimizer = torch.optim.Adam(model.parameters())
    return save_checkpoint(
        path,
        model=model,
        optimizer=optimizer,
        scheduler=None,
        step=step,
        config={"name": "x"},
        data={"train": "abc"},
    )


def test_checkpoint_round_trip_and_errors(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = _save_small(tmp_path / "last.pt", model, step=7)
    payload = load_checkpoint(path)
    assert payload["step"] == 7 and payload["data"] == {"train": "abc"}
    assert "torch" in payload["versions"]
    assert torch.equal(payload["model"]["weight"], model.weight.detach())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is unreadable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fewshot-nsl checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_failure_during_save_leaves_the_old_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(3, 2)
    path = _save_small(tmp_path / "last.pt", model, step=1)
    before = path.read_bytes()

    def torn_save(obj: Any, handle: Any) -> None:
        handle.write(b"half a checkpoint")  # bytes reach the temp file, then the "kill"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        _save_small(path, model, step=2)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_architecture_mismatch_says_what_differs() -> None:
    small, large = torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(
        CheckpointMismatch,
        match=r"architecture mismatch.*missing in checkpoint: "
        r"0\.bias, 0\.weight.*not in this model: bias",
    ):
        load_model_state(large, small.state_dict(), "ckpt.pt")
    with pytest.raises(CheckpointMismatch, match=r"shape .*weight \(2, 3\) vs \(4, 3\)"):
        load_model_state(torch.nn.Linear(3, 4), small.state_dict(), "ckpt.pt")

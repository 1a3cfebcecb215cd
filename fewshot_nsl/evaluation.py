"""Scoring a few-shot learner on frozen episodes: per-episode accuracies, mean ± 95% CI.

Used by the episodic task (:mod:`fewshot_nsl.runner`: validation and the final test) and by
``fewshot-nsl eval``. Evaluation works on a list of episode indices, so it shards over ranks
by splitting the indices (``shard``) and putting the accuracies back in order (``gather``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from episodes import EpisodeSampler, ImageSplit, load_manifest
from episodes.sampler import EpisodeSource
from fewshot_nsl.learners import Learner
from fewshot_nsl.stats import MeanCI, mean_ci

__all__ = [
    "EvalResult",
    "episode_output",
    "episode_progress",
    "evaluate_episodes",
    "evaluate_shots",
    "stored_accuracies",
    "stored_test_results",
    "test_source",
    "test_way",
    "val_query",
]

#: Decimals of the per-episode accuracies in ``results.json`` (:meth:`EvalResult.as_dict`).
STORED_DECIMALS = 6


def test_way(config: Mapping[str, Any]) -> int:
    """Way of the validation and test episodes: ``episodes.test_way``, else ``episodes.way``."""
    episodes = config["episodes"]
    return episodes.get("test_way") or episodes["way"]


def val_query(config: Mapping[str, Any]) -> int:
    """Queries per class of the validation episodes: ``episodes.val_query``, else
    ``episodes.query``."""
    episodes = config["episodes"]
    return episodes.get("val_query") or episodes["query"]


def episode_output(device: torch.device) -> dict[str, Any]:
    """How samplers hand episodes to a trainer on ``device``: uint8 pixels (pinned for a
    CUDA device), converted and normalised there by ``source.to_device`` — 4x fewer bytes
    to copy than float32 and one fused conversion; on CPU the same values as the float path.
    """
    return {"output": "uint8", "pin_memory": device.type == "cuda"}


def evaluate_episodes(
    learner: Learner,
    source: EpisodeSource,
    indices: Sequence[int],
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    losses: np.ndarray | None = None,
) -> np.ndarray:
    """Query accuracy of ``learner`` on episodes ``source.episode(i)``, ``i in indices``.

    The learner is put in eval mode (MAML uses ``inner_steps_eval``) and restored afterwards;
    no meta-gradient graph is built. Returns float64 ``(len(indices),)`` in index order.
    ``progress(n)`` is called after each episode. When ``losses`` (float64
    ``(len(indices),)``) is given, it receives each episode's mean query cross-entropy (the
    validation loss that ``train.select_by: val_loss`` watches). Any subset of indices can be
    scored on its own, so evaluation shards over ranks by splitting ``indices``.
    """
    was_training = learner.training
    learner.eval()
    accuracies = np.empty(len(indices), dtype=np.float64)
    try:
        with torch.no_grad():
            for position, index in enumerate(indices):
                episode = source.to_device(source.episode(int(index)), device)
                state = learner.adapt(episode.support_x, episode.support_y, episode.way)
                logits = learner.predict(state, episode.query_x)
                correct = (logits.argmax(dim=-1) == episode.query_y).double().mean()
                accuracies[position] = float(correct)
                if losses is not None:
                    losses[position] = float(F.cross_entropy(logits, episode.query_y))
                if progress is not None:
                    progress(1)
    finally:
        learner.train(was_training)
    return accuracies


@contextmanager
def episode_progress(
    total: int,
    desc: str,
    show_bar: bool,
    log: Callable[[str], None] | None = None,
    min_interval_s: float = 0.0,
) -> Iterator[Callable[[int], None]]:
    """Progress of scoring ``total`` episodes; yields ``update(n)`` (n more episodes done).

    On a terminal (``show_bar``): a tqdm bar that disappears when done. Otherwise, with a
    ``log``: a line ``"{desc}: done/total episodes (rate/s)"`` each time another tenth of the
    episodes is done and at the end, if at least ``min_interval_s`` after the previous line
    (or the start), so that with an interval a short phase says nothing; without a ``log``:
    nothing.
    """
    if show_bar:
        with tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) as bar:
            yield bar.update
        return
    if log is None:
        yield lambda n: None
        return
    every = max(1, -(-total // 10))  # a tenth, rounded up
    done = 0
    started = last = time.perf_counter()

    def update(n: int) -> None:
        nonlocal done, last
        before, done = done, done + n
        now = time.perf_counter()
        boundary = done // every > before // every or done == total
        if boundary and now - last >= min_interval_s:
            last = now
            log(f"{desc}: {done}/{total} episodes ({done / max(now - started, 1e-9):.1f}/s)")

    yield update


def test_source(
    config: Mapping[str, Any],
    split: ImageSplit,
    shot: int,
    num_episodes: int,
    manifest: str | None = None,
    device: torch.device | None = None,
) -> tuple[EpisodeSource, int, str]:
    """The frozen test episodes of ``shot``: ``(source, num_episodes, description)``.

    From a manifest when given (``{shot}`` in the path is replaced by the shot; all its
    episodes are used), else ``EpisodeSampler(split, test_way, shot, test_query,
    seed=episodes.eval_seed)`` — the same episodes for every model evaluated on this data.
    With ``device``, the source hands over uint8 episodes for it (:func:`episode_output`).
    """
    episodes = config["episodes"]
    output = episode_output(device) if device is not None else {}
    if manifest:
        path = manifest.format(shot=shot)
        source = load_manifest(path, split, way=test_way(config), shot=shot, **output)
        return source, len(source), f"manifest {path}"
    sampler = EpisodeSampler(
        split,
        test_way(config),
        shot,
        episodes["test_query"],
        seed=episodes["eval_seed"],
        num_episodes=num_episodes,
        **output,
    )
    return sampler, num_episodes, f"sampler seed {episodes['eval_seed']}"


@dataclass
class EvalResult:
    """Test accuracy of one shot setting: summary and every per-episode accuracy."""

    way: int
    shot: int
    query: int
    accuracies: np.ndarray
    source: str

    @property
    def summary(self) -> MeanCI:
        return mean_ci(self.accuracies)

    def as_dict(self) -> dict[str, Any]:
        return {
            "way": self.way,
            "shot": self.shot,
            "query": self.query,
            "episodes": int(len(self.accuracies)),
            "source": self.source,
            **self.summary.as_dict(),
            "accuracies": [round(float(a), STORED_DECIMALS) for a in self.accuracies],
        }


def evaluate_shots(
    learner: Learner,
    config: Mapping[str, Any],
    split: ImageSplit,
    shots: Sequence[int],
    num_episodes: int,
    device: torch.device,
    manifest: str | None = None,
    show_progress: bool = True,
    shard: Callable[[list[int]], list[int]] | None = None,
    gather: Callable[[np.ndarray, list[int]], np.ndarray] | None = None,
    log: Callable[[str], None] | None = None,
    label: str | None = None,
) -> dict[int, EvalResult]:
    """:func:`evaluate_episodes` on the frozen test episodes of every shot in ``shots``.

    ``shard``/``gather`` (default: identity) split the episode indices over ranks and put the
    accuracies back together (see the module docstring). Progress (:func:`episode_progress`):
    a bar when ``show_progress``, else lines through ``log`` (when given), named
    ``"[label] test N-shot"`` (``label`` default: the config's name).
    """
    results = {}
    label = config.get("name") if label is None else label
    for shot in shots:
        source, count, description = test_source(
            config, split, shot, num_episodes, manifest, device
        )
        indices = list(range(count))
        mine = shard(indices) if shard is not None else indices
        desc = f"[{label}] test {shot}-shot"
        with episode_progress(len(mine), desc, show_progress, log) as update:
            local = evaluate_episodes(learner, source, mine, device, progress=update)
        accuracies = gather(local, indices) if gather is not None else local
        query = config["episodes"]["test_query"] if not manifest else source.episode(0).query
        results[shot] = EvalResult(test_way(config), shot, query, accuracies, description)
    return results


def stored_accuracies(test: Mapping[str, Any]) -> np.ndarray:
    """The per-episode accuracies of a ``results.json`` test entry (:meth:`EvalResult.as_dict`)
    as float64 ``(episodes,)``, exactly as scored: an accuracy is ``k / (way · query)`` for
    ``k`` correct queries, so the stored 6-decimal value gives ``k`` back (when every value
    does; otherwise the stored values are returned as they are)."""
    values = np.asarray(test["accuracies"], dtype=np.float64)
    queries = int(test["way"]) * int(test["query"])
    correct = np.round(values * queries)
    if np.all(np.abs(correct / queries - values) <= 0.5 * 10.0**-STORED_DECIMALS + 1e-12):
        return correct / queries
    return values


def _tested_checkpoint(results: Mapping[str, Any], path: Path) -> bool:
    """Whether ``results`` (a run's ``results.json``) are the test of the checkpoint at
    ``path`` as it is now: ``best.pt`` holding the best validation step that was tested, or
    ``last.pt`` of the final step of a run tested on its final weights."""
    from fewshot_nsl.checkpoint import load_checkpoint

    tested = results.get("tested")
    if (path.name, tested) not in (("best.pt", "best.pt"), ("last.pt", "final weights")):
        return False
    checkpoint = load_checkpoint(path)
    if tested == "best.pt":
        best = results.get("best") or {}
        step = results.get("tested_step", best.get("step"))
        return checkpoint["best"] == best and checkpoint["step"] == step
    return checkpoint["step"] == results.get("tested_step", results.get("steps"))


def stored_test_results(
    path: str | Path,
    config: Mapping[str, Any],
    split: ImageSplit,
    shots: Sequence[int],
    num_episodes: int,
    manifest: str | None = None,
) -> dict[int, EvalResult] | None:
    """The per-episode accuracies of the checkpoint at ``path`` stored in its run's
    ``results.json`` (next to it), when they are what :func:`evaluate_shots` with these
    arguments would score; ``None`` otherwise. They are when:

    * the run tested this very checkpoint (:func:`_tested_checkpoint`);
    * its test data has ``split``'s fingerprint;
    * for every shot, the stored episodes are this config's: same test way, ``test_query`` and
      sampler seed (``episodes.eval_seed``), and at least ``num_episodes`` of them (episode
      ``i`` does not depend on the count, so the first ``num_episodes`` are these).

    Episodes from a manifest are always scored again (a file name does not pin its content).
    """
    path = Path(path)
    results_path = path.with_name("results.json")
    if manifest or not results_path.is_file():
        return None
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    tests = results.get("test")
    if not isinstance(tests, dict) or results.get("data", {}).get("test") != split.fingerprint:
        return None
    episodes, stored = config["episodes"], {}
    for shot in shots:
        test = tests.get(str(shot))
        _, count, source = test_source(config, split, shot, num_episodes)
        if (
            not isinstance(test, dict)
            or (test.get("way"), test.get("shot")) != (test_way(config), shot)
            or test.get("query") != episodes["test_query"]
            or test.get("source") != source
            or len(test.get("accuracies", ())) < count
        ):
            return None
        accuracies = stored_accuracies(test)[:count]
        stored[shot] = EvalResult(
            test_way(config), shot, episodes["test_query"], accuracies, source
        )
    return stored if _tested_checkpoint(results, path) else None

"""Scoring a few-shot learner on frozen episodes: per-episode accuracies, mean ± 95% CI.

Used by the episodic task (:mod:`fewshot_nsl.runner`: validation and the final test) and by
``fewshot-nsl eval``. Evaluation works on a list of episode indices, so it shards over ranks
by splitting the indices (``shard``) and putting the accuracies back in order (``gather``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from episodes import EpisodeSampler, ImageSplit, load_manifest
from episodes.sampler import EpisodeSource
from fewshot_nsl.learners import Learner
from fewshot_nsl.stats import MeanCI, mean_ci

__all__ = ["EvalResult", "episode_output", "evaluate_episodes", "evaluate_shots", "test_source"]


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
) -> np.ndarray:
    """Query accuracy of ``learner`` on episodes ``source.episode(i)``, ``i in indices``.

    The learner is put in eval mode (MAML uses ``inner_steps_eval``) and restored afterwards;
    no meta-gradient graph is built. Returns float64 ``(len(indices),)`` in index order.
    ``progress(n)`` is called after each episode. Any subset of indices can be scored on its
    own, so evaluation shards over ranks by splitting ``indices``.
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
                if progress is not None:
                    progress(1)
    finally:
        learner.train(was_training)
    return accuracies


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
    episodes are used), else ``EpisodeSampler(split, way, shot, test_query,
    seed=episodes.eval_seed)`` — the same episodes for every model evaluated on this data.
    With ``device``, the source hands over uint8 episodes for it (:func:`episode_output`).
    """
    episodes = config["episodes"]
    output = episode_output(device) if device is not None else {}
    if manifest:
        path = manifest.format(shot=shot)
        source = load_manifest(path, split, way=episodes["way"], shot=shot, **output)
        return source, len(source), f"manifest {path}"
    sampler = EpisodeSampler(
        split,
        episodes["way"],
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
            "accuracies": [round(float(a), 6) for a in self.accuracies],
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
) -> dict[int, EvalResult]:
    """:func:`evaluate_episodes` on the frozen test episodes of every shot in ``shots``.

    ``shard``/``gather`` (default: identity) split the episode indices over ranks and put the
    accuracies back together (see the module docstring).
    """
    results = {}
    for shot in shots:
        source, count, description = test_source(
            config, split, shot, num_episodes, manifest, device
        )
        indices = list(range(count))
        mine = shard(indices) if shard is not None else indices
        with tqdm(
            total=len(mine), desc=f"test {shot}-shot", disable=not show_progress, leave=False
        ) as bar:
            local = evaluate_episodes(learner, source, mine, device, progress=bar.update)
        accuracies = gather(local, indices) if gather is not None else local
        query = config["episodes"]["test_query"] if not manifest else source.episode(0).query
        results[shot] = EvalResult(config["episodes"]["way"], shot, query, accuracies, description)
    return results

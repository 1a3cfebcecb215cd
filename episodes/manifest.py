"""Frozen evaluation episodes: store class ids and row indices, replay them exactly.

A manifest holds, for each episode, the dataset class ids (in episode-label order), the support
and query row indices and the transform seed, plus the dataset name, split, content
fingerprint and the sampler settings. ``.json`` is readable; ``.npz`` is compact (flat arrays
with per-episode way/shot/query, so variable-way manifests work in both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from episodes.episode import Episode
from episodes.fileio import atomic_write
from episodes.sampler import EpisodeSampler, EpisodeSource, TransformFn
from episodes.split import ImageSplit

__all__ = ["save_manifest", "load_manifest", "ManifestEpisodes", "DEFAULT_TEST_EPISODES"]

#: The default frozen test set: 600 episodes (15 queries per class is the sampler's job).
DEFAULT_TEST_EPISODES = 600
_FORMAT = "fewshot-nsl-episode-manifest"
_VERSION = 1


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"manifest {path}: use a .json or .npz file name, got {suffix!r}")
    return suffix


def save_manifest(
    path: str | os.PathLike,
    sampler_or_episodes: EpisodeSampler | Sequence[Episode],
    num_episodes: int = DEFAULT_TEST_EPISODES,
    split: ImageSplit | None = None,
    seed: int | None = None,
) -> Path:
    """Store the first ``num_episodes`` episodes (classes, row indices) at ``path``.

    Args:
        sampler_or_episodes: an :class:`EpisodeSampler` (only indices are drawn, no images
            are loaded) or a sequence of :class:`Episode` (then ``split`` is required, for the
            dataset name and fingerprint).
        num_episodes: how many to store (default 600).
        split: the split the episodes come from (taken from the sampler when given one).
        seed: stored as the replay transform seed base for episode lists; ignored for samplers.
    Returns the path written (atomically).
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    records: list[tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]] = []
    if isinstance(sampler_or_episodes, EpisodeSampler):
        sampler = sampler_or_episodes
        split = sampler.split
        if sampler.num_episodes is not None and sampler.num_episodes < num_episodes:
            raise ValueError(
                f"the sampler has {sampler.num_episodes} episodes, fewer than num_episodes="
                f"{num_episodes}"
            )
        for index in range(num_episodes):
            classes, support, query, shot, torch_seed = sampler.indices(index)
            records.append((classes, support, query, shot, sampler.query, torch_seed))
        base_seed = sampler.seed
    else:
        episodes = list(sampler_or_episodes)
        if split is None:
            raise ValueError(
                "save_manifest with a list of episodes needs split= (name, fingerprint)"
            )
        if len(episodes) < num_episodes:
            raise ValueError(
                f"got {len(episodes)} episodes, fewer than num_episodes={num_episodes}"
            )
        base_seed = 0 if seed is None else int(seed)
        for index, episode in enumerate(episodes[:num_episodes]):
            records.append(
                (
                    episode.classes.numpy(),
                    episode.support_indices.numpy(),
                    episode.query_indices.numpy(),
                    episode.shot,
                    episode.query,
                    base_seed + index,
                )
            )
    ways = np.array([len(r[0]) for r in records], dtype=np.int64)
    shots = np.array([r[3] for r in records], dtype=np.int64)
    queries = np.array([r[4] for r in records], dtype=np.int64)
    header = {
        "format": _FORMAT,
        "version": _VERSION,
        "dataset": split.name,
        "split": split.split,
        "fingerprint": split.fingerprint,
        "num_classes": split.num_classes,
        "seed": base_seed,
        "num_episodes": len(records),
        # A single value when every episode agrees, else None (variable way/shot).
        "way": int(ways[0]) if (ways == ways[0]).all() else None,
        "shot": int(shots[0]) if (shots == shots[0]).all() else None,
        "query": int(queries[0]) if (queries == queries[0]).all() else None,
    }
    if suffix == ".json":
        header["episodes"] = [
            {
                "classes": r[0].tolist(),
                "support": r[1].tolist(),
                "query": r[2].tolist(),
                "shot": int(r[3]),
                "query_per_class": int(r[4]),
                "transform_seed": int(r[5]),
            }
            for r in records
        ]
        payload = json.dumps(header, indent=None, separators=(",", ":")).encode()
        atomic_write(path, lambda handle: handle.write(payload))
    else:
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "way": ways,
            "shot": shots,
            "query": queries,
            "classes": np.concatenate([r[0] for r in records]).astype(np.int64),
            "support": np.concatenate([r[1] for r in records]).astype(np.int64),
            "query_rows": np.concatenate([r[2] for r in records]).astype(np.int64),
            "transform_seed": np.array([r[5] for r in records], dtype=np.uint64),
        }
        atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))
    return path


class ManifestEpisodes(EpisodeSource):
    """Replays stored episodes on ``split``: ``len()``, ``[i]``, iteration, DataLoader-ready.

    Attributes ``way``/``shot``/``query`` are the manifest's (None when they vary), and
    ``dataset``/``fingerprint`` what it was made from.
    """

    def __init__(
        self,
        header: dict,
        classes: list[np.ndarray],
        support: list[np.ndarray],
        query_rows: list[np.ndarray],
        shots: np.ndarray,
        queries: np.ndarray,
        transform_seeds: np.ndarray,
        split: ImageSplit,
        transform: TransformFn | None,
        output: str = "float",
        pin_memory: bool = False,
    ) -> None:
        super().__init__(split, transform, int(header.get("seed", 0)), output, pin_memory)
        self.header = header
        self.way, self.shot, self.query = header["way"], header["shot"], header["query"]
        self.fingerprint = header["fingerprint"]
        self._classes, self._support, self._query_rows = classes, support, query_rows
        self._shots, self._queries, self._transform_seeds = shots, queries, transform_seeds

    def __len__(self) -> int:
        return len(self._classes)

    def indices(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Stored ``(classes, support_rows, query_rows, shot, transform_seed)`` of an episode."""
        if not 0 <= index < len(self):
            raise IndexError(f"episode {index} out of range: the manifest has {len(self)}")
        return (
            self._classes[index],
            self._support[index],
            self._query_rows[index],
            int(self._shots[index]),
            int(self._transform_seeds[index]),
        )

    def episode(self, index: int) -> Episode:
        classes, support, query_rows, shot, torch_seed = self.indices(index)
        return self._materialise(
            classes, support, query_rows, shot, int(self._queries[index]), torch_seed
        )


def _read(path: Path) -> tuple[dict, list[dict] | dict[str, np.ndarray]]:
    suffix = _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        if suffix == ".json":
            header = json.loads(path.read_text())
            return header, header.pop("episodes")
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        header = json.loads(arrays.pop("header").tobytes().decode())
        return header, arrays
    except (ValueError, KeyError, OSError, EOFError) as error:
        raise ValueError(f"manifest {path} is not a readable episode manifest: {error}") from error


def load_manifest(
    path: str | os.PathLike,
    split: ImageSplit,
    transform: TransformFn | None = None,
    way: int | None = None,
    shot: int | None = None,
    query: int | None = None,
    output: str = "float",
    pin_memory: bool = False,
) -> ManifestEpisodes:
    """Load a manifest written by :func:`save_manifest` to replay its episodes on ``split``.

    Checks that ``split`` is the data the manifest was made from (dataset, split and content
    fingerprint), that every row index lies in the split and belongs to its stored class, and,
    when given, that ``way``/``shot``/``query`` match the manifest; each mismatch is a
    ``ValueError`` naming the file and both values. ``output``/``pin_memory`` as for
    :class:`~episodes.EpisodeSampler` (``"uint8"``: raw pixels for the training device).
    """
    path = Path(path)
    header, body = _read(path)
    if header.get("format") != _FORMAT:
        raise ValueError(
            f"manifest {path}: format is {header.get('format')!r}, expected {_FORMAT!r}"
        )
    for key, have in (("dataset", split.name), ("split", split.split)):
        if header.get(key) != have:
            raise ValueError(
                f"manifest {path} was made for {key} {header.get(key)!r}, "
                f"but the given split has {key} {have!r}"
            )
    if header.get("fingerprint") != split.fingerprint:
        raise ValueError(
            f"manifest {path}: data fingerprint {header.get('fingerprint')} does not match "
            f"{split.name}/{split.split} ({split.fingerprint}): the data changed since the "
            "manifest was written"
        )
    for key, want in (("way", way), ("shot", shot), ("query", query)):
        if want is not None and header.get(key) != want:
            raise ValueError(
                f"manifest {path} has {key}={header.get(key)}, but {key}={want} was asked"
            )

    if isinstance(body, list):
        classes = [np.asarray(e["classes"], dtype=np.int64) for e in body]
        support = [np.asarray(e["support"], dtype=np.int64) for e in body]
        query_rows = [np.asarray(e["query"], dtype=np.int64) for e in body]
        shots = np.array([e["shot"] for e in body], dtype=np.int64)
        queries = np.array([e["query_per_class"] for e in body], dtype=np.int64)
        seeds = np.array([e["transform_seed"] for e in body], dtype=np.uint64)
    else:
        ways, shots, queries = body["way"], body["shot"], body["query"]
        classes = np.split(body["classes"], np.cumsum(ways)[:-1])
        support = np.split(body["support"], np.cumsum(ways * shots)[:-1])
        query_rows = np.split(body["query_rows"], np.cumsum(ways * queries)[:-1])
        seeds = body["transform_seed"]

    labels = split.labels
    for index, (cls, sup, qry) in enumerate(zip(classes, support, query_rows)):
        n_way = len(cls)
        if len(sup) != n_way * shots[index] or len(qry) != n_way * queries[index]:
            raise ValueError(f"manifest {path}: episode {index} has inconsistent sizes")
        rows = np.concatenate([sup, qry])
        if len(rows) and (rows.min() < 0 or rows.max() >= len(labels)):
            raise ValueError(
                f"manifest {path}: episode {index} has row indices outside 0..{len(labels) - 1}"
            )
        if cls.min() < 0 or cls.max() >= split.num_classes:
            raise ValueError(f"manifest {path}: episode {index} has class ids outside the split")
        want = np.concatenate([np.repeat(cls, shots[index]), np.repeat(cls, queries[index])])
        if not np.array_equal(labels[rows], want):
            raise ValueError(
                f"manifest {path}: episode {index} rows do not belong to its stored classes"
            )
    return ManifestEpisodes(
        header,
        classes,
        support,
        query_rows,
        shots,
        queries,
        seeds,
        split,
        transform,
        output,
        pin_memory,
    )

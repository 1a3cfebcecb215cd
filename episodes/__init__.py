"""Few-shot episodes: datasets of classes, a deterministic episode sampler, manifests.

Public API (see docs/datasets.md)::

    split = build_split("synthetic", "train")            # or "mini-imagenet", root=CACHE
    sampler = EpisodeSampler(split, way=5, shot=1, query=15, seed=0, num_episodes=1000)
    episode = sampler[3]                                  # a pure function of (seed, split, 3)
    batcher = TaskBatcher(sampler, tasks_per_batch=4)     # batcher.batch(step) -> [Episode]
    save_manifest("test.json", sampler, 600)              # frozen evaluation episodes
"""

from episodes import transforms
from episodes.datasets import (
    build_split,
    list_datasets,
    load_cache,
    prepare_dataset,
    prepare_mini_imagenet,
    register_dataset,
)
from episodes.episode import Episode
from episodes.manifest import ManifestEpisodes, load_manifest, save_manifest
from episodes.sampler import EpisodeSampler, TaskBatcher, collate_episodes
from episodes.split import ImageSplit
from episodes.synthetic import SyntheticGlyphs

__all__ = [
    "Episode",
    "ImageSplit",
    "build_split",
    "list_datasets",
    "load_cache",
    "prepare_dataset",
    "prepare_mini_imagenet",
    "register_dataset",
    "EpisodeSampler",
    "TaskBatcher",
    "collate_episodes",
    "save_manifest",
    "load_manifest",
    "ManifestEpisodes",
    "SyntheticGlyphs",
    "transforms",
]

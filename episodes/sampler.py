"""Deterministic episode sampling: `EpisodeSampler`, `TaskBatcher`, `collate_episodes`.

Episode ``i`` is a pure function of ``(seed, split.name, split.split, i)`` and the way/shot/
query settings: it draws from its own RNG, seeded by ``SeedSequence([seed, hash(name, split),
i])``, never from a shared stream. Workers, ranks and restarts therefore all see the same
episodes, whatever order they ask for them in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from episodes.episode import Episode
from episodes.split import ImageSplit, stable_hash
from episodes.transforms import Normalize, uint8_to_float

__all__ = [
    "EpisodeSampler",
    "TaskBatcher",
    "collate_episodes",
    "SizeSpec",
    "EpisodeSource",
    "OUTPUTS",
]

#: What an episode's images are: float32 ``(C, H, W)`` transformed on the host, or the
#: stored uint8 ``(H, W, C)`` pixels for conversion on the training device.
OUTPUTS = ("float", "uint8")

#: A way or shot setting: a fixed int, an inclusive ``(low, high)`` range drawn uniformly per
#: episode, or a callable ``f(rng: np.random.Generator) -> int`` drawing from the episode's RNG.
SizeSpec = int | tuple[int, int] | Callable[[np.random.Generator], int]

TransformFn = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def _spec_bounds(spec: SizeSpec, what: str) -> tuple[int, int] | None:
    """``(min, max)`` of a size spec, or None for a callable (checked per episode)."""
    if callable(spec):
        return None
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        low = high = int(spec)
    elif (
        isinstance(spec, (tuple, list))
        and len(spec) == 2
        and all(isinstance(v, (int, np.integer)) for v in spec)
    ):
        low, high = int(spec[0]), int(spec[1])
    else:
        raise TypeError(
            f"{what} must be an int, an inclusive (low, high) pair or a callable, got {spec!r}"
        )
    if low > high:
        raise ValueError(f"{what} range {spec} is empty (low > high)")
    return low, high


def _draw(spec: SizeSpec, rng: np.random.Generator, what: str, minimum: int) -> int:
    if callable(spec):
        value = spec(rng)
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{what} callable returned {value!r}, expected an int >= {minimum}")
        return int(value)
    low, high = _spec_bounds(spec, what)  # type: ignore[misc]
    return low if low == high else int(rng.integers(low, high + 1))


def episode_seed_sequence(seed: int, split: ImageSplit, index: int) -> np.random.SeedSequence:
    """The root seed of episode ``index``: independent of every other episode's."""
    if index < 0:
        raise IndexError(f"episode index must be >= 0, got {index}")
    return np.random.SeedSequence([seed, stable_hash(split.name, split.split), index])


class EpisodeSource(Dataset):
    """Turns (classes, support rows, query rows) into an :class:`Episode` of float tensors.

    Shared by :class:`EpisodeSampler` (which draws the rows) and the manifest replay (which
    reads them from a file), so both build episodes the same way. Images become float32
    ``(C, H, W)`` in [0, 1], then ``transform(batch, generator)`` runs once on the episode's
    support and query images together, with a generator seeded from the episode seed.

    With ``output="uint8"`` the images stay uint8 ``(H, W, C)`` as stored (optionally in
    pinned memory), for conversion and normalisation on the training device:
    :meth:`Episode.to_float` / :func:`~episodes.transforms.to_float_normalized` with
    ``split.normalization``; the same episode either way (indices, labels; pixels equal after
    conversion).
    """

    def __init__(
        self,
        split: ImageSplit,
        transform: TransformFn | None,
        seed: int,
        output: str = "float",
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output == "uint8" and transform is not None:
            raise ValueError(
                "output='uint8' hands over raw pixels, normalised later on the training device "
                "(episodes.transforms.to_float_normalized); it takes no transform"
            )
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (pinned memory speeds host->GPU copies)")
        self.split = split
        self.seed = int(seed)
        self.output = output
        self.pin_memory = bool(pin_memory)
        self.transform: TransformFn = (
            transform if transform is not None else Normalize(*split.normalization)
        )

    def _materialise(
        self,
        classes: np.ndarray,
        support_rows: np.ndarray,
        query_rows: np.ndarray,
        shot: int,
        query: int,
        torch_seed: int,
    ) -> Episode:
        way = len(classes)
        rows = np.concatenate([support_rows, query_rows])
        # One gather for the whole episode; works the same on an ndarray or a memmap.
        pixels = torch.from_numpy(np.ascontiguousarray(self.split.images[rows]))
        if self.output == "uint8":  # (N, H, W, C) as stored; converted on the training device
            images = pixels.pin_memory() if self.pin_memory else pixels
        elif isinstance(self.transform, Normalize):  # the default: fused, no random draws
            images = self.transform.from_uint8(pixels)
        else:
            generator = torch.Generator().manual_seed(torch_seed)
            images = self.transform(uint8_to_float(pixels), generator)
        num_support = len(support_rows)
        labels = np.arange(way, dtype=np.int64)
        return Episode(
            support_x=images[:num_support],
            support_y=torch.from_numpy(np.repeat(labels, shot)),
            query_x=images[num_support:],
            query_y=torch.from_numpy(np.repeat(labels, query)),
            # Copies (np.array copies): the episode never aliases a manifest's stored arrays.
            classes=torch.from_numpy(np.array(classes, dtype=np.int64)),
            support_indices=torch.from_numpy(np.array(support_rows, dtype=np.int64)),
            query_indices=torch.from_numpy(np.array(query_rows, dtype=np.int64)),
            way=way,
            shot=shot,
            query=query,
        )

    def to_device(
        self, episode: Episode, device: torch.device | str, non_blocking: bool = True
    ) -> Episode:
        """``episode`` (one of this source's) as float32 ``(n, C, H, W)`` images on ``device``.

        A uint8 episode (``output="uint8"``) crosses to ``device`` as uint8 and is converted
        and normalised there with ``split.normalization``, the constants and operations of
        the float path's default transform: on CPU the result is bit-identical to
        ``output="float"``. A float episode just moves. The trainers' one way to take an
        episode onto their device.
        """
        return episode.to_float(*self.split.normalization, device=device, non_blocking=non_blocking)

    # Subclasses define episode(i) and optionally __len__.
    def episode(self, index: int) -> Episode:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Episode:
        return self.episode(int(index))

    def __iter__(self) -> Iterator[Episode]:
        indices = range(len(self)) if self._finite() else itertools.count()
        for index in indices:
            yield self.episode(index)

    def _finite(self) -> bool:
        return True


class EpisodeSampler(EpisodeSource):
    """N-way K-shot episodes drawn from ``split``, episode ``i`` a pure function of ``i``.

    Args:
        split: the classes and images to draw from.
        way, shot: an int, an inclusive ``(low, high)`` range or a callable on the episode RNG
            (variable way/shot, for training); ``episode.way``/``episode.shot`` hold the draw.
        query: query images per class (int).
        seed: non-negative int; with ``split.name``/``split.split`` and ``i`` it fixes episode i.
        num_episodes: ``len(sampler)``; ``None`` means unbounded (iteration never ends and
            ``len()`` raises, so use it with :class:`TaskBatcher` or explicit indices).
        transform: ``f(images (N, C, H, W) in [0, 1], generator) -> images``; default
            normalises with ``split.normalization`` (train mean/std, or plain /255).
        output: ``"float"`` (default) or ``"uint8"``: raw ``(H, W, C)`` pixels for
            conversion on the training device (:meth:`Episode.to_float`); no transform.
        pin_memory: put uint8 images in pinned memory (CUDA only) for faster copies.

    Labels are remapped to ``0..way-1`` in a random order: episode label ``l`` is dataset class
    ``episode.classes[l]``. Support and query images are ordered class by class.
    """

    def __init__(
        self,
        split: ImageSplit,
        way: SizeSpec,
        shot: SizeSpec,
        query: int,
        seed: int,
        num_episodes: int | None = None,
        transform: TransformFn | None = None,
        output: str = "float",
        pin_memory: bool = False,
    ) -> None:
        super().__init__(split, transform, seed, output, pin_memory)
        if not isinstance(query, (int, np.integer)) or query < 0:
            raise ValueError(f"query must be a non-negative int, got {query!r}")
        if num_episodes is not None and num_episodes < 0:
            raise ValueError(f"num_episodes must be >= 0 or None, got {num_episodes}")
        self.way, self.shot, self.query = way, shot, int(query)
        self.num_episodes = num_episodes
        self._split_hash = stable_hash(split.name, split.split)  # part of every episode seed
        way_bounds = _spec_bounds(way, "way")
        shot_bounds = _spec_bounds(shot, "shot")
        if way_bounds is not None:
            self._check_way(way_bounds[0], way_bounds[1])
        if shot_bounds is not None:
            self._check_shot(shot_bounds[0], shot_bounds[1])

    def _check_way(self, low: int, high: int) -> None:
        if low < 1:
            raise ValueError(f"way must be >= 1, got {low}")
        if high > self.split.num_classes:
            raise ValueError(
                f"way={high} is larger than the {self.split.num_classes} classes of "
                f"{self.split.name}/{self.split.split}"
            )

    def _check_shot(self, low: int, high: int) -> None:
        if low < 1:
            raise ValueError(f"shot must be >= 1, got {low}")
        need = high + self.query
        counts = self.split.class_counts
        short = np.flatnonzero(counts < need)
        if len(short):
            names = ", ".join(
                f"{self.split.class_names[c]!r} ({counts[c]} images)" for c in short[:5]
            )
            more = f" and {len(short) - 5} more" if len(short) > 5 else ""
            raise ValueError(
                f"{self.split.name}/{self.split.split}: shot+query = {high}+{self.query} = {need} "
                f"images per class needed, but {len(short)} class(es) have fewer: {names}{more}"
            )

    @property
    def is_variable(self) -> bool:
        """True when way or shot is drawn per episode."""
        return not (
            isinstance(self.way, (int, np.integer)) and isinstance(self.shot, (int, np.integer))
        )

    def _finite(self) -> bool:
        return self.num_episodes is not None

    def __len__(self) -> int:
        if self.num_episodes is None:
            raise TypeError("EpisodeSampler(num_episodes=None) is unbounded and has no len()")
        return self.num_episodes

    def indices(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """The draw of episode ``index`` without images: ``(classes, support_rows, query_rows,
        shot, torch_seed)``; what a manifest stores."""
        if self.num_episodes is not None and index >= self.num_episodes:
            raise IndexError(f"episode {index} out of range: the sampler has {self.num_episodes}")
        if index < 0:
            raise IndexError(f"episode index must be >= 0, got {index}")
        # episode_seed_sequence(seed, split, index).spawn(2), built directly (spawn's child i
        # is SeedSequence(root.entropy, spawn_key=(i,))) without spawn's overhead.
        entropy = [self.seed, self._split_hash, index]
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(0,)))
        way = _draw(self.way, rng, "way", 1)
        shot = _draw(self.shot, rng, "shot", 1)
        if callable(self.way):
            self._check_way(way, way)
        if callable(self.shot):
            self._check_shot(shot, shot)
        classes = rng.choice(self.split.num_classes, size=way, replace=False)
        per_class = shot + self.query
        support_rows = np.empty((way, shot), dtype=np.int64)
        query_rows = np.empty((way, self.query), dtype=np.int64)
        for label, class_id in enumerate(classes):
            rows = self.split.indices_of(int(class_id))
            picked = rows[rng.choice(len(rows), size=per_class, replace=False)]
            support_rows[label] = picked[:shot]
            query_rows[label] = picked[shot:]
        transform_seq = np.random.SeedSequence(entropy, spawn_key=(1,))
        torch_seed = int(transform_seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        return classes.astype(np.int64), support_rows.ravel(), query_rows.ravel(), shot, torch_seed

    def episode(self, index: int) -> Episode:
        """Episode ``index`` (support/query images, labels, class ids and row indices)."""
        classes, support_rows, query_rows, shot, torch_seed = self.indices(index)
        return self._materialise(classes, support_rows, query_rows, shot, self.query, torch_seed)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler({self.split.name}/{self.split.split}, way={self.way!r}, "
            f"shot={self.shot!r}, query={self.query}, seed={self.seed}, "
            f"num_episodes={self.num_episodes})"
        )


def collate_episodes(batch: Sequence[Episode] | Episode) -> list[Episode]:
    """DataLoader ``collate_fn``: keep episodes as a list (their shapes may differ)."""
    if isinstance(batch, Episode):
        return [batch]
    episodes = list(batch)
    for item in episodes:
        if not isinstance(item, Episode):
            raise TypeError(f"collate_episodes expects Episode objects, got {type(item).__name__}")
    return episodes


class TaskBatcher(Dataset):
    """Meta-batches of episodes: outer step ``s`` uses episodes ``s*T + j``, ``j < T``.

    With ``world_size > 1`` rank ``r`` gets the ``j ≡ r (mod world_size)`` share, so the union
    over ranks is exactly the single-process meta-batch. ``batcher[step]`` is this rank's list;
    iteration runs from ``start_step`` (for resuming) to the end of a finite sampler, or forever.
    """

    def __init__(
        self,
        sampler: EpisodeSource,
        tasks_per_batch: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if tasks_per_batch < 1:
            raise ValueError(f"tasks_per_batch must be >= 1, got {tasks_per_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if tasks_per_batch < world_size:
            raise ValueError(
                f"tasks_per_batch={tasks_per_batch} < world_size={world_size}: some ranks "
                "would get no task"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.sampler = sampler
        self.tasks_per_batch = tasks_per_batch
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def episode_indices(self, step: int) -> list[int]:
        """Episode indices of this rank's share of step ``step``."""
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        base = step * self.tasks_per_batch
        return [base + j for j in range(self.rank, self.tasks_per_batch, self.world_size)]

    def batch(self, step: int) -> list[Episode]:
        """This rank's episodes of outer step ``step``."""
        return [self.sampler.episode(index) for index in self.episode_indices(step)]

    __getitem__ = batch

    def _num_steps(self) -> int | None:
        return len(self.sampler) // self.tasks_per_batch if self.sampler._finite() else None

    def __len__(self) -> int:
        steps = self._num_steps()
        if steps is None:
            raise TypeError("TaskBatcher over an unbounded sampler has no len()")
        return steps

    def iter_from(self, start_step: int) -> Iterator[list[Episode]]:
        """Meta-batches from ``start_step`` on."""
        steps = self._num_steps()
        for step in range(start_step, steps) if steps is not None else itertools.count(start_step):
            yield self.batch(step)

    def __iter__(self) -> Iterator[list[Episode]]:
        return self.iter_from(self.start_step)

    def loader(
        self, num_steps: int, start_step: int | None = None, num_workers: int = 0, **kwargs
    ) -> DataLoader:
        """A DataLoader over steps ``start_step .. start_step+num_steps-1`` (workers allowed).

        Each item is this rank's ``list[Episode]`` for one step; order is preserved.
        """
        first = self.start_step if start_step is None else start_step
        return DataLoader(
            self,
            batch_size=None,
            sampler=range(first, first + num_steps),
            num_workers=num_workers,
            collate_fn=collate_episodes,
            **kwargs,
        )

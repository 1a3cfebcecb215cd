"""The 20 one-shot classification runs of Lake et al. (Science 2015), as frozen test episodes.

``all_runs.zip`` holds ``runNN/training/classMM.png`` (one image of each of 20 characters of
one evaluation alphabet), ``runNN/test/itemKK.png`` (20 more images) and
``runNN/class_labels.txt``, one line per test image: ``runNN/test/itemKK.png
runNN/training/classMM.png``, the test image and the training image of its class (read as
the published ``demo_classification.py`` does). Each run is a 20-way 1-shot task with one
query per class. As a split, run ``r`` class ``m`` is the class ``runNN/classMM`` holding two
images: the training image (support) then its test image (query).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from episodes.datasets.images import ImageRef, ZipMember
from episodes.episode import Episode
from episodes.sampler import EpisodeSource, TransformFn
from episodes.split import ImageSplit

__all__ = [
    "LAKE_RUNS",
    "LAKE_WAY",
    "find_runs",
    "read_runs",
    "LakeRunsEpisodes",
    "replays_lake_runs",
]

LAKE_RUNS = 20
LAKE_WAY = 20
LABELS_FILE = "class_labels.txt"


class _RunsTree:
    """The runs folder (``runNN/`` inside it) or ``all_runs.zip``."""

    def __init__(self, folder: Path | None = None, archive: Path | None = None) -> None:
        self.folder, self.archive = folder, archive
        self._members: set[str] | None = None
        if archive is not None:
            try:
                with zipfile.ZipFile(archive) as handle:
                    self._members = set(handle.namelist())
            except (zipfile.BadZipFile, OSError) as error:
                raise ValueError(f"cannot read zip archive {archive}: {error}") from error

    def __str__(self) -> str:
        return str(self.folder if self.folder is not None else self.archive)

    def exists(self, relative: str) -> bool:
        if self._members is not None:
            return relative in self._members
        return (self.folder / relative).is_file()

    def ref(self, relative: str) -> ImageRef:
        return ZipMember(self.archive, relative) if self.archive else self.folder / relative

    def read_text(self, relative: str) -> str:
        if self.archive is not None:
            with zipfile.ZipFile(self.archive) as handle:
                return handle.read(relative).decode()
        return (self.folder / relative).read_text()


def find_runs(source: Path) -> _RunsTree | None:
    """The 20 runs in ``source``: ``all_runs.zip`` (or ``source`` is it), ``all_runs/runNN``
    or ``runNN`` folders directly in ``source``; None when absent."""
    if source.is_file():
        return _RunsTree(archive=source) if source.name == "all_runs.zip" else None
    for folder in (source / "all_runs", source):
        if (folder / "run01" / LABELS_FILE).is_file():
            return _RunsTree(folder=folder)
    if (source / "all_runs.zip").is_file():
        return _RunsTree(archive=source / "all_runs.zip")
    return None


def read_runs(tree: _RunsTree) -> list[tuple[str, list[ImageRef]]]:
    """``[("runNN/classMM", [training image, its test image]), ...]`` for the 20 runs, in run
    then class order; every run's labels file checked to pair the 20 test images one to one
    with the 20 training images."""
    classes: list[tuple[str, list[ImageRef]]] = []
    for run in range(1, LAKE_RUNS + 1):
        prefix = f"run{run:02d}"
        labels_path = f"{prefix}/{LABELS_FILE}"
        if not tree.exists(labels_path):
            raise FileNotFoundError(f"{tree}: missing {labels_path} (one of the 20 runs)")
        pairs = [line.split() for line in tree.read_text(labels_path).splitlines() if line.strip()]
        if len(pairs) != LAKE_WAY or any(len(p) != 2 for p in pairs):
            raise ValueError(
                f"{tree}/{labels_path}: expected {LAKE_WAY} lines 'test_image training_image'"
            )
        test_of = {}
        for test_file, train_file in pairs:
            for path, folder in ((test_file, "test"), (train_file, "training")):
                if not path.startswith(f"{prefix}/{folder}/") or not tree.exists(path):
                    raise ValueError(
                        f"{tree}/{labels_path}: {path!r} is not an image of {prefix}/{folder}/"
                    )
            if train_file in test_of:
                raise ValueError(
                    f"{tree}/{labels_path}: {train_file} is the class of two test images; the "
                    "runs pair each test image with a different training image"
                )
            test_of[train_file] = test_file
        if len(set(test_of.values())) != LAKE_WAY:
            raise ValueError(f"{tree}/{labels_path}: a test image is listed twice")
        for train_file in sorted(test_of):
            name = f"{prefix}/{Path(train_file).stem}"
            classes.append((name, [tree.ref(train_file), tree.ref(test_of[train_file])]))
    return classes


def _is_runs_split(split: ImageSplit) -> bool:
    """Whether ``split`` holds the 400 run classes ``runNN/classMM`` of 2 images each."""
    expected = [f"run{r:02d}/class{m:02d}" for r in range(1, 21) for m in range(1, 21)]
    return split.class_names == expected and bool((split.class_counts == 2).all())


class LakeRunsEpisodes(EpisodeSource):
    """The 20 runs replayed from a split made by :func:`read_runs` (the ``lake`` protocol's
    test split): episode ``r`` is 20-way, 1 support (the training image) and 1 query (the
    test image) per class, labels in class order ``classMM``. Same images as the published
    runs; queries are ordered by class instead of by item number, which changes no score.
    """

    def __init__(
        self,
        split: ImageSplit,
        transform: TransformFn | None = None,
        output: str = "float",
        pin_memory: bool = False,
    ) -> None:
        super().__init__(split, transform, 0, output, pin_memory)
        if not _is_runs_split(split):
            raise ValueError(
                f"{split.name}/{split.split} is not the 20 Lake runs (400 classes runNN/classMM "
                "of 2 images each: prepare Omniglot with protocol='lake')"
            )
        self.way, self.shot, self.query = LAKE_WAY, 1, 1

    def __len__(self) -> int:
        return LAKE_RUNS

    def indices(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """``(classes, support_rows, query_rows, shot, transform_seed)`` of run ``index + 1``."""
        if not 0 <= index < LAKE_RUNS:
            raise IndexError(f"run index {index} out of range 0..{LAKE_RUNS - 1}")
        classes = np.arange(index * LAKE_WAY, (index + 1) * LAKE_WAY, dtype=np.int64)
        rows = np.stack([self.split.indices_of(int(c)) for c in classes])  # (20, 2)
        return classes, rows[:, 0].copy(), rows[:, 1].copy(), 1, 0

    def episode(self, index: int) -> Episode:
        classes, support, query, shot, seed = self.indices(index)
        return self._materialise(classes, support, query, shot, 1, seed)


def replays_lake_runs(source: EpisodeSource) -> bool:
    """Whether ``source``'s episodes are the 20 runs, in run order, on the ``lake`` test split
    (e.g. ``load_manifest(<cache>/lake_runs.json, test)``): then its per-episode scores are the
    per-run scores of Lake et al. (2015). Compares every episode's classes and rows with
    :class:`LakeRunsEpisodes`; any other source (a sampler, another manifest) gives False.
    """
    if len(source) != LAKE_RUNS or not _is_runs_split(source.split):
        return False
    runs = LakeRunsEpisodes(source.split)
    for index in range(LAKE_RUNS):
        theirs, ours = source.indices(index)[:3], runs.indices(index)[:3]
        if not all(np.array_equal(a, b) for a, b in zip(theirs, ours)):
            return False
    return True

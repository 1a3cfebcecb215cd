"""The dataset registry: `RawSplit`, split names, and `register_dataset` (used where each
dataset family is defined, in this package's other modules)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from episodes.split import ImageSplit

__all__ = [
    "SPLITS",
    "RawSplit",
    "Loader",
    "Checker",
    "DatasetEntry",
    "register_dataset",
    "list_datasets",
    "dataset_entry",
    "canonical_split_name",
    "split_aliases",
]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}


def canonical_split_name(split: str) -> str:
    """``"train" | "val" | "test"`` for a split name or alias (``"validation"``, ``"valid"``)."""
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def split_aliases(split: str) -> tuple[str, ...]:
    """``split`` and every alias naming it, canonical name first."""
    return (split, *[alias for alias, name in _SPLIT_ALIASES.items() if name == split])


@dataclass
class RawSplit:
    """A split as a loader returns it: uint8 ``(N, H, W, C)`` images, labels, class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def canonical(self) -> RawSplit:
        """Classes sorted by name, images class by class (source order kept within a class).

        Every layout of a dataset converts to this order, so their caches are identical.
        """
        order_of_names = sorted(range(len(self.class_names)), key=lambda c: self.class_names[c])
        new_label = np.empty(len(self.class_names), dtype=np.int64)
        new_label[order_of_names] = np.arange(len(order_of_names))
        labels = new_label[np.asarray(self.labels, dtype=np.int64)]
        rows = np.argsort(labels, kind="stable")
        return RawSplit(
            images=np.ascontiguousarray(self.images[rows]),
            labels=labels[rows],
            class_names=[self.class_names[c] for c in order_of_names],
        )


#: ``loader(source, split, options) -> RawSplit``: one split read from the files users hold.
Loader = Callable[[Path, str, dict], RawSplit]
#: ``checker({split: RawSplit}) -> [problem, ...]``: differences from the published dataset.
Checker = Callable[[dict[str, RawSplit]], list[str]]
#: ``generate(split, options) -> ImageSplit``: a dataset made on the fly, without files.
Generator = Callable[[str, dict], ImageSplit]


@dataclass(frozen=True)
class DatasetEntry:
    """What the registry knows of one dataset: how to read (or generate) it, how to check it
    against the published sizes, and which options its loader takes."""

    name: str
    description: str
    loader: Loader | None = None
    generate: Generator | None = None
    checker: Checker | None = None
    options: frozenset[str] = frozenset({"strict"})
    #: ``extras(cache_folder, options)``: extra files written into a new cache before it is
    #: renamed into place (Omniglot's frozen one-shot runs manifest).
    extras: Callable[[Path, dict], None] | None = None

    def check_options(self, options: dict) -> None:
        unknown = sorted(set(options) - self.options)
        if unknown:
            raise ValueError(
                f"dataset {self.name!r} does not take option(s) {unknown}; it takes "
                f"{sorted(self.options)}"
            )


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    description: str,
    *,
    checker: Checker | None = None,
    options: Iterable[str] = (),
    generated: bool = False,
    extras: Callable[[Path, dict], None] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering a dataset under ``name`` where its loader is defined.

    The decorated function is a :data:`Loader` ``(source, split, options) -> RawSplit``, or,
    with ``generated=True``, a :data:`Generator` ``(split, options) -> ImageSplit`` for a
    dataset without files. ``options`` names the keyword options the loader reads (``strict``
    is always accepted); ``checker`` lists differences from the published sizes, enforced by
    ``prepare_dataset(strict=True)``; ``extras(folder, options)`` adds files to a new cache.
    A second registration of a name is an error.

    Example::

        @register_dataset("my-glyphs", "my glyph folders, 28×28", options=("image_size",))
        def load_my_glyphs(source: Path, split: str, options: dict) -> RawSplit: ...
    """

    def register(function: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = DatasetEntry(
            name=name,
            description=description,
            loader=None if generated else function,
            generate=function if generated else None,
            checker=checker,
            options=frozenset({"strict", *options}),
            extras=extras,
        )
        return function

    return register


def list_datasets() -> list[str]:
    """Names accepted by :func:`~episodes.build_split` and :func:`~episodes.prepare_dataset`."""
    return list(_REGISTRY)


def dataset_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name``; a ``ValueError`` listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}: known datasets are {', '.join(_REGISTRY)}")
    return _REGISTRY[name]

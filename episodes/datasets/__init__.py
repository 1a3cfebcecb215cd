"""Few-shot datasets: the registry behind `build_split`, the canonical cache, the converters.

Every real dataset is read by a *loader* ``(source, split, options) -> RawSplit`` from the files
users hold, then either

* written once to the **canonical cache** (:mod:`episodes.datasets.cache`) by
  :func:`prepare_dataset`: ``{split}.npy`` (uint8 ``(N, H, W, C)``, images ordered class by
  class, memory-mappable) plus ``index.json``; or
* read directly by ``build_split(name, split, root=<source folder>)`` (decodes every time).

``build_split(name, split, root=<cache folder>)`` reads the cache (memory-mapped by default).

Layout: ``registry`` (names, :func:`register_dataset`), ``images`` (decoding, zip members),
``cache``, ``build`` (:func:`build_split`, :func:`prepare_dataset`), and one module per dataset
family, each registering itself where its loader is defined: ``synthetic``,
``mini_imagenet``, ``omniglot``, ``cifar_fs`` (CIFAR-FS and FC100), ``imagefolder``.
"""

# Family modules register on import; this order is the order of list_datasets().
from episodes.datasets import synthetic  # noqa: F401  isort: skip
from episodes.datasets import mini_imagenet  # noqa: F401  isort: skip
from episodes.datasets import omniglot  # noqa: F401  isort: skip
from episodes.datasets import cifar_fs  # noqa: F401  isort: skip
from episodes.datasets import imagefolder  # noqa: F401  isort: skip
from episodes.datasets.build import build_split, prepare_dataset, prepare_mini_imagenet
from episodes.datasets.cache import CACHE_FORMAT, CACHE_VERSION, load_cache
from episodes.datasets.cifar_fs import (
    CIFAR100_SUPERCLASSES,
    CIFAR_FS_SPLITS,
    FC100_SUPERCLASS_SPLITS,
)
from episodes.datasets.images import decode_images
from episodes.datasets.mini_imagenet import detect_mini_imagenet_layout
from episodes.datasets.registry import SPLITS, RawSplit, list_datasets, register_dataset

__all__ = [
    "SPLITS",
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "RawSplit",
    "build_split",
    "decode_images",
    "list_datasets",
    "load_cache",
    "prepare_dataset",
    "prepare_mini_imagenet",
    "register_dataset",
    "detect_mini_imagenet_layout",
    "CIFAR_FS_SPLITS",
    "FC100_SUPERCLASS_SPLITS",
    "CIFAR100_SUPERCLASSES",
]

"""The ``"synthetic"`` dataset: procedural glyphs generated on the fly (no files)."""

from __future__ import annotations

from episodes.datasets.registry import register_dataset
from episodes.split import ImageSplit
from episodes.synthetic import SyntheticGlyphs

__all__ = ["synthetic_split"]


@register_dataset("synthetic", "procedural Omniglot-like glyphs, no files", generated=True)
def synthetic_split(split: str, options: dict) -> ImageSplit:
    """Split ``split`` of :class:`~episodes.synthetic.SyntheticGlyphs` ``(**options)``."""
    return SyntheticGlyphs(**options).split(split)

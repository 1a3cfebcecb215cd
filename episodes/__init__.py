"""Few-shot episodes: datasets of classes, a deterministic episode sampler, manifests."""

from episodes.episode import Episode

__all__ = ["Episode"]

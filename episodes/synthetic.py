"""Procedural Omniglot-like glyphs: a few-shot dataset with no files and no download.

Each class is a handful of random cubic Bézier strokes (its "character"). Each image of a
class redraws those strokes with handwriting-like variation: control points wobble, the whole
glyph gets a random affine map (rotation, scale, shear, translation), the pen width varies,
and pixel noise is added. Everything is drawn from ``SeedSequence([seed, split, class])``, so a
class is the same whatever the number of classes asked for, and the splits' classes differ.
Rendering is a vectorised distance-to-segment field in torch (anti-aliased strokes).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from episodes.split import ImageSplit, channel_mean_std, content_fingerprint

__all__ = ["SyntheticGlyphs"]

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_DEFAULT_CLASSES = {"train": 200, "val": 50, "test": 100}
_SEGMENTS_PER_STROKE = 10
_RENDER_CHUNK = 32  # images per rendering chunk: keeps the (n, H*W, S) tensors in cache
_STATS_CLASSES = 32  # train classes whose images define mean/std for every split


def _bezier_weights(num_points: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, num_points)[:, None]
    return np.hstack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3])  # (P, 4)


@dataclass(frozen=True)
class SyntheticGlyphs:
    """Generator of the ``"synthetic"`` dataset (see the module docstring).

    Args:
        num_classes: classes per split: an int for every split, or a mapping
            ``{"train": 200, "val": 50, "test": 100}`` (the default).
        images_per_class: images of each class (default 20, as Omniglot).
        image_size: square side in pixels (default 28).
        channels: 1 (white strokes on black) or 3 (random stroke/background colours per
            image, so colour says nothing about the class).
        seed: the dataset seed; with the split and class index it fixes every class.
        strokes: inclusive range of strokes per class.
        rotation_deg, scale, shear, translate: per-image affine jitter (std of rotation in
            degrees, scale range, std of shear, std of translation in half-image units).
        wobble: std of the per-image control-point displacement (half-image units).
        width: range of the stroke half-width in half-image units.
        noise: std of the Gaussian pixel noise (intensity in [0, 1]).
    """

    num_classes: int | Mapping[str, int] | None = None
    images_per_class: int = 20
    image_size: int = 28
    channels: int = 1
    seed: int = 0
    strokes: tuple[int, int] = (2, 4)
    # Tuned so raw-pixel nearest neighbour gets ~45% and a Conv-4 ProtoNet ~65% on 5-way
    # 1-shot after 300 episodes (docs/benchmarks/episodes.md): learnable, far from solved.
    rotation_deg: float = 20.0
    scale: tuple[float, float] = (0.75, 1.1)
    shear: float = 0.25
    translate: float = 0.12
    wobble: float = 0.1
    width: tuple[float, float] = (0.06, 0.12)
    noise: float = 0.2

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"SyntheticGlyphs: channels must be 1 or 3, got {self.channels}")
        if self.image_size < 8:
            raise ValueError(f"SyntheticGlyphs: image_size must be >= 8, got {self.image_size}")
        if self.images_per_class < 1:
            raise ValueError(
                f"SyntheticGlyphs: images_per_class must be >= 1, got {self.images_per_class}"
            )
        if not 1 <= self.strokes[0] <= self.strokes[1]:
            raise ValueError(
                f"SyntheticGlyphs: strokes must be a range 1 <= low <= high, got {self.strokes}"
            )
        if self.seed < 0:
            raise ValueError(f"SyntheticGlyphs: seed must be >= 0, got {self.seed}")
        if isinstance(self.num_classes, Mapping):
            unknown = set(self.num_classes) - set(_SPLIT_CODES)
            if unknown:
                raise ValueError(
                    f"SyntheticGlyphs: num_classes has unknown splits {sorted(unknown)}"
                )
        # Normalise list-valued options (from YAML) so the dataclass stays hashable.
        for name in ("strokes", "scale", "width"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.num_classes, Mapping):
            object.__setattr__(self, "num_classes", tuple(sorted(self.num_classes.items())))

    def classes_in(self, split: str) -> int:
        """Number of classes of ``split``."""
        if split not in _SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(_SPLIT_CODES)}")
        if self.num_classes is None:
            count = _DEFAULT_CLASSES[split]
        elif isinstance(self.num_classes, int):
            count = self.num_classes
        else:
            count = dict(self.num_classes).get(split, _DEFAULT_CLASSES[split])
        if count < 1:
            raise ValueError(
                f"SyntheticGlyphs: num_classes for {split!r} must be >= 1, got {count}"
            )
        return count

    # ----------------------------------------------------------------- generation

    def _class_segments(
        self, split: str, class_ids: range
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-image stroke segments of ``class_ids``: ``starts``/``ends`` ``(n, S, 2)``,
        half-widths ``(n,)`` and colours ``(n, 2, C)`` (background, stroke), all float32."""
        n_img = self.images_per_class
        max_strokes = self.strokes[1]
        weights = _bezier_weights(_SEGMENTS_PER_STROKE + 1)  # (P, 4)
        starts, ends, widths, colours = [], [], [], []
        for class_id in class_ids:
            rng = np.random.default_rng([self.seed, _SPLIT_CODES[split], class_id])
            # The class's character: strokes of 4 control points, a random walk in [-0.75, 0.75].
            n_strokes = int(rng.integers(self.strokes[0], self.strokes[1] + 1))
            first = rng.uniform(-0.6, 0.6, size=(n_strokes, 1, 2))
            steps = rng.normal(0.0, 0.4, size=(n_strokes, 3, 2))
            control = np.clip(
                np.concatenate([first, first + np.cumsum(steps, axis=1)], 1), -0.75, 0.75
            )
            # Per image: wobbled control points, then an affine map.
            wobbled = control[None] + rng.normal(0.0, self.wobble, size=(n_img, *control.shape))
            points = np.einsum("pk,nskd->nspd", weights, wobbled)  # (n, strokes, P, 2)
            angle = np.deg2rad(rng.normal(0.0, self.rotation_deg, n_img))
            scale = rng.uniform(*self.scale, size=n_img)
            shear = rng.normal(0.0, self.shear, n_img)
            shift = rng.normal(0.0, self.translate, size=(n_img, 2))
            cos, sin = np.cos(angle), np.sin(angle)
            # A = R(angle) @ [[1, shear], [0, 1]] * scale, acting on column vectors (x, y).
            affine = (
                np.stack(
                    [
                        np.stack([cos, cos * shear - sin], -1),
                        np.stack([sin, sin * shear + cos], -1),
                    ],
                    -2,
                )
                * scale[:, None, None]
            )
            points = np.einsum("nij,nspj->nspi", affine, points) + shift[:, None, None, :]
            seg_start = points[:, :, :-1].reshape(n_img, -1, 2)
            seg_end = points[:, :, 1:].reshape(n_img, -1, 2)
            # Pad to the maximum stroke count with far-away segments, so classes stack.
            pad = (max_strokes - n_strokes) * _SEGMENTS_PER_STROKE
            far = np.full((n_img, pad, 2), 1e3)
            starts.append(np.concatenate([seg_start, far], 1))
            ends.append(np.concatenate([seg_end, far], 1))
            widths.append(rng.uniform(*self.width, size=n_img))
            if self.channels == 3:
                background = rng.uniform(0.0, 0.45, size=(n_img, 1, 3))
                stroke = rng.uniform(0.55, 1.0, size=(n_img, 1, 3))
                colours.append(np.concatenate([background, stroke], 1))
            else:
                colours.append(np.tile(np.array([[[0.0], [1.0]]]), (n_img, 1, 1)))
        return (
            np.concatenate(starts).astype(np.float32),
            np.concatenate(ends).astype(np.float32),
            np.concatenate(widths).astype(np.float32),
            np.concatenate(colours).astype(np.float32),
        )

    def _render(self, starts: np.ndarray, ends: np.ndarray, widths: np.ndarray) -> torch.Tensor:
        """Stroke coverage in [0, 1], float32 ``(n, H, W)``: 1 within ``width`` of a segment,
        with a one-pixel linear ramp at the edge (anti-aliasing).

        Squared distance from pixel ``p`` to segment ``a + t (b - a)``, ``t`` in [0, 1], is
        ``|p - a|^2 - 2 t (p - a)·d + t^2 |d|^2`` with ``d = b - a``; the dot products with all
        pixels are two small matmuls, so no ``(n, H*W, S, 2)`` tensor is ever formed.
        """
        size = self.image_size
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
        grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
        pixels = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1)  # (H*W, 2)
        pixels_sq = (pixels * pixels).sum(-1)[None, :, None]  # (1, H*W, 1)
        pixel_size = 2.0 / size
        out = []
        for begin in range(0, len(starts), _RENDER_CHUNK):
            a = torch.from_numpy(starts[begin : begin + _RENDER_CHUNK])  # (n, S, 2)
            d = torch.from_numpy(ends[begin : begin + _RENDER_CHUNK]) - a
            w = torch.from_numpy(widths[begin : begin + _RENDER_CHUNK])[:, None]  # (n, 1)
            d_sq = (d * d).sum(-1).clamp_min(1e-12)[:, None, :]  # (n, 1, S)
            # (p - a)·d and |p - a|^2, each (n, H*W, S)
            rel_dot_d = torch.matmul(pixels, d.transpose(1, 2)).sub_((a * d).sum(-1)[:, None, :])
            rel_sq = (
                torch.matmul(pixels, a.transpose(1, 2))
                .mul_(-2.0)
                .add_(pixels_sq)
                .add_((a * a).sum(-1)[:, None, :])
            )
            t = (rel_dot_d / d_sq).clamp_(0.0, 1.0)
            dist_sq = rel_sq.sub_(rel_dot_d.mul_(2.0).sub_(t * d_sq).mul_(t))
            distance = dist_sq.amin(dim=-1).clamp_min_(0.0).sqrt_()  # (n, H*W)
            coverage = ((w - distance) / pixel_size + 0.5).clamp_(0.0, 1.0)
            out.append(coverage.view(-1, size, size))
        return torch.cat(out)

    def generate(self, split: str, class_ids: range | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images ``(n, H, W, C)`` and int64 labels of ``class_ids`` (default: all)."""
        if class_ids is None:
            class_ids = range(self.classes_in(split))
        starts, ends, widths, colours = self._class_segments(split, class_ids)
        # One thread: these small ops gain little from two, and on a busy machine torch's
        # thread pool can make them ten times slower; results do not depend on it.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            coverage = self._render(starts, ends, widths).numpy()[..., None]  # (n, H, W, 1)
        finally:
            torch.set_num_threads(threads)
        background, stroke = colours[:, None, None, 0, :], colours[:, None, None, 1, :]
        images = background + coverage * (stroke - background)
        # Pixel noise from its own stream per class, so a class never depends on another.
        noise = np.concatenate(
            [
                np.random.default_rng([self.seed, _SPLIT_CODES[split], class_id, 1]).normal(
                    0.0, self.noise, size=(self.images_per_class, *images.shape[1:])
                )
                for class_id in class_ids
            ]
        ).astype(np.float32)
        images = np.clip(np.rint((images + noise) * 255.0), 0, 255).astype(np.uint8)
        labels = np.repeat(np.arange(len(class_ids), dtype=np.int64), self.images_per_class)
        return images, labels

    def split(self, split: str) -> ImageSplit:
        """The whole ``split`` as an in-memory :class:`ImageSplit`."""
        images, labels = self.generate(split)
        class_names = [f"glyph-{split}-{c:05d}" for c in range(self.classes_in(split))]
        mean, std = _train_statistics(self)
        return ImageSplit(
            images=images,
            labels=labels,
            class_names=class_names,
            name="synthetic",
            split=split,
            mean=mean,
            std=std,
            fingerprint=content_fingerprint(images, labels, class_names),
        )

    def options(self) -> dict:
        """The settings, as plain values (for configs and run records)."""
        return asdict(self)


@functools.lru_cache(maxsize=16)
def _train_statistics(glyphs: SyntheticGlyphs) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the first train classes: one normalisation for every split and class count."""
    images, _ = glyphs.generate("train", range(_STATS_CLASSES))
    return channel_mean_std(images)

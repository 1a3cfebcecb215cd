"""Conv factory: one spec decides whether a backbone's convolutions are plain, static or dynamic.

Backbones call ``factory(in_channels, out_channels, kernel_size, stride, padding, bias)``
instead of ``nn.Conv2d``, so NSL reaches any backbone without editing it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from fewshot_nsl.nn.dynamic import (
    DEFAULT_DYNAMIC_GRANULARITY,
    DEFAULT_PREDICTOR_STYLE,
    DYNAMIC_GRANULARITIES,
    DYNAMIC_SIMILARITIES,
    PREDICTOR_STYLES,
    DynamicNSLConv2d,
    SimilarityPredictor,
)
from fewshot_nsl.nn.static import (
    NORMALIZATIONS,
    SIMILARITIES,
    STATIC_GRANULARITIES,
    NSLConv2d,
    resolve_sharing_alias,
)
from fewshot_nsl.ops import GRANULARITIES, IntPair, Padding, to_pair

KINDS = ("plain", "static", "dynamic")
PREDICTORS = ("per_layer", "shared")
_DEFAULT_SIMILARITY = {"static": "full", "dynamic": "diagonal"}
#: The one default granularity per kind. Dynamic: "sample" (one M per image), the form the
#: few-shot learners use; the authors' per-location form is ``granularity: location``.
DEFAULT_GRANULARITY = {"static": "shared", "dynamic": DEFAULT_DYNAMIC_GRANULARITY}
_KIND_GRANULARITIES = {
    "plain": GRANULARITIES,
    "static": STATIC_GRANULARITIES,
    "dynamic": DYNAMIC_GRANULARITIES,
}


def _require(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"ConvSpec.{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class ConvSpec:
    """What kind of convolution a backbone gets (validated on construction).

    Fields:
        kind: ``"plain"`` (``nn.Conv2d``), ``"static"`` (:class:`NSLConv2d`) or
            ``"dynamic"`` (:class:`DynamicNSLConv2d`).
        similarity: static ``"full" | "diagonal" | "identity"``, dynamic ``"full" |
            "diagonal"``; ``None`` -> ``"full"`` (static) / ``"diagonal"`` (dynamic).
        granularity: which elements share one ``M`` block. Static: ``"shared"`` (default) |
            ``"channel"`` (one block per input channel, the paper's "disjoint"); dynamic:
            ``"sample"`` (default; one ``M`` per image) | ``"location"`` (per image and output
            location, the authors' form). :meth:`from_dict` also accepts the paper's
            ``sharing: shared | disjoint`` as an alias of the static granularity.
        normalize: static only: ``None`` | ``"sphere"``.
        hidden: dynamic only: predictor width (also the shared predictor's input width).
        predictor: dynamic only: ``"per_layer"`` (own predictor per layer) or ``"shared"``
            (one predictor per kernel size for the whole network, per-layer 1x1 adapters).
        predictor_batch_norm: dynamic only: BatchNorm in the predictor (``None``: diagonal
            only, as the authors do; ``False`` keeps the predictor buffer-free).
        predictor_style: dynamic only: ``"toolkit"`` | ``"authors"`` (the NSL authors'
            predictor: patch norm dividing the first conv's output, no biases, BatchNorm
            after both convolutions; see :class:`~fewshot_nsl.nn.SimilarityPredictor`).

    Fields that do not apply to ``kind`` are validated but ignored.
    """

    kind: str = "plain"
    similarity: str | None = None
    granularity: str | None = None
    normalize: str | None = None
    hidden: int = 64
    predictor: str = "per_layer"
    predictor_batch_norm: bool | None = None
    predictor_style: str = DEFAULT_PREDICTOR_STYLE

    def __post_init__(self) -> None:
        _require("kind", self.kind, KINDS)
        if self.similarity is None and self.kind in _DEFAULT_SIMILARITY:
            object.__setattr__(self, "similarity", _DEFAULT_SIMILARITY[self.kind])
        if self.similarity is not None:
            allowed = DYNAMIC_SIMILARITIES if self.kind == "dynamic" else SIMILARITIES
            _require("similarity", self.similarity, allowed)
        if self.granularity is None and self.kind in DEFAULT_GRANULARITY:
            object.__setattr__(self, "granularity", DEFAULT_GRANULARITY[self.kind])
        if self.granularity is not None:
            _require("granularity", self.granularity, _KIND_GRANULARITIES[self.kind])
        _require("normalize", self.normalize, NORMALIZATIONS)
        _require("predictor", self.predictor, PREDICTORS)
        _require("predictor_style", self.predictor_style, PREDICTOR_STYLES)
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"ConvSpec.hidden must be a positive int, got {self.hidden!r}")
        if self.predictor_batch_norm not in (None, True, False):
            raise ValueError(
                "ConvSpec.predictor_batch_norm must be one of (None, True, False), "
                f"got {self.predictor_batch_norm!r}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ConvSpec:
        """Build from a config mapping; unknown keys raise ``ValueError`` naming them.

        ``sharing`` (``"shared"`` | ``"disjoint"``) is accepted as an alias of the static
        ``granularity`` (``"shared"`` | ``"channel"``); both at once must agree.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"conv spec must be a mapping, got {type(d).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        fields = dict(d)
        sharing = fields.pop("sharing", None)
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown ConvSpec field(s) {unknown}; allowed fields: {allowed} "
                "(and 'sharing', an alias of the static granularity)"
            )
        if sharing is not None:
            fields["granularity"] = resolve_sharing_alias(
                fields.get("granularity"), sharing, DEFAULT_GRANULARITY["static"], "ConvSpec."
            )
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain dict (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)


class ConvFactory:
    """Callable building the convolutions a :class:`ConvSpec` asks for.

    ``factory(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
    dilation=1) -> nn.Module``. With ``predictor="shared"`` the factory creates one
    :class:`SimilarityPredictor` per kernel size (input width ``spec.hidden``), lazily, and
    every dynamic layer with that kernel size gets a 1x1 adapter onto it: one instance of the
    factory = one network's shared predictor. ``shared_predictors`` lists them.
    """

    def __init__(self, spec: ConvSpec | Mapping[str, Any] | None = None) -> None:
        self.spec = spec if isinstance(spec, ConvSpec) else ConvSpec.from_dict(spec)
        self._shared: dict[tuple[int, int], SimilarityPredictor] = {}

    @property
    def shared_predictors(self) -> list[SimilarityPredictor]:
        return list(self._shared.values())

    def _shared_predictor(self, kernel_size: tuple[int, int]) -> SimilarityPredictor:
        if kernel_size not in self._shared:
            spec = self.spec
            self._shared[kernel_size] = SimilarityPredictor(
                spec.hidden,
                kernel_size,
                spec.similarity,
                spec.granularity,
                spec.hidden,
                spec.predictor_batch_norm,
                spec.predictor_style,
            )
        return self._shared[kernel_size]

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        bias: bool = True,
        dilation: IntPair = 1,
    ) -> nn.Module:
        spec = self.spec
        if spec.kind == "plain":
            return nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias
            )
        if spec.kind == "static":
            return NSLConv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                bias,
                similarity=spec.similarity,
                granularity=spec.granularity,
                normalize=spec.normalize,
            )
        shared = None
        if spec.predictor == "shared":
            shared = self._shared_predictor(to_pair(kernel_size, "kernel_size", 1))
        return DynamicNSLConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            bias,
            similarity=spec.similarity,
            granularity=spec.granularity,
            hidden=spec.hidden,
            predictor=shared,
            predictor_batch_norm=spec.predictor_batch_norm,
            predictor_style=spec.predictor_style,
        )

    def __repr__(self) -> str:
        return f"ConvFactory({self.spec!r})"

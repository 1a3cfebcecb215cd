"""Dynamic NSL: a similarity predictor (hypernetwork) produces ``M`` from the input.

Method doc §1 "Dynamic NSL" and "Shared vs disjoint parameterization of the predictor".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_nsl.nn.functional import PATCH_NORM_EPS, patch_norm
from fewshot_nsl.nn.static import _check_choice, _init_conv_layer, reset_conv_parameters
from fewshot_nsl.ops import ConvGeometry, IntPair, Padding, bilinear_conv2d, to_pair

DYNAMIC_SIMILARITIES = ("diagonal", "full")
DYNAMIC_GRANULARITIES = ("location", "sample")
#: The one default dynamic granularity (layers, predictors and ConvSpec): one M per image, the
#: form the few-shot learners use. The authors' per-location form is ``"location"``.
DEFAULT_DYNAMIC_GRANULARITY = "sample"
#: The per-sample predictor first average-pools its input to at most this many cells per side,
#: so its cost does not grow with the feature map (one M per image needs no fine detail). 4 (was
#: 8): the predictor's fixed cost then stays near a 4x4 main conv's (docs/benchmarks/learners.md).
SAMPLE_POOL = 4
#: ``SimilarityPredictor`` styles: the NSL authors' predictor or this toolkit's first one.
PREDICTOR_STYLES = ("toolkit", "authors")
DEFAULT_PREDICTOR_STYLE = "toolkit"
#: The authors' BatchNorm: TF epsilon 1e-3, moving-average decay 0.999 (PyTorch momentum 1e-3).
AUTHORS_BATCH_NORM = {"eps": 1e-3, "momentum": 1e-3}
FIRST_SCALE = 0.1  # He init scaled by 0.1 (first conv) and 0.001 (head), as the authors do
HEAD_SCALE = 0.001


def _average_pool(x: Tensor, cells: tuple[int, int]) -> Tensor:
    """``F.adaptive_avg_pool2d(x, cells)``; a plain ``avg_pool2d`` (same windows, cheaper
    backward) when the cells tile the map exactly, and nothing when they are the map."""
    height, width = x.shape[2:]
    if (height, width) == cells:
        return x
    if height % cells[0] == 0 and width % cells[1] == 0:
        return F.avg_pool2d(x, (height // cells[0], width // cells[1]))
    return F.adaptive_avg_pool2d(x, cells)


def _same_patch_rnorm(x: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """``1 / patch_norm(x, kernel_size, padding="same")``, ``(B, 1, H, W)``, in fewer ops.

    For odd kernels the zero-padded window sum of ``sum_c x^2`` is an ``avg_pool2d`` with
    divisor 1: cheaper than ``patch_norm``'s one-channel convolution on the small pooled maps
    the per-sample predictor sees. Even kernels (asymmetric "same" padding) use
    ``patch_norm`` itself.
    """
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        return patch_norm(x, kernel_size, padding="same").reciprocal()
    squares = x.square().sum(dim=1, keepdim=True)
    window = F.avg_pool2d(squares, kernel_size, 1, (kh // 2, kw // 2), divisor_override=1)
    return (window + PATCH_NORM_EPS).rsqrt()


class SimilarityPredictor(nn.Module):
    """Predicts ``M`` (identity + a learned correction) from a feature map.

    Two styles (``style``), both: ``conv1`` (``kh x kw``) -> [BatchNorm] -> ReLU -> ``head``
    -> + identity, weights He-initialised and scaled by 0.1 (``conv1``) and 0.001 (``head``):

    * ``"authors"``: the predictor of the NSL authors' CIFAR code (docs/nsl-method.md §1).
      ``conv1``'s *output* is divided by the input's patch norm at ``conv1``'s own geometry,
      ``sqrt(sum over the kh x kw x C patch of x^2 + 1e-4)``; no biases anywhere; with
      BatchNorm (the diagonal form by default) a BatchNorm also follows ``head``, both with
      the authors' TensorFlow settings (eps 1e-3, moving-average decay 0.999 = PyTorch
      momentum 1e-3). In training mode the head's BatchNorm divides its tiny fresh outputs
      by ``sqrt(var + 1e-3)``, so a fresh ``M`` deviates from 1 a few times more than the
      toolkit style's (std of ``M - 1`` measured 3e-3..6e-3 vs ~8e-4, random 32..128-channel
      inputs; not ``1 +- 1``: the eps dominates the head's variance).
    * ``"toolkit"``: the input is divided by its patch norm *before* ``conv1`` ("same"
      padding), ``conv1`` has a bias when there is no BatchNorm, ``head`` always has one,
      a single BatchNorm (PyTorch defaults) follows ``conv1``; a fresh predictor returns
      identity + O(1e-3).

    Per granularity:

    * ``"location"``: ``conv1`` runs at the *main conv's* stride, padding and dilation, so it
      lands on the layer's output grid; ``head`` is a conv3x3 (stride 1, padding 1) with
      ``HV`` or ``HV^2`` outputs per location -> ``M`` ``(B, H_out, W_out, HV[, HV])``. (The
      authors run their head at the main stride too; their layers all have stride 1.)
    * ``"sample"``: ``x`` is first average-pooled to at most ``SAMPLE_POOL`` cells per side,
      then ``conv1`` ("same") with the patch normalisation of the style, -> global average
      -> ``head`` linear -> ``M`` ``(B, HV[, HV])``. Pooling first keeps the predictor at
      ``<= SAMPLE_POOL^2`` cells, so its cost is independent of the feature map size. (The
      authors have no per-sample form; ``"authors"`` applies their normalisation, bias and
      BatchNorm placement to it.)

    ``conv1`` is an ``nn.Conv2d`` for its parameters and initialisation only: it is applied
    functionally with the geometry passed to :meth:`forward`, so its own stride/padding are
    unused (one shared predictor serves layers of different strides).

    ``batch_norm`` (default: ``similarity == "diagonal"``, as in the authors' code) adds the
    style's BatchNorm layers (``norm`` after ``conv1``; ``"authors"`` also ``head_norm``
    after ``head``); pass ``False`` to keep the predictor buffer-free.
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: IntPair,
        similarity: str = "diagonal",
        granularity: str = DEFAULT_DYNAMIC_GRANULARITY,
        hidden: int = 64,
        batch_norm: bool | None = None,
        style: str = DEFAULT_PREDICTOR_STYLE,
    ) -> None:
        super().__init__()
        _check_choice("similarity", similarity, DYNAMIC_SIMILARITIES)
        _check_choice("granularity", granularity, DYNAMIC_GRANULARITIES)
        _check_choice("predictor style", style, PREDICTOR_STYLES)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden!r}")
        self.in_channels = in_channels
        self.kernel_size = to_pair(kernel_size, "kernel_size", 1)
        self.similarity = similarity
        self.granularity = granularity
        self.hidden = hidden
        self.style = style
        self.diagonal = similarity == "diagonal"
        self.taps = self.kernel_size[0] * self.kernel_size[1]
        use_bn = self.diagonal if batch_norm is None else batch_norm
        authors = style == "authors"
        outputs = self.taps if self.diagonal else self.taps * self.taps
        self.conv1 = nn.Conv2d(in_channels, hidden, self.kernel_size, bias=not (use_bn or authors))
        bn_options = AUTHORS_BATCH_NORM if authors else {}
        self.norm = nn.BatchNorm2d(hidden, **bn_options) if use_bn else nn.Identity()
        if granularity == "location":
            self.head: nn.Module = nn.Conv2d(hidden, outputs, 3, padding=1, bias=not authors)
            head_norm = nn.BatchNorm2d
        else:
            self.head = nn.Linear(hidden, outputs, bias=not authors)
            head_norm = nn.BatchNorm1d
        # nn.Identity holds no state: the toolkit style's state dict is unchanged by it.
        self.head_norm = head_norm(outputs, **bn_options) if use_bn and authors else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer, scale in ((self.conv1, FIRST_SCALE), (self.head, HEAD_SCALE)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            with torch.no_grad():
                layer.weight.mul_(scale)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        for norm in (self.norm, self.head_norm):
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.reset_parameters()

    def _first_layer(self, x: Tensor, geometry: ConvGeometry) -> Tensor:
        """``conv1`` with the style's patch normalisation, at ``geometry``."""
        weight, bias = self.conv1.weight, self.conv1.bias
        if self.granularity == "location":
            if self.style == "authors":
                h = F.conv2d(x, weight, None, *geometry)
                return h / patch_norm(x, self.kernel_size, *geometry)
            x = x / patch_norm(x, self.kernel_size, padding="same")
            return F.conv2d(x, weight, bias, *geometry)
        # "sample": the pooled map, "same" geometry; the patch norm of the pooled map.
        rnorm = _same_patch_rnorm(x, self.kernel_size)
        if self.style == "authors":
            return F.conv2d(x, weight, None, padding="same") * rnorm
        x = x * rnorm
        return F.conv2d(x, weight, bias, padding="same")

    def forward(self, x: Tensor, geometry: ConvGeometry) -> Tensor:
        """``M`` for a main conv with this canonical geometry (see the class docstring)."""
        batch = x.shape[0]
        if self.granularity == "location":
            h = self._first_layer(x, geometry)
            delta = self.head_norm(self.head(F.relu(self.norm(h))))  # (B, out, H_out, W_out)
            h_out, w_out = delta.shape[2:]
            if self.diagonal:
                delta = delta.permute(0, 2, 3, 1)
            else:
                delta = delta.view(batch, self.taps, self.taps, h_out, w_out)
                delta = delta.permute(0, 3, 4, 1, 2)
        else:
            cells = (min(x.shape[2], SAMPLE_POOL), min(x.shape[3], SAMPLE_POOL))
            h = self._first_layer(_average_pool(x, cells), geometry)
            features = F.relu(self.norm(h)).mean(dim=(2, 3))
            delta = self.head_norm(self.head(features))
            if not self.diagonal:
                delta = delta.view(batch, self.taps, self.taps)
        if self.diagonal:
            return delta + 1.0
        return delta + torch.eye(self.taps, dtype=delta.dtype, device=delta.device)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, kernel_size={self.kernel_size}, similarity={self.similarity!r}, "
            f"granularity={self.granularity!r}, hidden={self.hidden}, style={self.style!r}"
        )


class AdaptedPredictor(nn.Module):
    """A layer's view of a *shared* predictor: a per-layer 1x1 ``adapter`` conv maps the
    layer's ``in_channels`` to the shared predictor's width, then ``shared`` predicts ``M``.

    ``reset_parameters`` resets only the adapter: the shared predictor belongs to every layer
    and is reset by whoever owns it (the :class:`~fewshot_nsl.nn.ConvFactory`).
    """

    def __init__(self, in_channels: int, shared: SimilarityPredictor) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(in_channels, shared.in_channels, 1, bias=False)
        self.shared = shared

    def reset_parameters(self) -> None:
        self.adapter.reset_parameters()

    def forward(self, x: Tensor, geometry: ConvGeometry) -> Tensor:
        return self.shared(self.adapter(x), geometry)


class DynamicNSLConv2d(nn.Module):
    """Dynamic neural-similarity convolution: ``M`` is predicted from the input (method §1).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as
            ``nn.Conv2d`` (no groups).
        similarity: ``"diagonal"`` (``HV`` tap weights) or ``"full"`` (``HV x HV``).
        granularity: ``"sample"`` (default; one ``M`` per image from globally pooled
            features; cheap, the natural choice inside MAML-style learners) or ``"location"``
            (``M`` per sample and output location, the authors' form).
        hidden: the predictor's hidden width.
        predictor: ``None`` builds the layer's own :class:`SimilarityPredictor`
            ("per_layer", the authors' "disjoint" predictor). Passing a shared
            ``SimilarityPredictor`` ("shared" predictor) makes the layer's ``predictor`` an
            :class:`AdaptedPredictor`: a per-layer 1x1 conv from ``in_channels`` to the
            shared predictor's ``in_channels``, then the shared network. Choice made (the paper
            text was unavailable): the adapter is a bias-free 1x1 conv, the shared width is the
            shared predictor's ``in_channels`` (``hidden`` when built by ``ConvFactory``), and
            patch normalisation happens after the adapter so every layer feeds the shared
            network inputs of the same scale. The shared predictor must match this layer's
            ``kernel_size``, ``similarity`` and ``granularity``.
        predictor_batch_norm: BatchNorm in an own predictor (default: diagonal only).
        predictor_style: an own predictor's :class:`SimilarityPredictor` style,
            ``"toolkit"`` or ``"authors"`` (the NSL authors' predictor).

    Parameters: ``weight``, ``bias`` and the submodule ``predictor`` (learners select
    ``"*.predictor.*"``). A fresh layer is within ~1e-3 relative of ``nn.Conv2d`` with the
    same weights (the predictor starts at identity + tiny).

    Input ``(B, C, H, W)`` -> output ``(B, O, H_out, W_out)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        similarity: str = "diagonal",
        granularity: str = DEFAULT_DYNAMIC_GRANULARITY,
        hidden: int = 64,
        predictor: SimilarityPredictor | None = None,
        predictor_batch_norm: bool | None = None,
        predictor_style: str = DEFAULT_PREDICTOR_STYLE,
    ) -> None:
        super().__init__()
        _check_choice("similarity", similarity, DYNAMIC_SIMILARITIES)
        _check_choice("granularity", granularity, DYNAMIC_GRANULARITIES)
        _init_conv_layer(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias
        )
        self.similarity = similarity
        self.granularity = granularity
        self.diagonal = similarity == "diagonal"
        if predictor is None:
            self.predictor: nn.Module = SimilarityPredictor(
                in_channels,
                self.kernel_size,
                similarity,
                granularity,
                hidden,
                predictor_batch_norm,
                predictor_style,
            )
        else:
            if not isinstance(predictor, SimilarityPredictor):
                raise ValueError(
                    f"predictor must be a SimilarityPredictor or None, got {type(predictor)!r}"
                )
            mine = {
                "kernel_size": self.kernel_size,
                "similarity": similarity,
                "granularity": granularity,
                "style": predictor_style,
            }
            for name, value in mine.items():
                if getattr(predictor, name) != value:
                    raise ValueError(
                        f"the shared predictor has {name}={getattr(predictor, name)!r} but this "
                        f"layer has {name}={value!r}; they must match"
                    )
            self.predictor = AdaptedPredictor(in_channels, predictor)
        self.reset_parameters(predictor=False)

    def reset_parameters(self, predictor: bool = True) -> None:
        """Kernel and bias as ``nn.Conv2d``; the predictor too unless ``predictor=False``."""
        reset_conv_parameters(self.weight, self.bias)
        if predictor:
            self.predictor.reset_parameters()

    def predict_similarity(self, x: Tensor) -> Tensor:
        """The ``M`` this layer uses for input ``x`` (shape per ``granularity``)."""
        return self.predictor(x, ConvGeometry(self.stride, self.padding, self.dilation))

    def forward(self, x: Tensor) -> Tensor:
        M = self.predict_similarity(x)
        return bilinear_conv2d(
            x,
            self.weight,
            M,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            granularity=self.granularity,
            diagonal=self.diagonal,
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"similarity={self.similarity!r}, granularity={self.granularity!r}"
        )
        if self.bias is None:
            text += ", bias=False"
        return text

"""Static NSL: ``NSLConv2d`` (M learned by back-propagation), folding and the M penalty."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_nsl.nn.functional import PATCH_NORM_EPS, patch_norm
from fewshot_nsl.ops import (
    IntPair,
    Padding,
    bilinear_conv2d,
    canonical_geometry,
    effective_weight,
    to_pair,
)

SIMILARITIES = ("full", "diagonal", "identity")
#: Static M: one block for every input channel ("shared") or one per input channel ("channel").
STATIC_GRANULARITIES = ("shared", "channel")
#: The paper's word for the static granularity, accepted as an alias: ``sharing`` -> granularity.
SHARING_ALIASES = {"shared": "shared", "disjoint": "channel"}
NORMALIZATIONS = (None, "sphere")


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def resolve_sharing_alias(
    granularity: str | None, sharing: str | None, default: str, owner: str = ""
) -> str:
    """The static granularity from ``granularity`` and its alias ``sharing``.

    ``sharing`` is the paper's vocabulary (``"shared"`` | ``"disjoint"``, i.e. granularity
    ``"shared"`` | ``"channel"``). Giving both is allowed only when they agree; neither gives
    ``default``. ``owner`` prefixes the field names in error messages (e.g. ``"ConvSpec."``).
    """
    if sharing is None:
        return default if granularity is None else granularity
    if sharing not in SHARING_ALIASES:
        raise ValueError(
            f"{owner}sharing must be one of {tuple(SHARING_ALIASES)} (an alias of "
            f"{owner}granularity 'shared' | 'channel'), got {sharing!r}"
        )
    aliased = SHARING_ALIASES[sharing]
    if granularity is not None and granularity != aliased:
        raise ValueError(
            f"{owner}sharing={sharing!r} means {owner}granularity={aliased!r}, but "
            f"{owner}granularity={granularity!r} was also given; give only granularity"
        )
    return aliased


def reset_conv_parameters(weight: Tensor, bias: Tensor | None) -> None:
    """Initialise ``weight``/``bias`` exactly as ``nn.Conv2d.reset_parameters`` does."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


def _init_conv_layer(
    layer: nn.Module,
    in_channels: int,
    out_channels: int,
    kernel_size: IntPair,
    stride: IntPair,
    padding: Padding,
    dilation: IntPair,
    bias: bool,
) -> None:
    """Give ``layer`` the ``nn.Conv2d`` attributes (canonical geometry) and the parameters
    ``weight`` ``(O, C, kh, kw)`` and ``bias`` ``(O,)`` or ``None``, uninitialised."""
    layer.in_channels = in_channels
    layer.out_channels = out_channels
    layer.kernel_size = to_pair(kernel_size, "kernel_size", 1)
    layer.stride, layer.padding, layer.dilation = canonical_geometry(
        layer.kernel_size, stride, padding, dilation
    )
    layer.weight = nn.Parameter(torch.empty(out_channels, in_channels, *layer.kernel_size))
    if bias:
        layer.bias = nn.Parameter(torch.empty(out_channels))
    else:
        layer.register_parameter("bias", None)


def identity_similarity(m: Tensor, diagonal: bool) -> Tensor:
    """The identity in the form of ``m`` (ones for a diagonal form, eye blocks otherwise)."""
    if diagonal:
        return torch.ones_like(m)
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)


class NSLConv2d(nn.Module):
    """Static neural-similarity convolution ``y = W^T M x`` with a learned ``M`` (method §1).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as
            ``nn.Conv2d`` (no groups; ``padding`` also ``"same"``/``"valid"``).
        similarity: ``"full"`` (an ``HV x HV`` block), ``"diagonal"`` (``HV`` tap weights:
            learns the kernel shape) or ``"identity"`` (``M`` is ``None``: a plain conv).
        granularity: ``"shared"`` (one block for every input channel) or ``"channel"`` (one
            block per input channel, the paper's "disjoint" M).
        sharing: alias of ``granularity`` in the paper's words (``"shared"`` | ``"disjoint"``);
            giving both is an error unless they agree.
        normalize: ``None`` or ``"sphere"``: SphereNet-style, the response is divided by the
            per-filter norm of the effective kernel and the per-patch input norm, both as
            ``sqrt(sum of squares + 1e-4)`` (the eps keeps an all-zero patch/filter finite).

    Parameters: ``weight`` ``(O, C, kh, kw)``, ``bias`` ``(O,)`` or ``None``, and ``M``
    (``None`` for identity), shaped ``(HV, HV)``/``(HV,)`` for "shared" and
    ``(C, HV, HV)``/``(C, HV)`` for "channel". ``M`` starts at the identity, so a fresh layer
    equals ``nn.Conv2d`` with the same weights. Learners select parameters by these names
    (e.g. ``"*.M"``), so they are part of the API.

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
        similarity: str = "full",
        granularity: str | None = None,
        normalize: str | None = None,
        *,
        sharing: str | None = None,
    ) -> None:
        super().__init__()
        granularity = resolve_sharing_alias(granularity, sharing, "shared")
        _check_choice("similarity", similarity, SIMILARITIES)
        _check_choice("granularity", granularity, STATIC_GRANULARITIES)
        _check_choice("normalize", normalize, NORMALIZATIONS)
        _init_conv_layer(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias
        )
        self.similarity = similarity
        self.normalize = normalize
        self.granularity = granularity
        self.diagonal = similarity == "diagonal"
        taps = self.kernel_size[0] * self.kernel_size[1]
        if similarity == "identity":
            self.register_parameter("M", None)
        else:
            lead = () if granularity == "shared" else (in_channels,)
            block = (taps,) if self.diagonal else (taps, taps)
            self.M = nn.Parameter(torch.empty(*lead, *block))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kernel and bias as ``nn.Conv2d``; ``M`` to the identity."""
        reset_conv_parameters(self.weight, self.bias)
        if self.M is not None:
            with torch.no_grad():
                self.M.copy_(identity_similarity(self.M, self.diagonal))

    def effective_weight(self) -> Tensor:
        """``W_eff = M^T W`` per channel block, ``(O, C, kh, kw)``."""
        return effective_weight(self.weight, self.M, self.granularity, self.diagonal)

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize is None:
            return bilinear_conv2d(
                x,
                self.weight,
                self.M,
                self.bias,
                self.stride,
                self.padding,
                self.dilation,
                granularity=self.granularity,
                diagonal=self.diagonal,
            )
        eff = self.effective_weight()
        out = F.conv2d(x, eff, None, self.stride, self.padding, self.dilation)
        kernel_norm = (eff.pow(2).flatten(1).sum(dim=1) + PATCH_NORM_EPS).sqrt()
        input_norm = patch_norm(x, self.kernel_size, self.stride, self.padding, self.dilation)
        out = out / (kernel_norm.view(1, -1, 1, 1) * input_norm)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def fold(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` carrying ``W_eff``: the same outputs at plain-conv speed.

        Raises ``ValueError`` for ``normalize="sphere"``: the per-patch input norm divides
        every output location by a different number, which no fixed kernel can express.
        """
        if self.normalize is not None:
            raise ValueError(
                f"NSLConv2d with normalize={self.normalize!r} cannot be folded into nn.Conv2d: "
                "the per-patch input norm is not a fixed kernel"
            )
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.effective_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def similarity_penalty(self, relative_to_identity: bool = True) -> Tensor:
        """Sum of squares of ``M - I`` (default) or of ``M`` (``relative_to_identity=False``).

        The default penalises the distance from a plain convolution, so the penalty is zero at
        initialisation and pulls towards the CNN rather than towards ``M = 0`` (which would
        zero the layer). The authors' CIFAR code penalises the static *full* ``M`` itself with
        ``l2_regularizer(5e-3)``, i.e. ``2.5e-3 * sum(M^2)`` (a static diagonal ``M`` gets no
        penalty there): ``relative_to_identity=False`` with weight 2.5e-3 reproduces it.
        ``0`` for ``similarity="identity"``.
        """
        if self.M is None:
            return self.weight.new_zeros(())
        target = identity_similarity(self.M, self.diagonal) if relative_to_identity else 0.0
        return (self.M - target).pow(2).sum()

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"similarity={self.similarity!r}, granularity={self.granularity!r}"
        )
        if self.normalize is not None:
            text += f", normalize={self.normalize!r}"
        if self.bias is None:
            text += ", bias=False"
        return text


def fold_model(model: nn.Module) -> nn.Module:
    """Replace every foldable ``NSLConv2d`` in ``model`` by its ``fold()``, in place.

    Returns ``model`` (or the folded conv when ``model`` itself is an ``NSLConv2d``). Layers
    with ``normalize="sphere"`` are not foldable and raise ``ValueError`` (via ``fold``);
    dynamic layers are left as they are (their ``M`` depends on the input).
    """
    if isinstance(model, NSLConv2d):
        return model.fold()
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, NSLConv2d)
    ]
    for parent, name, child in targets:
        setattr(parent, name, child.fold())
    return model


def similarity_penalty(model: nn.Module, relative_to_identity: bool = True) -> Tensor:
    """Sum of :meth:`NSLConv2d.similarity_penalty` over every static NSL layer in ``model``.

    A scalar tensor (``0`` when the model has no static NSL layer with an ``M``).
    """
    total: Tensor | None = None
    for module in model.modules():
        if isinstance(module, NSLConv2d) and module.M is not None:
            term = module.similarity_penalty(relative_to_identity)
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros(()) if param is None else param.new_zeros(())
    return total

"""Backbone registry: one conv factory per network, named backbones, "module:factory" plug-ins.

Every backbone is built by a constructor called with the same keyword arguments::

    constructor(*, conv_factory: ConvFactoryLike, in_channels: int, **options) -> nn.Module

``conv_factory(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True)``
returns a plain, static-NSL or dynamic-NSL convolution depending on the network's
:class:`fewshot_nsl.nn.ConvSpec`; a backbone that builds its convolutions through it gets NSL
without being edited. The returned module maps images ``(B, C, H, W)`` to features
``(B, D)`` and exposes ``out_features: int`` (``D``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn


class ConvFactoryLike(Protocol):
    """What a backbone constructor receives: builds one convolution layer."""

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> nn.Module: ...


BackboneConstructor = Callable[..., nn.Module]

_BACKBONES: dict[str, BackboneConstructor] = {}


def register_backbone(name: str) -> Callable[[BackboneConstructor], BackboneConstructor]:
    """Decorator registering ``constructor`` under ``name`` for :func:`build_backbone`."""
    if not name or ":" in name:
        raise ValueError(f"backbone name must be non-empty and contain no ':', got {name!r}")

    def decorate(constructor: BackboneConstructor) -> BackboneConstructor:
        if name in _BACKBONES and _BACKBONES[name] is not constructor:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = constructor
        return constructor

    return decorate


def list_backbones() -> list[str]:
    """Names of the registered backbones (plug-ins given as "module:attr" are not listed)."""
    return sorted(_BACKBONES)


def _resolve(name: str) -> BackboneConstructor:
    """The constructor for a registered name or a ``"package.module:attribute"`` path."""
    if ":" not in name:
        if name not in _BACKBONES:
            raise ValueError(
                f"unknown backbone {name!r}; registered backbones: {list_backbones()} "
                "(or give a plug-in as 'package.module:factory')"
            )
        return _BACKBONES[name]
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"backbone plug-in must look like 'package.module:factory', got {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"backbone plug-in {name!r}: cannot import module {module_name!r} ({error}); "
            "is it installed or on PYTHONPATH?"
        ) from error
    constructor = module
    for part in attribute.split("."):
        if not hasattr(constructor, part):
            raise ValueError(
                f"backbone plug-in {name!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        constructor = getattr(constructor, part)
    if not callable(constructor):
        raise ValueError(f"backbone plug-in {name!r}: {attribute!r} is not callable")
    return constructor


def make_conv_factory(conv: Any = None) -> ConvFactoryLike:
    """A :class:`fewshot_nsl.nn.ConvFactory` from a ``ConvSpec``, a dict of its fields or None.

    ``None`` means plain convolutions. An object that is already a factory (callable, not a
    spec or mapping) is returned unchanged, so one factory (and its shared predictor) can be
    passed around.
    """
    from fewshot_nsl.nn import ConvFactory, ConvSpec

    if conv is None:
        spec = ConvSpec()
    elif isinstance(conv, ConvSpec):
        spec = conv
    elif isinstance(conv, Mapping):
        spec = ConvSpec.from_dict(dict(conv))
    elif callable(conv):
        return conv
    else:
        raise ValueError(
            f"conv must be a ConvSpec, a dict of ConvSpec fields, a factory or None, "
            f"got {type(conv).__name__}"
        )
    return ConvFactory(spec)


def backbone_options(backbone: str | BackboneConstructor) -> dict[str, Any] | None:
    """The options (keyword arguments besides ``conv_factory``/``in_channels``) of a backbone
    (a name as for :func:`build_backbone`, or a constructor) with their defaults, or None when
    it takes ``**kwargs`` (anything goes)."""
    constructor = _resolve(backbone) if isinstance(backbone, str) else backbone
    try:
        parameters = inspect.signature(constructor).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {
        p.name: p.default
        for p in parameters
        if p.name not in ("conv_factory", "in_channels")
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def build_backbone(name: str, *, in_channels: int, conv: Any = None, **options: Any) -> nn.Module:
    """Build backbone ``name`` with all its (NSL-able) convolutions from one conv factory.

    Args:
        name: a registered name (see :func:`list_backbones`) or ``"package.module:factory"``.
        in_channels: channels of the input images.
        conv: the network's :class:`fewshot_nsl.nn.ConvSpec` (or a dict of its fields, or None
            for plain convolutions).
        **options: passed to the constructor (e.g. ``filters=32`` for conv4).

    Returns:
        a module mapping ``(B, in_channels, H, W)`` to ``(B, out_features)``.
    """
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    constructor = _resolve(name)
    allowed = backbone_options(constructor)
    if allowed is not None and set(options) - set(allowed):
        raise ValueError(
            f"unknown option(s) {sorted(set(options) - set(allowed))} for backbone {name!r}; "
            f"allowed options: {sorted(allowed)}"
        )
    factory = make_conv_factory(conv)
    try:
        backbone = constructor(conv_factory=factory, in_channels=in_channels, **options)
    except TypeError as error:
        raise ValueError(f"backbone {name!r}: bad options {sorted(options)}: {error}") from error
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone {name!r} returned {type(backbone).__name__}, not an nn.Module")
    return backbone


def feature_dim(backbone: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Feature size ``D`` of ``backbone`` for images of ``image_shape = (C, H, W)``, by a dry run.

    Runs one zero image in eval mode without gradients (BatchNorm buffers are untouched) and
    restores the training flag afterwards.
    """
    was_training = backbone.training
    parameter = next(backbone.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        backbone.eval()
        with torch.no_grad():
            features = backbone(torch.zeros(1, *image_shape, device=device))
    finally:
        backbone.train(was_training)
    if features.dim() != 2:
        raise ValueError(f"backbone must return (B, D) features, got shape {tuple(features.shape)}")
    return int(features.shape[1])

"""``build_learner``: a learner and its backbone from the ``learner`` and ``model`` config."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.learners.base import Learner
from fewshot_nsl.learners.maml import MAML, DynamicNSN, StaticNSN
from fewshot_nsl.learners.protonet import ProtoNet

_LEARNERS: dict[str, type[Learner]] = {}

MODEL_KEYS = ("backbone", "backbone_options", "conv")
# Conv-spec fields a learner fills in when the config leaves them out; a conflicting value
# in the config is an error (a "static_nsn" on plain convolutions would be plain MAML).
_REQUIRED_CONV: dict[str, dict[str, Any]] = {
    "static_nsn": {"kind": "static"},
    "dynamic_nsn": {"kind": "dynamic"},
}


def register_learner(name: str) -> Callable[[type[Learner]], type[Learner]]:
    """Decorator registering a :class:`Learner` subclass under ``name`` for build_learner.

    The class is constructed as ``cls(backbone, way, **options)``; its keyword-only
    ``__init__`` parameters are the options a config may set.
    """

    def decorate(cls: type[Learner]) -> type[Learner]:
        if name in _LEARNERS and _LEARNERS[name] is not cls:
            raise ValueError(f"learner {name!r} is already registered")
        _LEARNERS[name] = cls
        return cls

    return decorate


for _name, _cls in (
    ("maml", MAML), ("static_nsn", StaticNSN), ("dynamic_nsn", DynamicNSN), ("protonet", ProtoNet)
):
    register_learner(_name)(_cls)


def list_learners() -> list[str]:
    """Names accepted by :func:`build_learner`."""
    return sorted(_LEARNERS)


def learner_options(name: str) -> dict[str, Any]:
    """The options of learner ``name`` with their defaults."""
    if name not in _LEARNERS:
        raise ValueError(f"unknown learner {name!r}; allowed: {list_learners()}")
    signature = inspect.signature(_LEARNERS[name].__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_learner(
    learner: Mapping[str, Any], model: Mapping[str, Any], *, in_channels: int, way: int
) -> Learner:
    """Build a learner and its backbone from config sections.

    Args:
        learner: ``{"name": "maml" | "static_nsn" | "dynamic_nsn" | "protonet", **options}``
            (options: the keyword arguments of the learner class, e.g. ``inner_steps``).
        model: ``{"backbone": "conv4", "backbone_options": {...}, "conv": {...ConvSpec...}}``;
            ``static_nsn`` / ``dynamic_nsn`` set ``conv.kind`` themselves when it is absent
            (``dynamic_nsn`` also ``conv.granularity="sample"``).
        in_channels: image channels.
        way: classes per episode.

    Raises:
        ValueError naming the unknown learner / option / model key and the allowed values.
    """
    if not isinstance(learner, Mapping) or "name" not in learner:
        raise ValueError(f"learner config must be a mapping with a 'name' in {list_learners()}, "
                         f"got {learner!r}")
    name = learner["name"]
    if name not in _LEARNERS:
        raise ValueError(f"unknown learner name {name!r}; allowed: {list_learners()}")
    options = {key: value for key, value in learner.items() if key != "name"}
    allowed = learner_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for learner {name!r}; allowed options: "
                         f"{sorted(allowed)}")

    if not isinstance(model, Mapping):
        raise ValueError(f"model config must be a mapping with keys {MODEL_KEYS}, got {model!r}")
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; allowed keys: {list(MODEL_KEYS)}")
    backbone_name = model.get("backbone", "conv4")
    backbone_options = dict(model.get("backbone_options") or {})
    for reserved in ("in_channels", "conv", "conv_factory"):
        if reserved in backbone_options:
            raise ValueError(f"model.backbone_options may not set {reserved!r}; it is given by "
                             "the model config / the data")
    conv = dict(model.get("conv") or {})
    for key, value in _REQUIRED_CONV.get(name, {}).items():
        if conv.setdefault(key, value) != value:
            raise ValueError(f"learner {name!r} needs model.conv.{key}={value!r}, got "
                             f"{conv[key]!r}")

    backbone = build_backbone(
        backbone_name, in_channels=in_channels, conv=conv, **backbone_options
    )
    return _LEARNERS[name](backbone, way, **options)

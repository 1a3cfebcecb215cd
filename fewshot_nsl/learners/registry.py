"""Learner registry: named learners and presets, and ``build_learner`` from config sections.

A learner class registers itself at its definition with :func:`register_learner`; the same
class may be registered several times as *presets*: a name, default options and the conv-spec
fields its backbone must have. Static and dynamic NSN are presets of :class:`MAML` (one inner
loop, different defaults and NSL convolutions), not subclasses::

    @register_learner("static_nsn", defaults={"similarity_penalty": 5e-3},
                      conv={"kind": "static"})
    @register_learner("maml")
    class MAML(Learner): ...

The class is constructed as ``cls(backbone, way, **options)``; its keyword-only ``__init__``
parameters are the options a config may set, with the preset's defaults in place of the
class's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.learners.base import Learner

MODEL_KEYS = ("backbone", "backbone_options", "conv")

LearnerType = TypeVar("LearnerType", bound=type[Learner])


@dataclass(frozen=True)
class LearnerEntry:
    """One registered name: the class, its preset defaults and the conv fields it requires.

    ``conv``: conv-spec fields the learner fills in when the config leaves them out; a
    conflicting value in the config is an error (a "static_nsn" on plain convolutions would be
    plain MAML).
    """

    cls: type[Learner]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    conv: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""


_LEARNERS: dict[str, LearnerEntry] = {}


def _keyword_defaults(cls: type[Learner]) -> dict[str, Any]:
    signature = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def register_learner(
    name: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    conv: Mapping[str, Any] | None = None,
    summary: str = "",
) -> Callable[[LearnerType], LearnerType]:
    """Class decorator registering a :class:`Learner` subclass under ``name``.

    Args:
        name: the ``learner.name`` a config uses.
        defaults: option defaults replacing the class's for this name (a preset); every key
            must be a keyword-only option of the class.
        conv: conv-spec fields the backbone must have (filled in when absent).
        summary: one line saying what the preset is (``fewshot-nsl list learners``).
    """

    def decorate(cls: LearnerType) -> LearnerType:
        entry = LearnerEntry(
            cls,
            MappingProxyType(dict(defaults or {})),
            MappingProxyType(dict(conv or {})),
            summary or (cls.__doc__ or "").strip().split("\n")[0],
        )
        unknown = sorted(set(entry.defaults) - set(_keyword_defaults(cls)))
        if unknown:
            raise ValueError(
                f"learner {name!r}: preset defaults {unknown} are not options of {cls.__name__}"
            )
        if name in _LEARNERS and _LEARNERS[name] != entry:
            raise ValueError(f"learner {name!r} is already registered")
        _LEARNERS[name] = entry
        return cls

    return decorate


def list_learners() -> list[str]:
    """Names accepted by :func:`build_learner`."""
    return sorted(_LEARNERS)


def learner_entry(name: str) -> LearnerEntry:
    """The registration of ``name`` (``ValueError`` listing the names when unknown)."""
    if name not in _LEARNERS:
        raise ValueError(f"unknown learner {name!r}; allowed: {list_learners()}")
    return _LEARNERS[name]


def learner_options(name: str) -> dict[str, Any]:
    """The options of learner ``name`` with its defaults (a preset's in place of the class's)."""
    entry = learner_entry(name)
    options = _keyword_defaults(entry.cls)
    options.update(entry.defaults)
    return options


def build_learner(
    learner: Mapping[str, Any], model: Mapping[str, Any], *, in_channels: int, way: int
) -> Learner:
    """Build a learner and its backbone from config sections.

    Args:
        learner: ``{"name": <a registered name>, **options}`` (options: the keyword arguments
            of the learner class, e.g. ``inner_steps``; absent ones take the preset default).
        model: ``{"backbone": "conv4", "backbone_options": {...}, "conv": {...ConvSpec...}}``;
            a preset requiring conv fields (``static_nsn``: ``kind="static"``,
            ``dynamic_nsn``: ``kind="dynamic"``) sets them when absent.
        in_channels: image channels.
        way: classes per episode.

    Raises:
        ValueError naming the unknown learner / option / model key and the allowed values.
    """
    if not isinstance(learner, Mapping) or "name" not in learner:
        raise ValueError(
            f"learner config must be a mapping with a 'name' in {list_learners()}, got {learner!r}"
        )
    name = learner["name"]
    if name not in _LEARNERS:
        raise ValueError(f"unknown learner name {name!r}; allowed: {list_learners()}")
    entry = _LEARNERS[name]
    options = {key: value for key, value in learner.items() if key != "name"}
    allowed = learner_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for learner {name!r}; allowed options: {sorted(allowed)}"
        )

    if not isinstance(model, Mapping):
        raise ValueError(f"model config must be a mapping with keys {MODEL_KEYS}, got {model!r}")
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; allowed keys: {list(MODEL_KEYS)}")
    backbone_name = model.get("backbone", "conv4")
    backbone_options = dict(model.get("backbone_options") or {})
    for reserved in ("in_channels", "conv", "conv_factory"):
        if reserved in backbone_options:
            raise ValueError(
                f"model.backbone_options may not set {reserved!r}; it is given by "
                "the model config / the data"
            )
    conv = dict(model.get("conv") or {})
    for key, value in entry.conv.items():
        if conv.setdefault(key, value) != value:
            raise ValueError(
                f"learner {name!r} needs model.conv.{key}={value!r}, got {conv[key]!r}"
            )

    backbone = build_backbone(backbone_name, in_channels=in_channels, conv=conv, **backbone_options)
    return entry.cls(backbone, way, **{**entry.defaults, **options})

"""Checks of the ``model`` config section shared by both schemas (few-shot and supervised).

:func:`check_conv` is the one conv-spec check: it returns ``ConvSpec.to_dict()``, so a
resolved config records every field of the layer choice (the defaults included).
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_backbone", "check_conv"]


def check_backbone(name: Any) -> str:
    """A registered backbone name or a plug-in ``"package.module:factory"``."""
    from fewshot_nsl.backbones import list_backbones

    if not isinstance(name, str) or not (name in list_backbones() or ":" in name):
        raise ValueError(
            f"got {name!r}; allowed: {list_backbones()} or a plug-in 'package.module:factory'"
        )
    return name


def check_conv(conv: dict[str, Any]) -> dict[str, Any]:
    """Every ConvSpec field filled in (raises ``ValueError`` naming a bad field and its
    allowed values)."""
    from fewshot_nsl.nn import ConvSpec

    return ConvSpec.from_dict(conv).to_dict()

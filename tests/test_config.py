"""The generic config engine (fewshot_nsl.config): schemas, the one merge, overrides, errors.

Tested on a small schema of its own; the few-shot schema is in test_fewshot_config.py, the
supervised one in test_supervised.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fewshot_nsl.config import (
    ConfigError,
    Field,
    Open,
    load_config,
    merge,
    normalized_config,
    resolve_config,
)


def write(tmp_path: Path, payload: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(payload))
    return path


def test_custom_defaults_schema(tmp_path: Path) -> None:
    """What another part (the CIFAR trainer) builds on: plain values, Field and Open."""
    defaults = {
        "optim": {"lr": 0.1, "momentum": Field(0.9, check=lambda v: v), "nesterov": False},
        "extra": Open({"a": 1}),
        "tag": None,
    }
    path = write(tmp_path, {"optim": {"lr": 1}, "extra": {"b": [2]}, "tag": {"any": "thing"}})
    config = load_config(path, ["optim.nesterov=true"], defaults)
    assert config == {
        "optim": {"lr": 1.0, "momentum": 0.9, "nesterov": True},
        "extra": {"b": [2]},
        "tag": {"any": "thing"},
    }
    assert isinstance(config["optim"]["lr"], float)
    with pytest.raises(ConfigError, match=r"optim\.nesterov: got 'yes please'"):
        load_config(path, ["optim.nesterov=yes please"], defaults)


SCHEMA = {
    "model": {"size": 3, "options": Open({"filters": 32})},
    "learner": Open({"name": "a", "x": 1}, switch_key="name"),
}


def test_one_merge_over_defaults_replaces_open_mappings() -> None:
    base = {"model": {"size": 3, "options": {"filters": 32}}, "learner": {"name": "a", "x": 1}}
    merge(base, {"model": {"options": {"depth": 2}}}, SCHEMA, over_defaults=True)
    assert base["model"] == {"size": 3, "options": {"depth": 2}}  # no inherited "filters"


def test_one_merge_between_layers_is_deep_unless_the_switch_key_changes() -> None:
    layer = {"model": {"options": {"filters": 8}}, "learner": {"name": "a", "x": 2}}
    merge(
        layer,
        {"model": {"options": {"depth": 2}}, "learner": {"x": 3}},
        SCHEMA,
        over_defaults=False,
    )
    assert layer == {
        "model": {"options": {"filters": 8, "depth": 2}},
        "learner": {"name": "a", "x": 3},
    }
    merge(layer, {"learner": {"name": "b"}}, SCHEMA, over_defaults=False)
    assert layer["learner"] == {"name": "b"}  # another learner: its options start afresh


def test_normalized_config_fills_new_fields_and_keeps_invalid_ones() -> None:
    schema = {"train": {"steps": 5, "lr": Field(0.1, types=(float,))}}
    assert normalized_config({"train": {"steps": 7}}, schema) == {"train": {"steps": 7, "lr": 0.1}}
    old = {"train": {"steps": 7, "removed": 1}}
    assert normalized_config(old, schema) == old
    with pytest.raises(ConfigError, match=r"train\.removed"):
        resolve_config(old, [], schema)


def test_the_config_engine_needs_only_the_standard_library_and_yaml() -> None:
    """It sits at the bottom of the package: importing it loads no torch, numpy, episodes."""
    code = (
        "import sys, fewshot_nsl.config\n"
        "heavy = sorted({'torch', 'numpy', 'episodes', 'fewshot_nsl.nn', 'fewshot_nsl.learners'}"
        " & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

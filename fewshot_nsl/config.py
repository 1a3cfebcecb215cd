"""Experiment configs: defaults ← YAML file ← dotted command-line overrides, validated.

A config is a nested dict of sections. The *defaults* passed to :func:`load_config` are its
schema as well as its default values:

* a plain value is a field whose type is that of the value (an ``int`` field rejects ``"5"``,
  a ``float`` field accepts ints and YAML strings such as ``1e-3``, which YAML 1.1 reads as a
  string); ``None`` accepts anything;
* a non-empty dict is a closed section: keys not in it are errors naming the allowed keys;
* :class:`Field` adds what a bare value cannot say: several types, allowed values (a list or
  a function computing it, e.g. the registered learners), or a custom check;
* :class:`Open` is a free-form mapping (options passed on to a constructor) with an optional
  check of the whole mapping.

A file may hold ``runs: {NAME: {partial config}, ...}``: each run is the file's base config
with its partial config merged on top, then the command-line overrides; the resolved config
keeps them under ``runs`` (see :func:`iter_runs`). Every error is a :class:`ConfigError`
naming the dotted key, what was expected, and the file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "FEWSHOT_DEFAULTS",
    "Field",
    "Open",
    "dump_config",
    "iter_runs",
    "load_config",
    "parse_overrides",
    "resolve_config",
]

RUNS_KEY = "runs"


class ConfigError(ValueError):
    """An invalid config: unknown key, wrong type or value; the message names the key."""


@dataclass(frozen=True)
class Field:
    """A config field with explicit types, allowed values or a check.

    Args:
        default: the default value.
        types: accepted Python types (``float`` also accepts ints and numeric strings; a
            ``None`` in the tuple allows null). Default: the type of ``default``.
        choices: allowed values, or a zero-argument function returning them (evaluated
            lazily so registries can be consulted at validation time).
        check: ``check(value) -> value`` raising ``ValueError`` on a bad value; may normalise.
    """

    default: Any
    types: tuple[Any, ...] | None = None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    check: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Open:
    """A free-form mapping (constructor options); ``check(mapping) -> mapping`` may validate.

    ``switch_key``: when a later layer (a run, an override file) sets this key to another
    value, the mapping is replaced instead of merged (a run switching ``learner.name`` from
    ``maml`` to ``protonet`` must not inherit MAML's options).
    """

    default: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    switch_key: str | None = None


# -- the few-shot schema ---------------------------------------------------------------------


def _datasets() -> list[str]:
    from episodes import list_datasets

    return list(list_datasets())


def check_backbone(name: Any) -> str:
    from fewshot_nsl.backbones import list_backbones

    if not isinstance(name, str) or not (name in list_backbones() or ":" in name):
        raise ValueError(
            f"got {name!r}; allowed: {list_backbones()} or a plug-in 'package.module:factory'"
        )
    return name


def _check_conv(conv: dict[str, Any]) -> dict[str, Any]:
    from fewshot_nsl.nn import ConvSpec

    ConvSpec.from_dict(conv)  # raises ValueError naming the field and its allowed values
    return conv


def _check_learner(learner: dict[str, Any]) -> dict[str, Any]:
    """Name among the registered learners; options among its keyword arguments, typed like
    their defaults. Returns the section with every option filled in (an explicit record)."""
    from fewshot_nsl.learners import BN_POLICIES, learner_options, list_learners

    name = learner.get("name")
    if name not in list_learners():
        raise ConfigError(f"learner.name: got {name!r}; allowed: {list_learners()}")
    allowed = learner_options(name)
    resolved: dict[str, Any] = {"name": name}
    for key, value in learner.items():
        if key == "name":
            continue
        if key not in allowed:
            raise ConfigError(
                f"learner.{key}: unknown option for learner {name!r}; allowed options: "
                f"{sorted(allowed)}"
            )
        resolved[key] = _check_value(f"learner.{key}", value, _infer_field(allowed[key]))
    for key, default in allowed.items():
        if key not in resolved:
            resolved[key] = list(default) if isinstance(default, tuple) else default
    if "bn" in resolved and resolved["bn"] not in BN_POLICIES:  # the inner-loop BN policy
        raise ConfigError(f"learner.bn: got {resolved['bn']!r}; allowed: {list(BN_POLICIES)}")
    return resolved


def positive_int(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def non_negative_int(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _shot_list(value: list[Any]) -> list[int]:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                            for v in value):
        raise ValueError(f"must be a non-empty list of ints >= 1, got {value!r}")
    return [int(v) for v in value]


def milestones(value: list[Any]) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"must be a list of steps (ints >= 0), got {value!r}")
    return sorted(int(v) for v in value)


LR_SCHEDULES = ("constant", "cosine", "step")
DEVICES_HINT = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def check_device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or (
        value.startswith("cuda:") and value[5:].isdigit()
    ):
        return value
    raise ValueError(f"got {value!r}; allowed: {DEVICES_HINT}")


FEWSHOT_DEFAULTS: dict[str, Any] = {
    "name": Field(None, types=(str, None)),
    "reference": Open(),
    "data": {
        "dataset": Field("synthetic", choices=_datasets),
        "root": Field(None, types=(str, None)),
        "options": Open(),
        "augment": False,
    },
    "episodes": {
        "way": Field(5, check=positive_int),
        "shot": Field(1, check=positive_int),
        "query": Field(15, check=positive_int),
        "tasks_per_batch": Field(4, check=positive_int),
        "val_episodes": Field(100, check=non_negative_int),
        "test_episodes": Field(600, check=positive_int),
        "test_shots": Field([1, 5], check=_shot_list),
        "test_query": Field(15, check=positive_int),
        "eval_seed": Field(0, check=non_negative_int),
        "manifest": Field(None, types=(str, None)),
    },
    "model": {
        "backbone": Field("conv4", check=check_backbone),
        "backbone_options": Open({"filters": 32}),
        "conv": Open({"kind": "plain"}, check=_check_conv),
    },
    "learner": Open({"name": "maml"}, check=_check_learner, switch_key="name"),
    "train": {
        "steps": Field(60000, check=non_negative_int),
        "lr": Field(1e-3, types=(float,)),
        "lr_schedule": Field("constant", choices=LR_SCHEDULES),
        "lr_milestones": Field([], check=milestones),
        "lr_gamma": 0.1,
        "grad_clip": Field(None, types=(float, None)),
        "val_every": Field(1000, check=non_negative_int),
        "checkpoint_every": Field(1000, check=non_negative_int),
        "log_every": Field(50, check=positive_int),
        "seed": Field(0, check=non_negative_int),
        "device": Field("auto", check=check_device),
        "threads": Field(None, types=(int, None), check=positive_int),
        "out_dir": Field(None, types=(str, None)),
    },
}


# -- validation ------------------------------------------------------------------------------


def _infer_field(default: Any) -> Field:
    """The field a bare default value stands for (its type; ``None`` accepts anything)."""
    if isinstance(default, Field):
        return default
    if default is None:
        return Field(None, types=())
    if isinstance(default, bool):
        return Field(default, types=(bool,))
    if isinstance(default, int):
        return Field(default, types=(int,))
    if isinstance(default, float):
        return Field(default, types=(float,))
    if isinstance(default, (list, tuple)):
        return Field(list(default), types=(list,))
    return Field(default, types=(type(default),))


def _type_name(kind: Any) -> str:
    return "null" if kind is None else kind.__name__


def _check_value(key: str, value: Any, spec: Field) -> Any:
    """``value`` converted/checked against ``spec``; ConfigError naming ``key`` otherwise."""
    types = spec.types if spec.types is not None else _infer_field(spec.default).types
    if types:
        if value is None:
            if None not in types:
                raise ConfigError(f"{key}: got null; expected {_describe(types)}")
        else:
            value = _coerce(key, value, types)
    if value is not None and spec.choices is not None:
        choices = spec.choices() if callable(spec.choices) else spec.choices
        if value not in choices:
            raise ConfigError(f"{key}: got {value!r}; allowed values: {list(choices)}")
    if spec.check is not None and value is not None:
        try:
            value = spec.check(value)
        except ConfigError:
            raise
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{key}: {error}") from error
    return value


def _describe(types: tuple[Any, ...]) -> str:
    return " or ".join(_type_name(t) for t in types)


def _coerce(key: str, value: Any, types: tuple[Any, ...]) -> Any:
    for kind in types:
        if kind is None:
            continue
        if kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
                try:
                    return float(value)
                except ValueError:
                    continue
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif kind is list:
            if isinstance(value, (list, tuple)):
                return list(value)
        elif isinstance(value, kind):
            return value
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected {_describe(types)}")


def _validate_section(prefix: str, values: Mapping[str, Any], schema: Mapping[str, Any]) -> dict:
    """Validate ``values`` (already merged over the defaults) against the ``schema`` section."""
    result: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(
                f"{dotted}: unknown key in {where}; allowed keys: {sorted(schema)}"
            )
        spec = schema[key]
        if isinstance(spec, Open):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
            value = copy.deepcopy(dict(value))
            if spec.check is not None:
                try:
                    value = spec.check(value)
                except ConfigError:
                    raise
                except (ValueError, TypeError) as error:
                    raise ConfigError(f"{dotted}: {error}") from error
            result[key] = value
        elif isinstance(spec, Mapping) and spec:
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{dotted}: expected a section (mapping) with keys {sorted(spec)}, "
                    f"got {value!r}"
                )
            result[key] = _validate_section(f"{dotted}.", value, spec)
        else:
            result[key] = _check_value(dotted, value, _infer_field(spec))
    return result


def _default_values(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Plain default values of a schema (Field/Open unwrapped)."""
    values: dict[str, Any] = {}
    for key, spec in schema.items():
        if isinstance(spec, Open):
            values[key] = copy.deepcopy(dict(spec.default))
        elif isinstance(spec, Field):
            values[key] = copy.deepcopy(spec.default)
        elif isinstance(spec, Mapping) and spec:
            values[key] = _default_values(spec)
        else:
            values[key] = copy.deepcopy(spec)
    return values


def _merge(base: dict[str, Any], update: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Merge the file layers ``update`` over the defaults ``base`` in place. Closed sections
    merge key by key; an :class:`Open` mapping given in the file *replaces* its default (so
    ``backbone_options`` of a ResNet do not inherit Conv-4's ``filters``). Between file layers
    (base, run) and for dotted overrides, Open mappings merge key by key."""
    for key, value in update.items():
        spec = schema.get(key) if isinstance(schema, Mapping) else None
        if (
            isinstance(spec, Mapping)
            and spec
            and isinstance(value, Mapping)
            and isinstance(base.get(key), dict)
        ):
            _merge(base[key], value, spec)
        else:
            base[key] = copy.deepcopy(value)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any], schema: Any) -> None:
    """Merge file layer ``update`` into ``base`` at every depth (see :class:`Open.switch_key`)."""
    for key, value in update.items():
        spec = schema.get(key) if isinstance(schema, Mapping) else None
        switched = (
            isinstance(spec, Open)
            and spec.switch_key is not None
            and isinstance(value, Mapping)
            and isinstance(base.get(key), dict)
            and spec.switch_key in value
            and value[spec.switch_key] != base[key].get(spec.switch_key)
        )
        if isinstance(value, Mapping) and isinstance(base.get(key), dict) and not switched:
            _deep_merge(base[key], value, spec)
        else:
            base[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["train.steps=100", "episodes.test_shots=[1,5]"]`` → ``[(["train", "steps"], 100),
    ...]``; values are parsed as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r}: expected 'section.key=value' (e.g. train.steps=100)"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({error})") from error
        parsed.append((key.split("."), value))
    return parsed


def _apply_override(config: dict[str, Any], path: list[str], value: Any) -> None:
    node = config
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {'.'.join(path)}: {'.'.join(path[: depth + 1])} is a value "
                f"({child!r}), not a section"
            )
        node = child
    node[path[-1]] = copy.deepcopy(value)


def resolve_config(
    file_config: Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    defaults: Mapping[str, Any] = FEWSHOT_DEFAULTS,
) -> dict[str, Any]:
    """Merge ``defaults`` ← ``file_config`` ← ``overrides`` and validate (see module doc).

    ``file_config`` may contain ``runs``; each run is resolved as base ← run ← overrides and
    stored, fully resolved, under ``runs`` of the result.
    """
    file_config = dict(file_config or {})
    runs = file_config.pop(RUNS_KEY, None)
    parsed = parse_overrides(overrides)
    for path, _ in parsed:
        if path[0] == RUNS_KEY:
            raise ConfigError(
                f"override {'.'.join(path)}: overrides apply to every run; set the key "
                "without the 'runs.NAME.' prefix"
            )

    def resolve(*layers: Mapping[str, Any]) -> dict[str, Any]:
        combined: dict[str, Any] = {}
        for layer in layers:  # file layers (base, run) merge key by key, at every depth
            _deep_merge(combined, layer, defaults)
        merged = _default_values(defaults)
        _merge(merged, combined, defaults)
        for path, value in parsed:
            _apply_override(merged, path, value)
        return _validate_section("", merged, defaults)

    resolved = resolve(file_config)
    if runs is not None:
        if not isinstance(runs, Mapping) or not runs:
            raise ConfigError("runs: expected a non-empty mapping NAME -> partial config")
        resolved[RUNS_KEY] = {}
        for name, partial in runs.items():
            if not isinstance(partial, Mapping):
                raise ConfigError(f"runs.{name}: expected a mapping (partial config)")
            try:
                run = resolve(file_config, partial)
            except ConfigError as error:
                raise ConfigError(f"runs.{name}: {error}") from error
            if "name" in defaults:  # a run is named by its key unless it says otherwise
                run["name"] = str(partial.get("name") or name)
            resolved[RUNS_KEY][str(name)] = run
    return resolved


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    defaults: Mapping[str, Any] = FEWSHOT_DEFAULTS,
) -> dict[str, Any]:
    """Load and validate the YAML config at ``path`` (defaults ← file ← dotted overrides).

    Args:
        path: YAML file; its top level is a mapping of sections.
        overrides: ``"section.key=value"`` strings, values parsed as YAML.
        defaults: the schema and default values (:data:`FEWSHOT_DEFAULTS` for few-shot runs).

    Returns:
        the resolved config, a plain nested dict. When the file has no ``name``, the file
        stem is used (if the schema has a ``name`` key).

    Raises:
        FileNotFoundError: no file at ``path``.
        ConfigError: bad YAML, unknown key, wrong type or value (message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        file_config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if file_config is not None and not isinstance(file_config, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        config = resolve_config(file_config, overrides, defaults)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    if "name" in defaults and config.get("name") is None:
        config["name"] = path.stem
    return config


def iter_runs(config: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(name, resolved config)`` of every run: the ``runs`` of a multi-run config, else the
    config itself."""
    runs = config.get(RUNS_KEY)
    if runs:
        yield from ((name, dict(run)) for name, run in runs.items())
    else:
        yield str(config.get("name") or "run"), {k: v for k, v in config.items() if k != RUNS_KEY}


def dump_config(config: Mapping[str, Any], path: str | Path | None = None) -> str:
    """The config as YAML text (key order kept); also written to ``path`` when given."""
    text = yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=None, width=100)
    if path is not None:
        Path(path).write_text(text)
    return text


def _plain(value: Any) -> Any:
    """Tuples → lists, nested mappings → dicts, so safe_dump accepts the config."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

"""Experiment configs: defaults ← YAML file ← dotted command-line overrides, validated.

Over 400 lines: fields, validation, the one merge, overrides and loading are one engine,
used only together; splitting it would spread one contract over several files.

This is the generic config engine (stdlib + yaml only, at the bottom of the package); the
schemas live beside what they configure: :mod:`fewshot_nsl.fewshot_config` (few-shot
meta-learning) and :mod:`fewshot_nsl.supervised.config` (supervised classification).

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
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "Field",
    "Open",
    "check_device",
    "check_value",
    "dump_config",
    "iter_runs",
    "load_config",
    "merge",
    "milestones",
    "non_negative_int",
    "normalized_config",
    "parse_overrides",
    "positive_float",
    "positive_int",
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
    ``maml`` to ``protonet`` must not inherit MAML's options). ``follows``: the same for a
    sibling field (see below).
    """

    default: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    switch_key: str | None = None
    #: A sibling field in the same section: when a later layer (a run, the command line)
    #: gives that field another value, the mapping goes back to its default before the layer's
    #: own keys of it apply (``data.options`` follows ``data.dataset``: the synthetic glyphs'
    #: options mean nothing to an image folder).
    follows: str | None = None


# -- checks shared by schemas -----------------------------------------------------------------


def positive_int(value: int) -> int:
    """An int >= 1 (for :attr:`Field.check`)."""
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def non_negative_int(value: int) -> int:
    """An int >= 0 (for :attr:`Field.check`)."""
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def positive_float(value: float) -> float:
    """A finite number > 0 (for :attr:`Field.check`): learning rates, clipping norms. NaN and
    infinity are refused (they make every later step NaN)."""
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number > 0, got {value}")
    return value


def milestones(value: list[Any]) -> list[int]:
    """A sorted list of steps (ints >= 0): learning-rate milestones."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"must be a list of steps (ints >= 0), got {value!r}")
    return sorted(int(v) for v in value)


DEVICES_HINT = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def check_device(value: str) -> str:
    """A torch device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"got {value!r}; allowed: {DEVICES_HINT}")


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


def check_value(key: str, value: Any, spec: Any) -> Any:
    """``value`` checked against ``spec`` (a :class:`Field` or a bare default value, as in a
    schema) and converted; :class:`ConfigError` naming ``key`` otherwise. For schemas whose
    fields are only known at validation time (a learner's options)."""
    return _check_value(key, value, _infer_field(spec))


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
            raise ConfigError(f"{dotted}: unknown key in {where}; allowed keys: {sorted(schema)}")
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
    return {key: _default_value(spec) for key, spec in schema.items()}


def _default_value(spec: Any) -> Any:
    """The plain default value of one schema entry (a fresh copy)."""
    if isinstance(spec, Open):
        return copy.deepcopy(dict(spec.default))
    if isinstance(spec, Field):
        return copy.deepcopy(spec.default)
    if isinstance(spec, Mapping) and spec:
        return _default_values(spec)
    return copy.deepcopy(spec)


def merge(
    base: dict[str, Any], update: Mapping[str, Any], schema: Any, *, over_defaults: bool
) -> None:
    """Merge the config layer ``update`` into ``base`` in place (the one merge of configs).

    Mappings present in both merge key by key, except:

    * ``over_defaults`` (a file's layers merged over the schema's defaults): only closed
      sections merge; an :class:`Open` mapping given in the file *replaces* its default (so
      ``backbone_options`` of a ResNet do not inherit Conv-4's ``filters``);
    * between file layers (base, run): at every depth, unless an :class:`Open` mapping's
      :attr:`Open.switch_key` changes value (then the later layer replaces it);
    * an :class:`Open` mapping whose :attr:`Open.follows` field ``update`` changes goes back to
      its default first (what ``update`` gives of it then applies on that).
    """
    if isinstance(schema, Mapping):
        for key in _followers_reset(base, update, schema):
            base[key] = _default_value(schema[key])
    for key, value in update.items():
        spec = schema.get(key) if isinstance(schema, Mapping) else None
        current = base.get(key)
        both = isinstance(value, Mapping) and isinstance(current, dict)
        if over_defaults:
            key_by_key = both and isinstance(spec, Mapping) and bool(spec)
        else:
            switched = (
                isinstance(spec, Open)
                and spec.switch_key is not None
                and both
                and spec.switch_key in value
                and value[spec.switch_key] != current.get(spec.switch_key)
            )
            key_by_key = both and not switched
        if key_by_key:
            merge(current, value, spec, over_defaults=over_defaults)
        else:
            base[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def _followers_reset(
    section: Mapping[str, Any], update: Mapping[str, Any], schema: Mapping[str, Any]
) -> list[str]:
    """Keys of the :class:`Open` mappings of ``section`` (a config section with its ``schema``)
    that go back to their default before ``update`` (a layer of the same section) is applied:
    those whose :attr:`Open.follows` field ``update`` changes (a mapping ``update`` gives then
    replaces the old one instead of merging into it)."""
    reset = []
    for key, spec in schema.items():
        if not isinstance(spec, Open) or spec.follows is None:
            continue
        if spec.follows in update and key in section:
            current = section.get(spec.follows, _default_value(schema[spec.follows]))
            if update[spec.follows] != current:
                reset.append(key)
    return reset


def _reset_overridden_followers(
    config: dict[str, Any], parsed: Sequence[tuple[list[str], Any]], schema: Mapping[str, Any]
) -> None:
    """Before the overrides ``parsed`` are applied to ``config``: the :class:`Open` mappings
    whose :attr:`Open.follows` field an override changes go back to their default; overrides
    of keys in them then apply on top (``data.dataset=imagefolder`` drops the config's
    synthetic ``data.options``; ``data.options.channels=1`` alongside sets the new ones)."""
    for path, value in parsed:
        section, section_schema = config, schema
        for part in path[:-1]:
            section = section.get(part) if isinstance(section, dict) else None
            section_schema = (
                section_schema.get(part) if isinstance(section_schema, Mapping) else None
            )
        if not isinstance(section, dict) or not isinstance(section_schema, Mapping):
            continue
        for key in _followers_reset(section, {path[-1]: value}, section_schema):
            section[key] = _default_value(section_schema[key])


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
    overrides: Sequence[str],
    defaults: Mapping[str, Any],
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
            merge(combined, layer, defaults, over_defaults=False)
        merged = _default_values(defaults)
        merge(merged, combined, defaults, over_defaults=True)
        _reset_overridden_followers(merged, parsed, defaults)
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
    overrides: Sequence[str],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    """Load and validate the YAML config at ``path`` (defaults ← file ← dotted overrides).

    Args:
        path: YAML file; its top level is a mapping of sections.
        overrides: ``"section.key=value"`` strings, values parsed as YAML.
        defaults: the schema and default values (e.g.
            :data:`fewshot_nsl.fewshot_config.FEWSHOT_DEFAULTS`).

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
        where = _culprit(path, file_config, overrides, defaults, error)
        raise ConfigError(f"{where}: {error}") from error
    if "name" in defaults and config.get("name") is None:
        config["name"] = path.stem
    return config


def _culprit(
    path: Path,
    file_config: Mapping[str, Any] | None,
    overrides: Sequence[str],
    defaults: Mapping[str, Any],
    error: ConfigError,
) -> str:
    """Who made ``error`` (raised resolving ``path`` with ``overrides``): ``"command line"``
    when the overrides did (one is malformed, or the file alone resolves, or fails otherwise),
    else the file's path."""
    if not overrides:
        return str(path)
    try:
        parse_overrides(overrides)
    except ConfigError:
        return "command line"
    try:
        resolve_config(file_config, [], defaults)
    except ConfigError as file_error:
        if str(file_error) == str(error):
            return str(path)
    return "command line"


def normalized_config(saved: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier run (a checkpoint's), resolved again with today's schema:
    fields added since are filled with their defaults and spellings normalised, so it compares
    key by key with a config resolved now. Returned unchanged if it no longer validates (the
    comparison then names the differences)."""
    try:
        return resolve_config(saved, [], defaults)
    except ConfigError:
        return dict(saved)


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

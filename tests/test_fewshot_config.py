"""The few-shot config schema (fewshot_nsl.fewshot_config) through the config engine:
precedence, validation errors naming keys, runs, every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fewshot_nsl.config import ConfigError, dump_config, iter_runs, load_config, parse_overrides
from fewshot_nsl.fewshot_config import (
    FEWSHOT_DEFAULTS,
    load_fewshot_config,
    resolve_fewshot_config,
)
from fewshot_nsl.nn import ConvSpec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, payload: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(payload))
    return path


def test_defaults_file_then_overrides_take_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"steps": 10, "lr": 0.5}, "episodes": {"shot": 5}})
    config = load_fewshot_config(path, ["train.steps=20", "episodes.test_shots=[5]"])
    assert config["train"]["steps"] == 20  # override beats file
    assert config["train"]["lr"] == 0.5  # file beats default
    assert config["episodes"]["shot"] == 5
    assert config["episodes"]["test_shots"] == [5]
    assert config["episodes"]["way"] == 5  # default kept
    assert config["name"] == "run"  # file stem when the file has no name


def test_yaml_exponent_without_dot_is_a_float() -> None:
    # YAML 1.1 reads "1e-3" as a string; a float field must accept it.
    assert resolve_fewshot_config({"train": {"lr": "1e-3"}})["train"]["lr"] == pytest.approx(1e-3)


def test_unknown_key_names_the_key_and_the_allowed_keys() -> None:
    with pytest.raises(ConfigError, match=r"train\.stepz.*allowed keys: \[.*'steps'"):
        resolve_fewshot_config({"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"bogus: unknown key in the top level"):
        resolve_fewshot_config({"bogus": {}})
    with pytest.raises(ConfigError, match=r"train\.nope"):
        resolve_fewshot_config({}, ["train.nope=1"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps: got 'many' \(str\); expected int"):
        resolve_fewshot_config({"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"episodes\.way: got True"):
        resolve_fewshot_config({"episodes": {"way": True}})
    with pytest.raises(ConfigError, match=r"episodes\.way: must be >= 1"):
        resolve_fewshot_config({"episodes": {"way": 0}})
    with pytest.raises(ConfigError, match=r"train: expected a section"):
        resolve_fewshot_config({"train": 3})


def test_enumerations_list_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"learner\.name: got 'mam'; allowed: \[.*'maml'"):
        resolve_fewshot_config({"learner": {"name": "mam"}})
    with pytest.raises(
        ConfigError,
        match=r"data\.dataset: got 'imagenet'; allowed values: .*"
        r"'mini-imagenet'",
    ):
        resolve_fewshot_config({"data": {"dataset": "imagenet"}})
    with pytest.raises(ConfigError, match=r"model\.conv: .*kind.*'plain', 'static', 'dynamic'"):
        resolve_fewshot_config({"model": {"conv": {"kind": "sparse"}}})
    with pytest.raises(ConfigError, match=r"learner\.bn: .*'transductive'"):
        resolve_fewshot_config({"learner": {"name": "maml", "bn": "frozen"}})
    with pytest.raises(
        ConfigError,
        match=r"train\.lr_schedule: got 'linear'; allowed values: "
        r"\['constant', 'cosine', 'step'\]",
    ):
        resolve_fewshot_config({"train": {"lr_schedule": "linear"}})
    with pytest.raises(ConfigError, match=r"model\.backbone: got 'vgg'; allowed: \["):
        resolve_fewshot_config({"model": {"backbone": "vgg"}})
    with pytest.raises(ConfigError, match=r"train\.device"):
        resolve_fewshot_config({"train": {"device": "tpu"}})


def test_learner_options_are_checked_against_the_learner_and_filled_in() -> None:
    with pytest.raises(
        ConfigError,
        match=r"learner\.inner_steps: unknown option for learner "
        r"'protonet'; allowed options: \['embed_together', 'similarity_penalty'\]",
    ):
        resolve_fewshot_config({"learner": {"name": "protonet", "inner_steps": 3}})
    with pytest.raises(ConfigError, match=r"learner\.inner_steps: got 2\.5"):
        resolve_fewshot_config({"learner": {"name": "maml", "inner_steps": 2.5}})
    config = resolve_fewshot_config({"learner": {"name": "static_nsn", "inner_steps": 2}})
    learner = config["learner"]
    assert learner["inner_steps"] == 2
    assert learner["similarity_penalty"] == pytest.approx(5e-3)  # the class default, explicit
    assert learner["frozen"] == ["*.M", "*.predictor.*"]


def test_open_mapping_in_a_file_replaces_its_default() -> None:
    config = resolve_fewshot_config({"model": {"backbone": "resnet12", "backbone_options": {}}})
    assert config["model"]["backbone_options"] == {}  # no stray conv4 'filters'
    config = resolve_fewshot_config({}, ["model.backbone_options.image_size=28"])
    assert config["model"]["backbone_options"] == {"filters": 32, "image_size": 28}


def test_runs_merge_base_run_and_overrides() -> None:
    file_config = {
        "learner": {"name": "maml", "inner_steps": 3},
        "train": {"steps": 50},
        "runs": {
            "plain": {},
            "static": {"learner": {"name": "static_nsn"}, "model": {"conv": {"kind": "static"}}},
            "proto": {"learner": {"name": "protonet"}},
        },
    }
    config = resolve_fewshot_config(file_config, ["train.steps=7"])
    runs = dict(iter_runs(config))
    assert list(runs) == ["plain", "static", "proto"]
    assert runs["plain"]["learner"]["inner_steps"] == 3
    # Another learner name starts from that learner's defaults (no inherited options) ...
    assert runs["static"]["learner"]["inner_steps"] == 5
    # The conv spec is recorded with every field (ConvSpec.to_dict), the given ones kept.
    assert runs["static"]["model"]["conv"] == ConvSpec.from_dict({"kind": "static"}).to_dict()
    assert runs["plain"]["model"]["conv"]["kind"] == "plain"
    assert runs["proto"]["learner"] == {
        "name": "protonet",
        "similarity_penalty": 0.0,
        "embed_together": False,
    }
    assert all(run["train"]["steps"] == 7 for run in runs.values())
    assert runs["static"]["name"] == "static"
    with pytest.raises(ConfigError, match=r"runs\.bad: .*train\.oops"):
        resolve_fewshot_config({"runs": {"bad": {"train": {"oops": 1}}}})
    with pytest.raises(ConfigError, match="overrides apply to every run"):
        resolve_fewshot_config(file_config, ["runs.plain.train.steps=3"])


def test_runs_share_learner_options_through_yaml_merge_keys(tmp_path: Path) -> None:
    """... and sharing options across learners is explicit, with a YAML anchor."""
    path = tmp_path / "runs.yaml"
    path.write_text(
        "learner: &maml {name: maml, inner_steps: 2}\n"
        "runs:\n"
        "  a: {}\n"
        "  b: {learner: {<<: *maml, name: static_nsn}, model: {conv: {kind: static}}}\n"
    )
    runs = dict(iter_runs(load_fewshot_config(path)))
    assert runs["b"]["learner"]["name"] == "static_nsn"
    assert runs["a"]["learner"]["inner_steps"] == runs["b"]["learner"]["inner_steps"] == 2


def test_single_run_iterates_as_itself() -> None:
    config = resolve_fewshot_config({"name": "solo"})
    [(name, run)] = list(iter_runs(config))
    assert name == "solo" and run == config


def test_bad_overrides_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected 'section.key=value'"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="expected 'section.key=value'"):
        parse_overrides(["train..steps=3"])
    assert parse_overrides(["a.b=[1, 2]", "c=null"]) == [(["a", "b"], [1, 2]), (["c"], None)]
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_fewshot_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_fewshot_config(bad)
    with pytest.raises(ConfigError, match=r"bad2.yaml: train\.stepz"):
        load_fewshot_config(write(tmp_path, {"train": {"stepz": 1}}, "bad2.yaml"))


def test_dump_and_reload_round_trips(tmp_path: Path) -> None:
    config = resolve_fewshot_config(
        {"name": "x", "runs": {"a": {}, "b": {"learner": {"name": "protonet"}}}},
        ["train.lr=2e-3"],
    )
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    assert load_fewshot_config(path) == config


def _few_shot_configs() -> list[Path]:
    return sorted(
        path
        for path in CONFIGS.rglob("*.yaml")
        if not path.name.startswith(("cifar10_", "cifar100_", "supervised_"))
    )


@pytest.mark.parametrize("path", _few_shot_configs(), ids=lambda p: p.stem)
def test_every_shipped_few_shot_config_loads_and_builds(path: Path) -> None:
    """Every shipped few-shot config validates, and its learner builds (CPU, no data)."""
    from fewshot_nsl.runner import build_model

    config = load_fewshot_config(path)
    for _, run in iter_runs(config):
        channels = 1 if run["data"]["dataset"] in ("omniglot", "synthetic") else 3
        channels = run["data"]["options"].get("channels", channels)
        learner = build_model(run, in_channels=channels)
        assert sum(p.numel() for p in learner.parameters()) > 0


def test_the_result_rows_are_all_shipped() -> None:
    names = {path.stem for path in _few_shot_configs()}
    for data in ("miniimagenet", "cifarfs", "omniglot"):
        for shot in (1, 5):
            for method in ("maml", "static_nsn_maml", "dynamic_nsn", "protonet"):
                assert f"{method}_conv4_{data}_{shot}shot" in names
    assert "quickstart" in names


def test_maml_rows_follow_the_maml_paper() -> None:
    for shot, meta_batch in ((1, 4), (5, 2)):
        config = load_fewshot_config(CONFIGS / f"maml_conv4_miniimagenet_{shot}shot.yaml")
        assert config["model"]["backbone_options"] == {"filters": 32, "image_size": 84}
        assert config["learner"]["inner_lr"] == 0.01
        assert (config["learner"]["inner_steps"], config["learner"]["inner_steps_eval"]) == (5, 10)
        assert config["learner"]["first_order"] is False
        assert config["episodes"]["tasks_per_batch"] == meta_batch
        assert (config["train"]["lr"], config["train"]["steps"]) == (1e-3, 60000)


@pytest.mark.parametrize(
    "path",
    sorted(CONFIGS.glob("cifar*.yaml")) + sorted(CONFIGS.glob("supervised_*.yaml")),
    ids=lambda p: p.stem,
)
def test_shipped_supervised_configs_load(path: Path) -> None:
    from fewshot_nsl.supervised import SUPERVISED_DEFAULTS

    assert load_config(path, [], SUPERVISED_DEFAULTS)


def test_few_shot_defaults_resolve_without_a_file() -> None:
    config = resolve_fewshot_config(None)
    assert config["learner"]["name"] == "maml"
    assert set(config) == set(FEWSHOT_DEFAULTS)

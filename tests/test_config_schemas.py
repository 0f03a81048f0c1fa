"""Learner configs have one source of truth: the learner's constructor.

Each registered learner's Hydra schema must have exactly the constructor's parameters (less the
ones the app supplies) with the constructor's defaults, checked here against
``inspect.signature`` directly; the YAML files in ``conf/`` only set what differs from their
schema's defaults.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, Optional, Union

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import medmeta.config as config
from medmeta.learners import list_learners
from medmeta.learners.registry import LEARNERS

CONF = Path(__file__).resolve().parents[1] / "conf"
APP_SUPPLIED = {"backbone", "tasks"}


def _signature_defaults(cls: Any) -> dict[str, Any]:
    """Name -> default of every constructor parameter a config sets, read from inspect.signature.

    A MAML variant's ``__init__(backbone, **kwargs)`` forwards to its parent: it takes the
    parent's parameters except the ones it fixes."""
    params = inspect.signature(cls).parameters
    out = {
        n: p.default for n, p in params.items()
        if n not in APP_SUPPLIED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        parent = _signature_defaults(cls.__mro__[1])
        out = {**parent, **out}
        for fixed in getattr(cls, "fixed_options", {}):
            out.pop(fixed)
    return out


def _schema_defaults(schema: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(schema):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


@pytest.mark.parametrize("name", list_learners())
def test_learner_schema_has_the_constructor_parameters_and_defaults(name: str) -> None:
    cls = LEARNERS.get(name)
    expected = _signature_defaults(cls)
    schema = config.learner_schemas()[name]
    got = _schema_defaults(schema)
    assert got.pop("name") == name
    assert list(got) == list(expected)  # same names, in signature order
    for key, default in expected.items():
        assert got[key] == default and type(got[key]) is type(default), (name, key, got[key], default)


@pytest.mark.parametrize("name", list_learners())
def test_composed_learner_config_is_the_constructor_defaults(name: str) -> None:
    """conf/learner/<name>.yaml composes to exactly the constructor's defaults (the file only names
    its schema), so a changed constructor default reaches every app."""
    option = CONF / "learner" / f"{name}.yaml"
    assert option.is_file(), f"registered learner {name!r} has no conf/learner/{name}.yaml"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"learner={name}"])
    learner = OmegaConf.to_container(cfg.learner)
    assert learner.pop("name") == name
    assert learner == _signature_defaults(LEARNERS.get(name))


def test_finetune_short_differs_from_finetune_only_in_steps() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        short = OmegaConf.to_container(compose("train", overrides=["learner=finetune_short"]).learner)
    defaults = {"name": "finetune", **_signature_defaults(LEARNERS.get("finetune"))}
    assert {k for k in short if short[k] != defaults[k]} == {"steps"}
    assert short["steps"] == 10


def test_every_registered_learner_schema_is_in_the_config_store() -> None:
    learner_group = ConfigStore.instance().repo["learner"]
    assert {f"{n}_schema.yaml" for n in list_learners()} <= set(learner_group)


def test_schema_types_keep_what_a_config_can_hold() -> None:
    fields = {f.name: f.type for f in dataclasses.fields(config.learner_schemas()["finetune"])}
    assert fields["augment"] == Optional[str]  # Union[None, str, Callable]: a config holds None or a name
    assert fields["batch_size"] == Optional[int] and fields["steps"] is int
    assert config._config_type(Union[int, str]) is Any
    assert config._config_type(Callable[[int], int]) is None


def test_a_changed_constructor_default_changes_the_schema() -> None:
    class Toy:
        def __init__(self, backbone: Any, depth: int = 3, mode: Optional[str] = None, scales: tuple = (1, 2)) -> None:
            pass

    schema = config.learner_schema("toy", Toy)
    assert _schema_defaults(schema) == {"name": "toy", "depth": 3, "mode": None, "scales": [1, 2]}
    Toy.__init__.__defaults__ = (4, None, (1, 2))  # type: ignore[attr-defined]
    assert _schema_defaults(config.learner_schema("toy", Toy))["depth"] == 4


def test_a_default_no_config_can_hold_is_refused() -> None:
    class Bad:
        def __init__(self, backbone: Any, act: Callable[[int], int] = abs) -> None:
            pass

    with pytest.raises(TypeError, match="act="):
        config.learner_schema("bad", Bad)


def _redundant(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        if key == "defaults":
            continue
        default = defaults.get(key, object()) if isinstance(defaults, dict) else object()
        if isinstance(value, dict) and isinstance(default, dict) and value:
            out += _redundant(value, default, f"{prefix}{key}.")
        elif value == default:
            out.append(prefix + key)
    return out


GROUP_SCHEMAS = {
    "data": config.DataConfig, "sampler": config.SamplerConfig, "backbone": config.BackboneConfig,
    "trainer": config.TrainerConfig, "protocol": config.ProtocolConfig, "logger": config.LoggerConfig,
}


@pytest.mark.parametrize("path", sorted(CONF.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_option_files_only_override_their_schema(path: Path) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    schema_name = next((d for d in data.get("defaults", []) if isinstance(d, str) and d.endswith("_schema")), None)
    if schema_name is None:
        pytest.skip("extends another option file or no schema (experiments, launchers)")
    group = path.parent.name
    schema = config.learner_schemas()[schema_name[: -len("_schema")]] if group == "learner" else GROUP_SCHEMAS[group]
    defaults = OmegaConf.to_container(OmegaConf.structured(schema))
    assert _redundant(data, defaults) == [], f"{path} repeats its schema's defaults"

"""The Hydra protocol schema is :class:`ProtocolConfig` itself (one protocol config class): the
protocol presets in ``conf/protocol/`` compose to the library's presets, and what the schema
cannot hold is rejected while composing."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException

import medmeta.config  # noqa: F401  (registers the schemas)
from medmeta.evaluation import ProtocolConfig, l2l_protocol, medimeta_protocol
from medmeta.training.components import build_protocol

CONF = Path(__file__).resolve().parents[2] / "conf"


def _protocol(*overrides: str) -> ProtocolConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return build_protocol(compose("evaluate", overrides=list(overrides)).protocol)


def test_the_registered_protocol_schema_is_the_runtime_protocol_config() -> None:
    node = ConfigStore.instance().repo["protocol"]["protocol_schema.yaml"].node
    assert node._metadata.object_type is ProtocolConfig


@pytest.mark.parametrize("option,preset", [("l2l", l2l_protocol), ("medimeta", medimeta_protocol)])
def test_protocol_files_compose_to_the_library_presets(option: str, preset) -> None:
    assert _protocol(f"protocol={option}") == preset()


def test_quickstart_protocol_values_and_overrides() -> None:
    quickstart = _protocol("protocol=quickstart")
    assert (quickstart.shots, quickstart.instances, quickstart.n_query) == ((1, 5), 5, 5)
    assert quickstart.metrics == ("auroc", "accuracy") and quickstart.on_insufficient == "skip"
    assert _protocol("protocol=quick", "protocol.shots=[2,3]").shots == (2, 3)  # a list becomes the tuple


def test_protocol_values_the_schema_cannot_hold_are_rejected_while_composing() -> None:
    with pytest.raises(ConfigCompositionException, match="shotz"):
        _protocol("protocol=quick", "protocol.shotz=[1]")
    with pytest.raises(ConfigCompositionException, match="shots"):
        _protocol("protocol=quick", "protocol.shots=[one]")

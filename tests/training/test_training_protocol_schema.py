"""The Hydra schema ``ProtocolSettings`` mirrors ``ProtocolConfig`` (lists where the runtime
config keeps tuples, because OmegaConf has no tuples). A field added to one and not the other
would be rejected on the command line or take a different default there, so they must agree."""
from __future__ import annotations

import dataclasses

from medmeta.config import ProtocolSettings
from medmeta.evaluation import ProtocolConfig


def _defaults(cls: type) -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def test_protocol_schema_mirrors_the_runtime_protocol_config() -> None:
    assert _defaults(ProtocolSettings) == _defaults(ProtocolConfig)

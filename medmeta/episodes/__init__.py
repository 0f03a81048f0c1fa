"""Episodes: seeded samplers (fixed, variable, multi-label, multi-domain), streams and frozen lists."""
from __future__ import annotations

from medmeta.episodes.frozen import load_episode_list, read_episode_list, save_episode_list, source_facts
from medmeta.episodes.multi_domain import MultiDomainSampler, task_weights
from medmeta.episodes.provider import SourceProvider
from medmeta.episodes.samplers import (
    EpisodeSampler,
    FewShotSampler,
    InsufficientDataError,
    VariableFewShotSampler,
    episode_rng,
)
from medmeta.episodes.spec import EpisodeSpec
from medmeta.episodes.stream import EpisodeLoader, EpisodeStream, collate_episodes

__all__ = [
    "EpisodeSpec",
    "EpisodeSampler",
    "FewShotSampler",
    "VariableFewShotSampler",
    "InsufficientDataError",
    "MultiDomainSampler",
    "EpisodeStream",
    "EpisodeLoader",
    "SourceProvider",
    "collate_episodes",
    "episode_rng",
    "task_weights",
    "save_episode_list",
    "load_episode_list",
    "read_episode_list",
    "source_facts",
]

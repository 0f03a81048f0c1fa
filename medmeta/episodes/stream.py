"""EpisodeStream: episodes materialized in DataLoader workers, resumable and shardable by rank.

The stream numbers episodes globally. With ``world_size`` ranks, round ``r`` covers episodes
``start + r * world_size + rank``; each rank takes its own episode of every round, so ranks
never share an episode and all of them together see every number exactly once. DataLoader
workers split a rank's rounds in blocks of ``batch_size`` (worker ``w`` takes blocks
``b % num_workers == w``), so the main process receives blocks in order and the stream knows
exactly which episodes were consumed. ``state_dict()`` holds the next global episode number;
``load_state_dict`` resumes with exactly the episodes the run would have seen next.

Use :meth:`EpisodeStream.loader` (it keeps the state), or any DataLoader with
``batch_size=stream.batch_size`` and ``collate_fn=collate_episodes`` plus
:meth:`EpisodeStream.mark_consumed` after each batch.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Optional

from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medmeta.episodes.provider import SourceProvider, SourcesLike
from medmeta.tasks import Episode

__all__ = ["EpisodeStream", "EpisodeLoader", "collate_episodes"]


def collate_episodes(batch: list[Episode]) -> list[Episode]:
    """DataLoader collate that keeps a batch as a list of episodes (their sizes differ)."""
    return list(batch)


class EpisodeStream(IterableDataset):
    """An ``IterableDataset`` of :class:`Episode` drawn by ``sampler`` (see module doc).

    Args:
        sampler: anything with ``.sample(k) -> EpisodeSpec`` (a few-shot or multi-domain sampler).
        sources: where images are read: a meta-dataset, a mapping of tasks to sources or one
            source; ``None`` uses the sampler's own sources (``sampler.source_for``). Opened
            lazily in each worker process.
        start: the first global episode number.
        rank, world_size: this process's share in distributed training.
        split: split of the sources (default: the sampler's split).
        stop: one past the last global episode number (``None``: endless).
        batch_size: episodes per DataLoader batch (blocks given to one worker).
        transform: optional function applied to the image batch of each episode (augmentation).
    """

    def __init__(
        self,
        sampler: Any,
        sources: Optional[SourcesLike] = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: Optional[str] = None,
        stop: Optional[int] = None,
        batch_size: int = 1,
        transform: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        super().__init__()
        if not hasattr(sampler, "sample"):
            raise TypeError(f"sampler: expected an object with .sample(k), got {type(sampler).__name__}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank/world_size: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if int(start) < 0 or (stop is not None and int(stop) < int(start)):
            raise ValueError(f"start/stop: need 0 <= start <= stop, got start={start}, stop={stop}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.sampler = sampler
        split = split if split is not None else getattr(sampler, "split", None)
        self.provider = None if sources is None else SourceProvider(sources, split=split)
        self.start = int(start)
        self.stop = None if stop is None else int(stop)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch_size = int(batch_size)
        self.transform = transform

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """The next global episode number (the same on every rank when ranks step together)."""
        return {"next_episode": self.start, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            nxt = int(state["next_episode"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"EpisodeStream.load_state_dict: expected {{'next_episode': int}}, got {state!r}") from None
        if nxt < 0:
            raise ValueError(f"EpisodeStream.load_state_dict: next_episode must be >= 0, got {nxt}")
        self.start = nxt

    def mark_consumed(self, episodes: int | list[Episode]) -> None:
        """Advance the state by a number of this rank's episodes (or a consumed batch)."""
        n = episodes if isinstance(episodes, int) else len(episodes)
        self.start += int(n) * self.world_size

    # -- iteration -------------------------------------------------------------------------
    def episode_numbers(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[int]:
        """Global episode numbers this rank's worker ``worker_id`` produces, in order."""
        start = self.start  # fixed for this pass, even while the state advances
        for r in itertools.count():
            if (r // self.batch_size) % num_workers != worker_id:
                continue
            k = start + r * self.world_size + self.rank
            if self.stop is not None and k >= self.stop:
                return
            yield k

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an endless EpisodeStream has no length; pass stop=")
        span = self.stop - self.start - self.rank
        return max(0, -(-span // self.world_size))

    def _source(self, spec: Any):
        if self.provider is not None:
            return self.provider.get(spec.dataset_id, spec.task_name)  # the stream's split
        return self.sampler.source_for(spec.dataset_id, spec.task_name)

    def episode(self, episode_number: int) -> Episode:
        """Sample and materialize one episode."""
        spec = self.sampler.sample(episode_number)
        episode = spec.materialize(self._source(spec), transform=self.transform)
        episode.info["episode"] = int(episode_number)
        return episode

    def __iter__(self) -> Iterator[Episode]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for k in self.episode_numbers(worker_id, num_workers):
            yield self.episode(k)

    def loader(self, num_workers: int = 0, **dataloader_kwargs: Any) -> "EpisodeLoader":
        """A DataLoader over this stream that yields lists of episodes and keeps the state."""
        return EpisodeLoader(self, num_workers=num_workers, **dataloader_kwargs)


class EpisodeLoader:
    """Iterates a DataLoader over an :class:`EpisodeStream` and advances the stream's state
    after every batch handed out, so ``stream.state_dict()`` is always resumable."""

    def __init__(self, stream: EpisodeStream, num_workers: int = 0, **dataloader_kwargs: Any) -> None:
        for key in ("batch_size", "collate_fn", "shuffle", "sampler", "batch_sampler"):
            if key in dataloader_kwargs:
                raise ValueError(f"EpisodeLoader: {key} is set by the stream (batch_size=stream.batch_size)")
        self.stream = stream
        self.num_workers = int(num_workers)
        self.dataloader_kwargs = dataloader_kwargs

    def __iter__(self) -> Iterator[list[Episode]]:
        loader = DataLoader(
            self.stream,
            batch_size=self.stream.batch_size,
            collate_fn=collate_episodes,
            num_workers=self.num_workers,
            **self.dataloader_kwargs,
        )
        for batch in loader:
            self.stream.mark_consumed(batch)
            yield batch

    def __len__(self) -> int:
        return -(-len(self.stream) // self.stream.batch_size)

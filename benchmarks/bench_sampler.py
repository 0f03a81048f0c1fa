"""Episodes per second of the streaming multi-domain sampler: DataLoader workers 0 vs 2, and one
batched read per episode vs reading item by item.

    python benchmarks/bench_sampler.py --quick
    python benchmarks/bench_sampler.py --data synthetic --episodes 400
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medmeta.episodes import EpisodeStream, MultiDomainSampler
from medmeta.tasks import Episode


class PerItemStream(EpisodeStream):
    """The obvious alternative: read each image with ``source[i]`` and stack them."""

    def episode(self, episode_number: int) -> Episode:
        spec = self.sampler.sample(episode_number)
        source = self._source(spec)
        images = torch.stack([source[int(p)][0] for p in spec.positions])
        n = spec.n_support
        episode = spec.materialize(source)  # labels and metadata; images replaced below
        episode.support_images, episode.query_images = images[:n], images[n:]
        return episode


def _memory_data(image_size: int):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_protocol_cache import memory_sources

    sources = memory_sources(image_size, per_class=60)
    return {(d, t, "train"): s for (d, t), s in sources.items()}


def run(stream_cls, sampler, data, episodes: int, workers: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, steady-state episodes per second after it)."""
    stream = stream_cls(sampler, sources=data, stop=episodes, batch_size=batch_size)
    t0 = time.perf_counter()
    first, count, t1 = None, 0, t0
    for batch in stream.loader(num_workers=workers):
        if first is None:
            first, t1 = time.perf_counter() - t0, time.perf_counter()
        else:
            count += len(batch)
    seconds = time.perf_counter() - t1
    assert count == episodes - batch_size, (count, episodes)
    return first, count / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", choices=("memory", "synthetic"), default="memory")
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    episodes = args.episodes or (48 if args.quick else 400)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "synthetic":
            from medmeta.data import MetaDataset
            from medmeta.recipes import build_synthetic_meta_dataset

            data = MetaDataset(build_synthetic_meta_dataset(Path(tmp) / "data", seed=0, image_size=args.image_size))
        else:
            data = _memory_data(args.image_size)
        sampler = MultiDomainSampler(data, split="train", shot_range=(1, 10), n_query=10, seed=0, on_insufficient="skip")
        rows = []
        for name, cls, workers in (
            ("one read per episode", EpisodeStream, 0),
            ("one read per episode", EpisodeStream, 2),
            ("read item by item", PerItemStream, 0),
        ):
            rows.append((name, workers, *run(cls, sampler, data, episodes, workers, args.batch_size)))
    base = rows[0][3]
    print(f"# streaming sampler: {args.data} data, {len(sampler.tasks)} tasks, {args.image_size}px, variable way, "
          f"1-10 shots, 10 query, {episodes} episodes, batches of {args.batch_size}; {torch.get_num_threads()} torch threads")
    print("| reading | workers | first batch (s) | episodes/s after it | vs one read, 0 workers |")
    print("|---|---|---|---|---|")
    for name, workers, first, rate in rows:
        print(f"| {name} | {workers} | {first:.2f} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()

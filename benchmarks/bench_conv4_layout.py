"""Conv-4 on the CPU in the channels-last memory format (medmeta's default) against NCHW.

PyTorch's CPU max-pooling is much slower on NCHW tensors than on channels-last ones, and Conv-4
pools after every block, so ``medmeta.backbones.conv4.Conv4`` converts its input to channels-last
on the CPU (``channels_last_on_cpu=True``). This script times one training step (forward and
backward) and one no-grad forward of the same weights both ways, in alternating blocks in one
process (process CPU time, ``--threads`` torch threads, default 1), and prints the median per-block
ratio and the largest feature difference between the two layouts.

    python benchmarks/bench_conv4_layout.py --quick
    python benchmarks/bench_conv4_layout.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from medmeta.backbones.conv4 import Conv4

CONFIGS = [  # (image size, width, batch): the MAML benchmark's query pass, and Conv-4-64 at 84 px
    (28, 32, 75),
    (84, 64, 75),
]


def seconds(model: Conv4, x: torch.Tensor, train: bool, repeats: int) -> float:
    t0 = time.process_time()
    for _ in range(repeats):
        if train:
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return (time.process_time() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="28 px only, 3 blocks")
    p.add_argument("--blocks", type=int, default=None, help="alternating blocks (default 7, quick 3)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    blocks = args.blocks or (3 if args.quick else 7)
    print(f"# Conv-4 on cpu ({args.threads} thread(s), process CPU time): channels-last (medmeta) vs NCHW, same "
          f"weights; median of {blocks} alternating blocks")
    print("| image px | width | batch | pass | NCHW ms | channels-last ms | speed-up | max feature difference |")
    print("|---|---|---|---|---|---|---|---|")
    for size, width, batch in CONFIGS[:1] if args.quick else CONFIGS:
        torch.manual_seed(0)
        fast = Conv4(in_chans=3, num_classes=0, width=width)
        plain = Conv4(in_chans=3, num_classes=0, width=width, channels_last_on_cpu=False)
        plain.load_state_dict(fast.state_dict())
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            diff = float((fast(x) - plain(x)).abs().max())
        repeats = 5 if size <= 32 else 1
        for train in (True, False):
            for model in (plain, fast):  # warm-up
                seconds(model, x, train, 1)
            times: dict[str, list[float]] = {"plain": [], "fast": []}
            for b in range(blocks):
                order = [("plain", plain), ("fast", fast)]
                for name, model in order if b % 2 == 0 else order[::-1]:
                    times[name].append(seconds(model, x, train, repeats))
            ratio = statistics.median(a / f for a, f in zip(times["plain"], times["fast"]))
            print(f"| {size} | {width} | {batch} | {'forward + backward' if train else 'no-grad forward'} | "
                  f"{statistics.median(times['plain']) * 1e3:.1f} | {statistics.median(times['fast']) * 1e3:.1f} | "
                  f"{ratio:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

"""Run the training app on the tiny stand-in meta-dataset and record every all-reduced gradient.

    python ddp_worker.py OUT.pt RUN_DIR [overrides...]                        # one process
    torchrun --standalone --nproc_per_node=2 ddp_worker.py OUT.pt RUN_DIR ... # two ranks

Rank 0 saves ``{"grads": [flat gradient after all-reduce, per step], "model": final state}``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)


def run(out: str, run_dir: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from tiny_meta import TinyMetaDataset

    import medmeta.config  # noqa: F401
    import medmeta.training.loop as loop
    import medmeta.training.run as run_module

    conf = Path(__file__).resolve().parents[2] / "conf"
    recorded: list[torch.Tensor] = []
    original = loop.all_reduce_gradients

    def recording(params, ctx, average=False):
        params = list(params)
        original(params, ctx, average)
        recorded.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).cpu()
                                   for p in params]))

    original_open = run_module.open_meta_dataset
    loop.all_reduce_gradients = recording
    run_module.open_meta_dataset = lambda cfg, *args: TinyMetaDataset()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("train", overrides=[f"run_dir={run_dir}", *overrides])
            run_module.run_training(cfg)
    finally:
        loop.all_reduce_gradients = original
        run_module.open_meta_dataset = original_open
    if int(os.environ.get("RANK", "0")) == 0:
        state = torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)
        torch.save({"grads": recorded, "model": state["model"], "world_size": state["world_size"]}, out)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3:])

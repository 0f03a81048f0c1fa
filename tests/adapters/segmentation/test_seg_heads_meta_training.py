"""Segmentation meta-learning: the U-Net's inner loop against hand-written SGD steps, and
``meta_train`` through the one training loop (checkpoints, exact resume, metrics.csv)."""
from __future__ import annotations

import copy
import csv

import pytest
import torch
import torch.nn.functional as F
from seg_heads_fixtures import IdentityBackbone

from medmeta.adapters.segmentation.heads import UNetSegmenter, check_support_set, meta_train
from medmeta.backbones import create_backbone
from medmeta.errors import ConfigError
from medmeta.training.checkpoint import load_checkpoint

LR = 0.5


def _images_and_masks(n: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and 3-class label masks (0, 1, 2) in which every class has a pixel."""
    img = torch.rand(n, 1, size, size)
    mask = (img[:, 0] > 0.55).long()
    mask[:, : size // 4] = 2
    mask[:, -1, 0], mask[:, -1, 1] = 0, 1
    return img, mask


def _tiny_unet(meta_algorithm: str, inner_steps: int) -> UNetSegmenter:
    torch.manual_seed(0)
    seg = UNetSegmenter(
        IdentityBackbone(1), decoder_channels=4, embed_dim=3, meta_algorithm=meta_algorithm,
        inner_steps=inner_steps, inner_lr=LR, class_balanced=False, dice_weight=0.0, head_init="prototype",
    )
    with torch.no_grad():  # larger weights: steps of order 1e-2, far above the 1e-6 tolerance
        for p in seg.decoder.parameters():
            p.mul_(3.0)
    return seg


def _reference_adaptation(seg: UNetSegmenter, img: torch.Tensor, mask: torch.Tensor, steps: int, head_only: bool):
    """First-order inner SGD written out: a copy of the decoder called as a module, the
    prototype head by hand, cross-entropy, ``torch.autograd.grad`` and in-place updates."""
    decoder = copy.deepcopy(seg.decoder)
    names = [n for n, _ in decoder.named_parameters()]
    params = [p for _, p in decoder.named_parameters()]
    onehot = F.one_hot(mask, 3).permute(0, 3, 1, 2).float()  # (S, 3, H, W)
    with torch.no_grad():
        emb = decoder([img], img)
        proto = torch.einsum("sehw,skhw->ke", emb, onehot) / onehot.sum(dim=(0, 2, 3))[:, None]
        weight, bias = 2 * proto, -(proto**2).sum(1)
    for _ in range(steps):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        emb = decoder([img], img)
        logits = torch.einsum("behw,ke->bkhw", emb, w) + b.view(1, -1, 1, 1)
        loss = F.cross_entropy(logits, mask)
        grads = torch.autograd.grad(loss, params + [w, b])
        with torch.no_grad():
            if not head_only:
                for p, g in zip(params, grads[: len(params)]):
                    p -= LR * g
            weight, bias = weight - LR * grads[-2], bias - LR * grads[-1]
    return {n: p.detach() for n, p in zip(names, params)}, {"weight": weight, "bias": bias}


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("algorithm", ["fomaml", "anil"])
def test_unet_inner_loop_equals_hand_written_sgd(algorithm, steps):
    torch.manual_seed(1)
    img, mask = _images_and_masks(2)
    seg = _tiny_unet(algorithm, steps)
    expected_params, expected_head = _reference_adaptation(seg, img, mask, steps, head_only=algorithm == "anil")
    start = {k: v.detach().clone() for k, v in seg.decoder_params().items()}
    params, head = seg.inner_loop(seg.features(img, seg.levels), check_support_set(img, mask, 2), seg.decoder_params())
    assert set(params) == set(expected_params)
    moved = 0.0
    for name, value in params.items():
        torch.testing.assert_close(value, expected_params[name], rtol=0, atol=1e-6)
        moved = max(moved, float((value.detach() - start[name]).abs().max()))
    for name in ("weight", "bias"):
        torch.testing.assert_close(head[name], expected_head[name], rtol=0, atol=1e-6)
    # the comparison means something: FOMAML moves the decoder, ANIL leaves it
    assert (moved > 1e-3) if algorithm == "fomaml" else moved == 0.0


# -- meta_train through TrainingLoop ---------------------------------------------------------------
def _segmenter(seed: int) -> UNetSegmenter:
    torch.manual_seed(seed)
    seg = UNetSegmenter(create_backbone("medmeta_conv4_tiny", out_indices=(0, 1)), inner_steps=1,
                        decoder_channels=4, embed_dim=4, head_init="zero")
    return seg.eval()  # meta_train leaves the mode as it found it


def _random_batch() -> list[tuple]:
    """Two episodes drawn from torch's global RNG (what a checkpoint restores)."""
    out = []
    for _ in range(2):
        s_img, s_mask = _images_and_masks(2, 16)
        q_img, q_mask = _images_and_masks(2, 16)
        out.append((s_img, s_mask, q_img, q_mask, 2))
    return out


def _source(kind: str):
    if kind == "callable":
        return _random_batch
    torch.manual_seed(123)
    batches = [_random_batch() for _ in range(6)]
    return batches  # a list: iterated afresh on resume, with the used batches skipped


def _metric_rows(path) -> list[tuple[int, str]]:
    with open(path, newline="") as handle:
        return [(int(r["step"]), r["name"]) for r in csv.DictReader(handle)]


@pytest.mark.parametrize("kind", ["callable", "iterable"])
def test_meta_train_resumed_run_equals_uninterrupted_run(kind, tmp_path):
    torch.manual_seed(7)
    full = _segmenter(0)
    full_history = meta_train(full, _source(kind), steps=6, lr=1e-2, run_dir=tmp_path / "full", checkpoint_every=3)

    torch.manual_seed(7)
    first = _segmenter(0)
    meta_train(first, _source(kind), steps=3, lr=1e-2, run_dir=tmp_path / "cut", checkpoint_every=3)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 3
    # "a new process": another RNG state and other initial weights; the checkpoint restores both
    torch.manual_seed(99)
    resumed = _segmenter(5)
    history = meta_train(resumed, _source(kind), steps=6, lr=1e-2, run_dir=tmp_path / "cut", resume=True,
                         checkpoint_every=3)

    assert len(full_history) == 6 and history == full_history
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    rows = _metric_rows(tmp_path / "cut" / "metrics.csv")
    assert [s for s, name in rows if name == "train/loss"] == [1, 2, 3, 4, 5, 6]
    assert not full.training and not resumed.training


def test_meta_train_validates_and_keeps_the_best_checkpoint(tmp_path):
    torch.manual_seed(3)
    val = [_random_batch()]
    seg = _segmenter(0)
    before = {k: v.clone() for k, v in seg.backbone.state_dict().items()}
    meta_train(seg, _random_batch, steps=4, lr=1e-2, run_dir=tmp_path, val_batches=val, val_every=2)
    rows = _metric_rows(tmp_path / "metrics.csv")
    assert [s for s, name in rows if name == "val/loss"] == [2, 4]
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] in (2, 4)
    assert all(torch.equal(v, seg.backbone.state_dict()[k]) for k, v in before.items())


def test_meta_train_refuses_what_it_cannot_do(tmp_path):
    seg = _segmenter(0)
    with pytest.raises(ConfigError, match="last.pt does not exist"):
        meta_train(seg, _random_batch, steps=1, run_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match="has no meta_loss"):
        meta_train(torch.nn.Linear(2, 2), _random_batch, steps=1)
    with pytest.raises(ConfigError, match="must be parameters of the learner"):
        meta_train(seg, _random_batch, steps=1, parameters=[torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="ran out after 1 meta-batches"):
        meta_train(seg, [_random_batch()], steps=2)

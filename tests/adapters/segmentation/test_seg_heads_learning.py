"""Learning tests on a real image: few-shot heads against trivial baselines (fixed seed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from seg_heads_fixtures import dice, nuclei_episode

from medmeta.adapters.segmentation.heads import create_segmenter
from medmeta.backbones import create_backbone


def _baselines(s_img, s_mask, q_img, q_mask) -> dict[str, float]:
    """All-background, all-foreground and a support-fitted intensity threshold."""
    grid = np.linspace(0, 1, 101)
    t = max(grid, key=lambda v: dice(s_img[:, 0] > v, s_mask))
    return {
        "all_background": dice(torch.zeros_like(q_mask), q_mask),
        "all_foreground": dice(torch.ones_like(q_mask), q_mask),
        "threshold": dice(q_img[:, 0] > t, q_mask),
    }


@pytest.fixture(scope="module")
def episode():
    return nuclei_episode()


def _backbone():
    torch.manual_seed(0)
    return create_backbone("medmeta_conv4_tiny", out_indices=(0, 1))


def test_prototype_and_linear_heads_beat_trivial_baselines(episode):
    s_img, s_mask, q_img, q_mask = episode
    base = _baselines(*episode)
    trivial = max(base["all_background"], base["all_foreground"])
    scores = {}
    for name, kw in [("prototype", {}), ("prototype", {"local_prototypes": True}), ("linear", {"steps": 100})]:
        seg = create_segmenter(name, _backbone(), **kw)
        logits = seg.adapt(s_img, s_mask, 1)(q_img)
        assert logits.shape == (len(q_img), 2, *q_img.shape[-2:])
        scores[f"{name}{kw}"] = dice(logits.argmax(1), q_mask)
    print("baselines", base, "heads", scores)
    for key, value in scores.items():
        assert value > trivial + 0.25, (key, value, base)
        assert value > 0.65, (key, value)


def test_decoder_fine_tuning_beats_its_initial_state_and_trivial_baselines(episode):
    s_img, s_mask, q_img, q_mask = episode
    base = _baselines(*episode)
    trivial = max(base["all_background"], base["all_foreground"])
    kw = dict(head_init="zero", finetune_lr=3e-3, decoder_channels=16, embed_dim=8)
    torch.manual_seed(0)
    initial = create_segmenter("unet", _backbone(), finetune_steps=0, **kw)
    state = {k: v.clone() for k, v in initial.state_dict().items()}
    d0 = dice(initial.adapt(s_img, s_mask, 1)(q_img).argmax(1), q_mask)
    tuned = create_segmenter("unet", _backbone(), finetune_steps=40, **kw)
    tuned.load_state_dict(state)
    d1 = dice(tuned.adapt(s_img, s_mask, 1)(q_img).argmax(1), q_mask)
    print("baselines", base, "decoder initial", d0, "fine-tuned", d1)
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in state.items())  # adapt works on copies
    assert d1 > d0 + 0.3
    assert d1 > trivial + 0.25

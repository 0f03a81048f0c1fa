"""Conv-4, the classic few-shot backbone (Vinyals et al. 2016; Snell et al. 2017), in timm.

Four blocks of 3x3 conv, BatchNorm, ReLU and 2x2 max-pooling. Registered with timm's model
registry as ``medmeta_conv4`` (64 channels) and ``medmeta_conv4_tiny`` (16 channels, for tests),
so it is created like any other timm model and exposes ``feature_info`` and
``forward_intermediates`` for dense features.

On the CPU the blocks run in the channels-last memory format (``channels_last_on_cpu=True``):
PyTorch's CPU max-pooling is about ten times faster on channels-last tensors than on NCHW ones,
and oneDNN convolutions and BatchNorm take them natively, so a training step (forward and
backward) runs 1.5-1.8x faster at 28 and 84 px, inference 2-3x, first-order MAML and ANIL
meta-training about 1.8x (``benchmarks/bench_conv4_layout.py``). Its double-backward kernels are
slower, so second-order MAML with two or more inner steps meta-trains in NCHW
(:func:`medmeta.modes.cpu_channels_last`). ``channels_last_on_cpu=False``
(``backbone.timm_kwargs={channels_last_on_cpu: false}``) turns the switch off. Features differ
from the NCHW path only by float32 rounding (about 1e-5). ``forward_features`` returns its map in
channels-last (a ``.contiguous()`` there would send NCHW gradients back into the channels-last
graph); ``forward_intermediates`` returns contiguous maps for the dense heads. On CUDA, and inside
``torch.func`` transforms (MAML with ``vmap``), the input layout is kept as given.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from timm.models import register_model
from torch import Tensor, nn

from medmeta.modes import cpu_channels_last_enabled, in_functorch_transform

__all__ = ["Conv4"]


class Conv4(nn.Module):
    """Four conv-BN-ReLU-maxpool blocks with global average pooling and an optional classifier."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        width: int = 64,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        channels_last_on_cpu: bool = True,
        **_: Any,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.channels_last_on_cpu = channels_last_on_cpu
        self.num_features = width
        self.drop_rate = drop_rate
        blocks = []
        chans = in_chans
        for _i in range(4):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(chans, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2, ceil_mode=True),
                )
            )
            chans = width
        self.blocks = nn.Sequential(*blocks)
        self.feature_info = [
            {"num_chs": width, "reduction": 2 ** (i + 1), "module": f"blocks.{i}"} for i in range(4)
        ]
        self.global_pool = global_pool
        self.fc: nn.Module = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _layout(self, x: Tensor) -> Tensor:
        """The input in the layout the blocks run fastest in (module doc)."""
        if (
            self.channels_last_on_cpu and x.device.type == "cpu" and x.dim() == 4 and cpu_channels_last_enabled()
            and not in_functorch_transform()
        ):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self._layout(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3)) if self.global_pool == "avg" else x.amax(dim=(2, 3))
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's dense-feature API: the outputs of the blocks named by ``indices``."""
        if indices is None:
            take = list(range(4))
        elif isinstance(indices, int):
            take = list(range(4 - indices, 4))
        else:
            take = [i % 4 for i in indices]
        intermediates = []
        x = self._layout(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in take:
                intermediates.append(x.contiguous())
            if stop_early and i >= max(take):
                break
        if intermediates_only:
            return intermediates
        return x.contiguous(), intermediates

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _create(width: int, pretrained: bool, **kwargs: Any) -> Conv4:
    if pretrained:
        raise ValueError("medmeta_conv4 has no pretrained weights; pass a local weights file instead")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return Conv4(width=width, **kwargs)


@register_model
def medmeta_conv4(pretrained: bool = False, **kwargs: Any) -> Conv4:
    """Conv-4 with 64 channels per block."""
    return _create(64, pretrained, **kwargs)


@register_model
def medmeta_conv4_tiny(pretrained: bool = False, **kwargs: Any) -> Conv4:
    """Conv-4 with 16 channels per block: fast enough for unit tests on a laptop CPU."""
    return _create(16, pretrained, **kwargs)

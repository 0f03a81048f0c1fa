"""Cell detectors: torchvision Faster R-CNN or RetinaNet with a feature pyramid over a medmeta backbone.

The backbone is any timm model through :func:`medmeta.backbones.create_backbone` (its
``dense_features`` at ``out_indices``), topped by torchvision's ``FeaturePyramidNetwork``; the
detection heads are torchvision's (Ren et al. 2015, Faster R-CNN; Lin et al. 2017, RetinaNet and
FPN). Nothing is downloaded: backbone weights come only from a local file (``pretrained``), and a
whole detector is saved and loaded with :func:`save_detector` / :func:`load_detector`
(read through :func:`medmeta.io.load_torch_file`, ``weights_only=True``; the configuration is
stored as plain values).

Slide tiles are fed at their native scale: torchvision's transform normally resizes every image to
``min_size``; here it only normalises and pads (:class:`NativeScaleTransform`), because cell size
in pixels is what the anchors are tuned to and what the challenge boxes are measured in.

Training (:func:`train_detector`) takes any dataset of ``(image, target)`` pairs in torchvision's
detection convention and runs through the one :class:`~medmeta.training.loop.TrainingLoop` (with a
run folder it logs ``metrics.csv`` and resumes from its checkpoints); few-shot adaptation
(:func:`adapt_classification_head`) fine-tunes only the classification head of a trained detector
from K annotated cells, keeping the backbone, the feature pyramid, the region proposals and the
box regression fixed.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from medmeta.backbones import Backbone, create_backbone
from medmeta.errors import CheckpointError
from medmeta.io import atomic_path, load_torch_file

__all__ = [
    "DetectorConfig",
    "TimmFPNBackbone",
    "NativeScaleTransform",
    "build_detector",
    "save_detector",
    "load_detector",
    "detection_collate",
    "train_detector",
    "classification_head_parameters",
    "adapt_classification_head",
    "reset_classification_head",
    "predict_images",
]

ARCHITECTURES = ("fasterrcnn", "retinanet")
_CLASSIFICATION_LOSSES = {"fasterrcnn": ("loss_classifier",), "retinanet": ("classification",)}


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector (stored in checkpoints as plain values).

    ``num_classes`` counts foreground classes (1 for the challenge's ``pos``); labels are
    ``1..num_classes`` and 0 is background. ``anchor_sizes`` gives one base size per pyramid
    level in pixels of the tiles (default: 4x each level's stride); ``extra_pool_level`` adds a
    max-pooled level above the deepest one (for large objects).
    """

    arch: str = "fasterrcnn"
    backbone: str = "medmeta_conv4_tiny"
    out_indices: tuple[int, ...] = (1, 2, 3)
    fpn_channels: int = 64
    anchor_sizes: Optional[tuple[float, ...]] = None
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    extra_pool_level: bool = False
    num_classes: int = 1
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 200
    box_head_dim: int = 256
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 500
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"DetectorConfig.arch: expected one of {ARCHITECTURES}, got {self.arch!r}")
        if self.num_classes < 1:
            raise ValueError(f"DetectorConfig.num_classes: at least 1 foreground class, got {self.num_classes}")
        self.out_indices = tuple(int(i) for i in self.out_indices)
        self.aspect_ratios = tuple(float(a) for a in self.aspect_ratios)
        self.image_mean = tuple(float(v) for v in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in self.image_std)  # type: ignore[assignment]
        if self.anchor_sizes is not None:
            self.anchor_sizes = tuple(float(s) for s in self.anchor_sizes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"detector config: unknown field(s) {unknown}")
        return cls(**d)


class TimmFPNBackbone(nn.Module):
    """A medmeta (timm) backbone's dense features through a feature pyramid network.

    Plays the role of torchvision's ``BackboneWithFPN``: ``forward(images)`` returns an ordered
    dict of pyramid maps (keys ``"0"``, ``"1"``, ..., and ``"pool"`` with ``extra_pool_level``),
    each with ``out_channels`` channels; ``strides`` lists their strides.
    """

    def __init__(self, body: Backbone, out_channels: int = 64, extra_pool_level: bool = False) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.feature_channels), out_channels, extra_blocks=LastLevelMaxPool() if extra_pool_level else None
        )
        self.out_channels = out_channels
        self.strides = list(body.feature_reductions) + ([body.feature_reductions[-1] * 2] if extra_pool_level else [])
        self.names = [str(i) for i in range(len(body.feature_channels))] + (["pool"] if extra_pool_level else [])

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body.dense_features(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class NativeScaleTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without the resize: normalise and pad to a multiple of 32."""

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float], size_divisible: int = 32) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=list(image_mean), image_std=list(image_std),
                         size_divisible=size_divisible)

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):  # type: ignore[override]
        return image, target

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(mean={self.image_mean}, std={self.image_std}, no resize)"


def build_detector(config: Optional[DetectorConfig] = None, pretrained: Optional[str] = None, **overrides: Any) -> nn.Module:
    """Build a torchvision detector over a medmeta backbone; ``pretrained``: local backbone weights.

    Keyword ``overrides`` set :class:`DetectorConfig` fields. The returned model carries its
    configuration as ``model.detector_config``.
    """
    cfg = config if config is not None else DetectorConfig()
    if overrides:
        cfg = DetectorConfig.from_dict({**cfg.to_dict(), **overrides})
    body = create_backbone(cfg.backbone, pretrained=pretrained, out_indices=cfg.out_indices, **cfg.timm_kwargs)
    backbone = TimmFPNBackbone(body, cfg.fpn_channels, cfg.extra_pool_level)
    n_levels = len(backbone.strides)
    sizes = cfg.anchor_sizes if cfg.anchor_sizes is not None else tuple(4.0 * s for s in backbone.strides)
    if len(sizes) != n_levels:
        raise ValueError(
            f"DetectorConfig.anchor_sizes: {len(sizes)} sizes for {n_levels} pyramid levels "
            f"(strides {backbone.strides}); give one size per level"
        )
    n_cls = cfg.num_classes + 1
    if cfg.arch == "fasterrcnn":
        anchors = AnchorGenerator(sizes=tuple((float(s),) for s in sizes), aspect_ratios=(cfg.aspect_ratios,) * n_levels)
        roi_pool = MultiScaleRoIAlign(featmap_names=[n for n in backbone.names if n != "pool"], output_size=7, sampling_ratio=2)
        model: nn.Module = FasterRCNN(
            backbone,
            rpn_anchor_generator=anchors,
            box_roi_pool=roi_pool,
            box_head=TwoMLPHead(cfg.fpn_channels * 49, cfg.box_head_dim),
            box_predictor=FastRCNNPredictor(cfg.box_head_dim, n_cls),
            box_score_thresh=cfg.score_thresh,
            box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_img,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_pre_nms_top_n_train=1000,
            rpn_post_nms_top_n_train=500,
            box_batch_size_per_image=128,
            rpn_batch_size_per_image=128,
        )
    else:
        octave = tuple(tuple(float(s) * 2 ** (k / 3) for k in range(3)) for s in sizes)
        anchors = AnchorGenerator(sizes=octave, aspect_ratios=(cfg.aspect_ratios,) * n_levels)
        head = RetinaNetHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0], n_cls)
        model = RetinaNet(
            backbone,
            n_cls,
            anchor_generator=anchors,
            head=head,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
        )
    model.transform = NativeScaleTransform(cfg.image_mean, cfg.image_std)
    model.detector_config = cfg  # type: ignore[assignment]
    return model


def _config_of(model: nn.Module) -> DetectorConfig:
    cfg = getattr(model, "detector_config", None)
    if not isinstance(cfg, DetectorConfig):
        raise ValueError("model: not built by medmeta's build_detector (no detector_config attribute)")
    return cfg


def save_detector(path: "str | Path", model: nn.Module, extra: Optional[dict[str, Any]] = None) -> Path:
    """Save ``{"config", "state_dict", "extra"}`` atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "medmeta.detector/1",
        "config": _config_of(model).to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_detector(path: "str | Path", map_location: "str | torch.device" = "cpu") -> nn.Module:
    """Rebuild a detector saved by :func:`save_detector` (safe load, no pickled code)."""
    path = Path(path)
    payload = load_torch_file(path, "detector checkpoint", map_location=map_location, error=CheckpointError)
    if not isinstance(payload, dict) or payload.get("format") != "medmeta.detector/1":
        raise CheckpointError(f"detector checkpoint {path}: not a medmeta detector checkpoint (missing format tag)")
    model = build_detector(DetectorConfig.from_dict(payload["config"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"detector checkpoint {path}: weights do not fit its configuration ({err})") from err
    return model.to(map_location)


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Keep images and targets as lists (they differ in box counts), as torchvision expects."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _set_batchnorm_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_detector(
    model: nn.Module,
    dataset: Dataset,
    iterations: int = 1000,
    batch_size: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    parameters: Optional[Iterable[nn.Parameter]] = None,
    loss_keys: Optional[Sequence[str]] = None,
    freeze_batchnorm: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    grad_clip: float = 10.0,
    log_every: int = 50,
    log: Optional[Callable[[str], None]] = print,
    warmup: int = 50,
    run_dir: "str | Path | None" = None,
    resume: Optional[bool] = None,
    checkpoint_every: Optional[int] = None,
) -> list[dict[str, float]]:
    """Train with AdamW for ``iterations`` steps over shuffled ``dataset`` batches.

    ``dataset`` yields ``(image (3,H,W) float in [0,1], {"boxes": (k,4) xyxy float, "labels":
    (k,) int64})``; images without boxes are negatives. ``parameters`` restricts what is
    trained (the others are frozen for the run, then restored), ``loss_keys`` which of
    torchvision's losses are summed (default: all). Returns the per-step losses. Runs on the
    model's device; ``log`` receives a line with the mean loss every ``log_every`` steps.

    Training runs through :class:`~medmeta.training.loop.TrainingLoop`
    (:func:`~medmeta.training.fit.fit`): with ``run_dir`` it writes
    ``checkpoints/last.pt`` every ``checkpoint_every`` steps (default 100) and ``metrics.csv``,
    and ``resume`` (None: when ``last.pt`` exists) continues an interrupted run exactly, returning
    the losses of every step. Without ``run_dir`` nothing is kept.
    """
    from medmeta.adapters.slides.training import BatchObjective
    from medmeta.training.fit import LoopSettings, fit

    if iterations < 1:
        raise ValueError(f"train_detector: iterations must be >= 1, got {iterations}")
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("train_detector: the dataset is empty (no patches were sampled)")
    device = _model_device(model)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("train_detector: no trainable parameters")
    keys = None if loss_keys is None else list(loss_keys)

    def loss_fn(batch: tuple[list[Tensor], list[dict[str, Tensor]]]) -> tuple[Tensor, dict[str, float]]:
        images = [im.to(device) for im in batch[0]]
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch[1]]
        losses = model(images, targets)
        summed = list(losses) if keys is None else keys
        missing = [k for k in summed if k not in losses]
        if missing:
            raise ValueError(f"train_detector: loss_keys {missing} not among the model's losses {sorted(losses)}")
        loss = losses[summed[0]]
        for k in summed[1:]:
            loss = loss + losses[k]
        return loss, {k: float(v.detach()) for k, v in losses.items()}

    def report(metrics: Mapping[str, float], step: int) -> None:
        if log is not None and log_every and "train/loss" in metrics:
            log(f"[train_detector] step {step}/{iterations} loss {metrics['train/loss']:.4f} "
                f"({time.perf_counter() - start:.1f} s)")

    objective = BatchObjective(
        dataset, loss_fn, batch_size, seed=seed, drop_last=size > batch_size, collate_fn=detection_collate,
        num_workers=num_workers, on_start=(lambda: _set_batchnorm_eval(model)) if freeze_batchnorm else None,
    )
    settings = {**objective.settings(), "trainer": "train_detector", "iterations": int(iterations),
                "lr": float(lr), "weight_decay": float(weight_decay), "warmup": int(warmup),
                "grad_clip": float(grad_clip or 0.0), "loss_keys": keys, "freeze_batchnorm": bool(freeze_batchnorm),
                "trained_parameters": [list(p.shape) for p in params]}
    trained = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():  # the loop trains (and clips) every parameter that requires grad
        p.requires_grad_(id(p) in trained)
    start = time.perf_counter()
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / iterations, 1.0)))
        )
        loop = LoopSettings.for_steps(
            iterations, checkpoint_every=checkpoint_every or (100 if run_dir is not None else None),
            log_every=log_every or iterations, grad_clip=grad_clip,
        )
        fit(model, objective, opt, loop, fingerprint=settings, device=device, scheduler=sched, run_dir=run_dir,
            resume=resume, report=report)
    finally:
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)
    model.eval()
    return objective.step_records()


def classification_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the classification head: Faster R-CNN's ``cls_score``, RetinaNet's classification head."""
    cfg = _config_of(model)
    name = "roi_heads.box_predictor.cls_score" if cfg.arch == "fasterrcnn" else "head.classification_head"
    return list(model.get_submodule(name).parameters())


@torch.no_grad()
def reset_classification_head(model: nn.Module, prior_probability: float = 0.01) -> None:
    """Re-initialise the final classification layer (for a new cell type), as torchvision initialises it.

    Faster R-CNN's ``cls_score``: normal(0, 0.01) weights, zero bias; RetinaNet's ``cls_logits``:
    normal(0, 0.01) weights and the focal-loss prior bias ``-log((1 - pi) / pi)``.
    """
    cfg = _config_of(model)
    name = "roi_heads.box_predictor.cls_score" if cfg.arch == "fasterrcnn" else "head.classification_head.cls_logits"
    layer = model.get_submodule(name)
    assert isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.bias is not None
    nn.init.normal_(layer.weight, std=0.01)
    if cfg.arch == "fasterrcnn":
        nn.init.zeros_(layer.bias)
    else:
        nn.init.constant_(layer.bias, -math.log((1 - prior_probability) / prior_probability))


def adapt_classification_head(
    model: nn.Module,
    support: Dataset,
    steps: int = 100,
    lr: float = 5e-3,
    batch_size: int = 4,
    reset: bool = False,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> list[dict[str, float]]:
    """Few-shot mode: adapt only the classification head of a trained detector from K annotated cells.

    ``support`` holds patches around the K cells (e.g. :meth:`PatchSampler.few_shot_windows`),
    every annotated cell in a patch being a target. Everything else is frozen, batch-norm
    statistics included, and only the classification loss is used, so the box regression and the
    region proposals learnt on the source data stay as they were. ``reset`` re-initialises the
    final classification layer first (for a new cell type). Returns per-step losses.
    """
    cfg = _config_of(model)
    if reset:
        reset_classification_head(model)
    head = classification_head_parameters(model)
    saved = [(p, p.requires_grad) for p in head]
    for p in head:  # train_detector trains exactly these, freezing the rest for the run
        p.requires_grad_(True)
    try:
        return train_detector(model, support, iterations=steps, batch_size=batch_size, lr=lr, weight_decay=0.0,
                              parameters=head, loss_keys=_CLASSIFICATION_LOSSES[cfg.arch], freeze_batchnorm=True,
                              seed=seed, log=log, log_every=max(steps // 4, 1), warmup=1)
    finally:
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)


@torch.no_grad()
def predict_images(model: nn.Module, images: "Tensor | Sequence[Tensor]") -> list[dict[str, Tensor]]:
    """Detect on a batch: ``images`` uint8 ``(B,H,W,3)`` / ``(B,3,H,W)`` or float ``[0,1]`` ``(B,3,H,W)``.

    Returns torchvision's per-image dicts (``boxes`` xyxy in image pixels, ``scores``, ``labels``).
    """
    device = _model_device(model)
    if isinstance(images, Tensor):
        x = images
        if x.ndim != 4:
            raise ValueError(f"predict_images: expected a batch (B,H,W,3) or (B,3,H,W), got {tuple(x.shape)}")
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.to(device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        batch = list(x)
    else:
        batch = [im.to(device) for im in images]
    model.eval()
    return model(batch)

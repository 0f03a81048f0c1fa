"""One registry style and one lazy-export helper: every kind of named component is a
:class:`medmeta.registry.Registry` behind timm-style ``list_*`` / ``create_*`` functions, and
the top-level ``medmeta`` API reaches them without importing torch on ``import medmeta``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medmeta
from medmeta.errors import ArgumentError, UnknownNameError
from medmeta.registry import Registry, lazy_exports, normalize_name

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_api_builds_a_learner_on_a_backbone():
    from medmeta.backbones import Backbone
    from medmeta.learners import ProtoNet

    torch.manual_seed(0)
    backbone = medmeta.create_backbone("medmeta_conv4_tiny")
    learner = medmeta.create_learner("protonet", backbone)
    assert isinstance(backbone, Backbone) and isinstance(learner, ProtoNet) and learner.backbone is backbone
    assert medmeta.create_learner("Proto-Net".replace("-", ""), backbone).backbone is backbone  # case-insensitive
    features = backbone(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, backbone.num_features)
    for name in ("create_learner", "list_learners", "create_backbone", "list_backbones", "list_pretrained_sources"):
        assert name in medmeta.__all__ and name in dir(medmeta)


def test_import_medmeta_stays_light():
    code = "import sys, medmeta; print(sorted(m for m in ('torch', 'timm', 'h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_list_functions_agree_with_their_registries():
    from medmeta.adapters.segmentation.heads import SEGMENTERS, list_segmenters
    from medmeta.adapters.slides import list_backends, list_mil_heads
    from medmeta.adapters.slides.backends import BACKENDS
    from medmeta.adapters.slides.mil import MIL_HEADS
    from medmeta.backbones import SOURCES, list_backbones, list_pretrained_sources
    from medmeta.learners import LEARNERS

    assert medmeta.list_learners() == LEARNERS.names() == [
        "alpha_tim", "anil", "baseline_pp", "bd_cspn", "feat", "finetune", "fomaml", "laplacianshot", "linear_probe",
        "linear_probe_cv", "maml", "matchingnet", "metasgd", "mm_pt", "pmf", "protomaml", "protonet", "pt_map", "r2d2",
        "relationnet", "reptile", "tim", "transductive_finetune",
    ]
    # one name per learner: the config group file of each is named as the learner
    assert set(medmeta.list_learners()) <= {p.stem for p in (ROOT / "conf" / "learner").glob("*.yaml")}
    assert list_segmenters() == SEGMENTERS.names() == ["linear", "prototype", "unet"]
    assert list_mil_heads() == MIL_HEADS.names() == ["abmil", "clam_sb", "max", "mean"]
    assert list_backends() == BACKENDS.names() == ["cucim", "kfb", "openslide", "pyvips", "tifffile"]
    assert list_pretrained_sources() == SOURCES.names() == ["imagenet-efficientnet-lite0", "imagenet-mobilenetv2"]
    assert medmeta.list_pretrained_sources is list_pretrained_sources
    backbones = list_backbones()
    assert {"medmeta_conv4", "medmeta_conv4_tiny", "resnet18", "mobilenetv2_100"} <= set(backbones)
    assert medmeta.list_backbones("medmeta_conv4*") == ["medmeta_conv4", "medmeta_conv4_tiny"]


def _unknown(kind: str):
    """(a call with an unknown name, the known names the error must list)."""
    if kind == "learner":
        return lambda: medmeta.create_learner("no_such_learner", torch.nn.Identity()), ["maml", "mm_pt", "protonet"]
    if kind == "segmenter":
        from medmeta.adapters.segmentation.heads import create_segmenter

        return lambda: create_segmenter("fcn", torch.nn.Identity()), ["linear", "prototype", "unet"]
    if kind == "MIL head":
        from medmeta.adapters.slides.mil import create_mil_head

        return lambda: create_mil_head("transmil", 8, 2), ["abmil", "clam_sb", "max", "mean"]
    if kind == "slide backend":
        from medmeta.adapters.slides.backends import backend_class

        return lambda: backend_class("bogus"), ["openslide", "tifffile"]
    if kind == "pretrained weight source":
        from medmeta.backbones import get_pretrained_source

        return lambda: get_pretrained_source("imagenet-resnet9000"), ["imagenet-mobilenetv2"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["learner", "segmenter", "MIL head", "slide backend", "pretrained weight source"])
def test_each_registry_refuses_an_unknown_name_and_lists_the_known_ones(kind):
    call, known = _unknown(kind)
    with pytest.raises(UnknownNameError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"unknown {kind} ") and f"known {kind}s: ".lower() in message.lower()
    assert all(repr(name) in message for name in known), message
    # callers that catch the built-in types keep working
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_unknown_backbone_is_refused_with_the_list_to_look_in():
    with pytest.raises(UnknownNameError, match=r"unknown timm model 'resnet9000'.*medmeta.list_backbones\(\)"):
        medmeta.create_backbone("resnet9000")


def test_registry_looks_names_up_normalised_and_shows_them_as_registered():
    reg: Registry = Registry("widget")
    reg.register("Big-Widget", dict)
    assert normalize_name(" Big-Widget ") == "big_widget"
    assert reg.names() == ["Big-Widget"] and "big_widget" in reg and "BIG-WIDGET" in reg and 3 not in reg
    assert reg.get("big_widget") is dict and list(reg) == ["Big-Widget"] and len(reg) == 1
    with pytest.raises(UnknownNameError, match=r"unknown widget 'bigwidget'; did you mean 'Big-Widget'\?"):
        reg.get("bigwidget")
    with pytest.raises(ValueError, match="widget 'big_widget' is already registered"):
        reg.register("big_widget", list)
    reg.register("big_widget", dict)  # the same object again is fine
    copy = reg.copy()
    copy.register("other", list)
    assert reg.names() == ["Big-Widget"] and copy.names() == ["Big-Widget", "other"]

    @reg.register("made")
    def made(x: int, scale: int = 2) -> int:
        return x * scale

    assert reg.create("made", 3) == 6 and reg.create("MADE", 3, scale=3) == 9


def test_create_refuses_arguments_the_factory_does_not_take_but_keeps_its_own_type_errors():
    backbone = medmeta.create_backbone("medmeta_conv4_tiny")
    with pytest.raises(ArgumentError, match=r"learner 'maml': got an unexpected keyword argument 'inner_stpes'"):
        medmeta.create_learner("maml", backbone, inner_stpes=3)
    assert issubclass(ArgumentError, TypeError)
    reg: Registry = Registry("thing")

    def broken(x: int) -> int:
        return x + "1"  # type: ignore[operator]  (a bug inside the factory)

    reg.register("broken", broken)
    with pytest.raises(TypeError) as info:
        reg.create("broken", 1)
    assert not isinstance(info.value, ArgumentError)


def test_lazy_exports_import_on_first_use_and_cache():
    namespace: dict = {}
    getattr_, dir_ = lazy_exports("medmeta", {"normalize_name": "registry"}, namespace)
    assert getattr_("normalize_name") is normalize_name and namespace["normalize_name"] is normalize_name
    assert "normalize_name" in dir_()
    with pytest.raises(AttributeError, match="module 'medmeta' has no attribute 'nope'"):
        getattr_("nope")


def test_adapter_packages_export_lazily():
    code = (
        "import sys, medmeta.adapters.slides as s, medmeta.adapters.segmentation as g, "
        "medmeta.adapters.slides.detection as d; "
        "print(sorted(m for m in ('openslide', 'nibabel', 'torchvision') if m in sys.modules)); "
        "print(s.list_mil_heads(), g.list_segmenters(), d.AnnotationError.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1] == "['abmil', 'clam_sb', 'max', 'mean'] ['linear', 'prototype', 'unet'] AnnotationError"

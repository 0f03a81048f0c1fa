"""Task selection and the default image size live in the meta-dataset (``plan_tasks``,
``MetaDataset(image_size=...)``); the apps only pass the config's selections through."""
from __future__ import annotations

import pytest

from medmeta.data.meta_dataset import MetaDataset, TaskPlan, plan_tasks
from medmeta.errors import ConfigError


def test_target_leaves_out_its_overlaps_and_becomes_the_test_pool(tiny_meta) -> None:
    # alpha and beta overlap; gamma is on its own (tests/training/tiny_meta.py)
    plan = plan_tasks(tiny_meta, target="alpha")
    assert plan == TaskPlan(
        train=[("gamma", "finding")], val=[("gamma", "finding")],
        test=[("alpha", "lesion"), ("alpha", "malignant")], left_out=["alpha", "beta"],
    )
    assert plan.to_dict()["left_out_datasets"] == ["alpha", "beta"]


def test_selections_filter_by_id_domain_task_and_exclude(tiny_meta) -> None:
    plan = plan_tasks(
        tiny_meta,
        train={"domains": ["dermoscopy"], "exclude": ["alpha/malignant"]},
        val={"tasks": ["gamma/finding"]},
        test={"dataset_ids": ["beta", "gamma"], "targets": ["ORDINAL_REGRESSION"]},
    )
    assert plan.train == [("alpha", "lesion"), ("beta", "grade")]
    assert plan.val == [("gamma", "finding")]
    assert plan.test == [("beta", "grade")]


def test_bad_names_are_config_errors_naming_the_option_and_what_exists(tiny_meta) -> None:
    with pytest.raises(ConfigError, match=r"data.target: unknown dataset id 'delta'; the meta-dataset has \['alpha', 'beta', 'gamma'\]"):
        plan_tasks(tiny_meta, target="delta")
    with pytest.raises(ConfigError, match=r"data.val.tasks: dataset 'alpha' has no task 'size'; its tasks are \['lesion', 'malignant'\]"):
        plan_tasks(tiny_meta, val={"tasks": ["alpha/size"]})
    with pytest.raises(ConfigError, match=r"data.test: the selection matches no classification task \(target 'gamma'"):
        plan_tasks(tiny_meta, test={"domains": ["dermoscopy"]}, target="gamma", need=("test",))


def test_meta_dataset_reads_every_task_at_its_image_size(synthetic_data) -> None:
    from medmeta.recipes import open_default

    root = open_default("synthetic").root
    stored = MetaDataset(root)
    entry = stored.tasks[0]
    assert stored.source(entry.dataset_id, entry.task_name)[0][0].shape[-2:] == (32, 32)  # as stored
    meta = MetaDataset(root, image_size=16)
    assert meta.source(entry.dataset_id, entry.task_name)[0][0].shape[-2:] == (16, 16)
    assert meta.source(entry.dataset_id, entry.task_name, image_size=8)[0][0].shape[-2:] == (8, 8)  # per call
    kept = meta.held_out(entry.dataset_id)
    other = kept.tasks[0]
    assert kept.image_size == 16 and kept.source(other.dataset_id, other.task_name)[0][0].shape[-2:] == (16, 16)
    plan = meta.plan_tasks(target=entry.dataset_id)
    assert plan.test and all(d == entry.dataset_id for d, _ in plan.test)

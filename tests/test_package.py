"""The package imports without optional extras and exposes its vocabulary."""
from __future__ import annotations

import subprocess
import sys

import medmeta
from medmeta.tasks import TaskDescription, TaskTarget


def test_core_import_does_not_pull_optional_extras() -> None:
    code = (
        "import sys, medmeta, medmeta.tasks, medmeta.backbones, medmeta.learners.base;"
        "bad = [m for m in ('openslide', 'wandb', 'nibabel', 'tensorboard', 'pycocotools', 'nbclient') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_task_target_parse_names_the_valid_targets() -> None:
    assert TaskTarget.parse("ordinal_regression") is TaskTarget.ORDINAL_REGRESSION
    try:
        TaskTarget.parse("CLASSIFY", where="info.yaml: tasks[0].task_target")
    except ValueError as err:
        assert "info.yaml: tasks[0].task_target" in str(err) and "MULTICLASS_CLASSIFICATION" in str(err)
    else:  # pragma: no cover
        raise AssertionError("no error")


def test_task_description_subset_keeps_raw_keys_in_order() -> None:
    d = TaskDescription("ORDINAL_REGRESSION", ("c1", "c4", "c6", "c8"), "DR: Clarity", "Fundus", label_keys=(1, 4, 6, 8))
    sub = d.subset([1, 3])
    assert sub.classes == ("c4", "c8") and sub.label_keys == (4, 8) and sub.num_outputs == 2
    binary = TaskDescription("BINARY_CLASSIFICATION", ("neg", "pos"), "x: y", "d")
    assert binary.num_outputs == 1
    assert TaskDescription.from_dict(d.to_dict()) == d
    assert medmeta.__version__

"""Every notebook runs top to bottom headless (quick settings) and writes real PNG figures.

Notebooks are Jupytext percent-format ``.py`` files; each test converts one to a notebook,
executes it in a fresh ipykernel with ``MEDMETA_NOTEBOOK_QUICK=1`` (smaller settings, printed
by the notebook) and checks its figures and printed results. A cell that raises fails the test.
"""
from __future__ import annotations

import ast
import re

import pytest
from nb_harness import NOTEBOOK_DIR, cell_errors, check_png, execute_notebook, notebook_text

#: notebook -> the figures it must write (under <out>/<notebook stem>/)
NOTEBOOKS = {
    "01_quickstart.py": [
        "datasets_overview.png",
        "episode_multiclass_classification.png",
        "episode_binary_classification.png",
        "episode_multilabel_classification.png",
        "episode_ordinal_regression.png",
    ],
    "02_medimeta_baselines.py": ["auroc_per_task.png"],
    "03_l2l_protocol.py": ["accuracy_vs_shots.png", "rank_then_aggregate.png"],
    "05_segmentation.py": ["segmentation_nuclei.png", "segmentation_brain.png", "segmentation_scores.png"],
    "04_slides.py": [
        "slide_tissue_tiles.png",
        "slide_tiles_stain.png",
        "slide_feature_pca.png",
        "slide_mil_attention.png",
    ],
}


def test_every_notebook_is_executed_by_a_test() -> None:
    present = sorted(p.name for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
    assert present == sorted(NOTEBOOKS), f"notebooks on disk {present} != notebooks the tests run {sorted(NOTEBOOKS)}"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_reviewable_and_uses_public_api(name: str) -> None:
    """Percent-format, valid Python, the switches at the top, public names only, no outputs."""
    path = NOTEBOOK_DIR / name
    text = path.read_text()
    assert "format_name: percent" in text and "# %%" in text, f"{name}: not a Jupytext percent-format file"
    ast.parse(text)  # the paired .py file is valid Python
    assert 'os.environ.get("MEDMETA_NOTEBOOK_QUICK"' in text, f"{name}: no quick switch"
    assert 'os.environ.get("MEDMETA_NOTEBOOK_OUT")' in text, f"{name}: no output-folder switch"
    if name[:2] in ("01", "02", "03"):
        assert 'MEDIMETA_ROOT = os.environ.get("MEDIMETA_ROOT")' in text, f"{name}: no switch to the real MedIMeta root"
    private = re.findall(r"from medmeta[\w.]* import [^\n]*\b_\w+|medmeta\.[\w.]*\._\w+", text)
    assert not private, f"{name}: uses private library names {private}"
    outputs = re.findall(r"^# (?:Out|\[\d+\]):", text, flags=re.M)
    assert not outputs, f"{name}: contains stored outputs"


@pytest.mark.slow
def test_slides_notebook(tmp_path) -> None:
    nb, out, seconds = execute_notebook(NOTEBOOK_DIR / "04_slides.py", tmp_path)
    assert not cell_errors(nb)
    for fig in NOTEBOOKS["04_slides.py"]:
        check_png(out / "04_slides" / fig)
    text = notebook_text(nb)
    assert "quick mode: True" in text
    # The bundled Aperio slide: 2220 x 2967 px at 0.499 um/px, one level, 240 px stored tiles;
    # a 224 px grid snapped inside the stored tiles keeps 38 tissue tiles.
    assert "(2220, 2967)" in text and "38 tiles of 224px" in text
    assert (out / "04_slides" / "grid_1mpp.h5").is_file()
    # Lesion slides carry an obvious motif: attention MIL separates them from 2 shots; the
    # summary row is "abmil  <episodes>  <accuracy mean>  <accuracy CI>  <AUROC mean>".
    row = re.search(r"abmil\s+(\d+)\s+([\d.]+)\s+([\d.na]+)\s+([\d.]+)", text)
    assert row is not None, "no ABMIL row in the episode summary"
    assert int(row.group(1)) == 3 and float(row.group(2)) >= 0.75 and float(row.group(4)) >= 0.75, row.group(0)
    assert "mean_pool" in text


def _figures(out, name: str) -> None:
    for fig in NOTEBOOKS[name]:
        check_png(out / name.removesuffix(".py") / fig)


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, embedded_data) -> None:
    nb, out, _ = execute_notebook(NOTEBOOK_DIR / "01_quickstart.py", tmp_path)
    assert not cell_errors(nb)
    _figures(out, "01_quickstart.py")
    text = notebook_text(nb)
    meta = embedded_data
    assert f"{len(meta.dataset_ids)} datasets, {len(meta.tasks)} tasks, {len(meta.domains)} domains" in text
    # one episode of each task kind, with the label encoding of medmeta.tasks
    assert re.search(r"BINARY_CLASSIFICATION: .* labels \(6, 1\) torch.float32", text)
    assert re.search(r"MULTICLASS_CLASSIFICATION: .* labels \(6,\) torch.int64", text)
    assert re.search(r"MULTILABEL_CLASSIFICATION: .* labels \(\d+, 3\) torch.float32", text)
    assert re.search(r"ORDINAL_REGRESSION: .* labels \(\d+,\) torch.int64", text)
    assert "5 episodes written to episodes.json and replayed identically" in text


@pytest.mark.slow
def test_medimeta_baselines_notebook(tmp_path, embedded_data) -> None:
    import pandas as pd

    nb, out, _ = execute_notebook(NOTEBOOK_DIR / "02_medimeta_baselines.py", tmp_path)
    assert not cell_errors(nb)
    _figures(out, "02_medimeta_baselines.py")
    root = out / "02_medimeta_baselines"
    text = notebook_text(nb)
    assert "quick mode: True" in text
    target = re.search(r"target: (\S+);", text).group(1)
    target_tasks = {e.task_name for e in embedded_data.tasks if e.dataset_id == target}
    results = {}
    for baseline in ("IM-PT", "mm-PT", "mm-MAML"):
        run = root / "runs" / baseline
        assert (run / "config.yaml").is_file() and (run / "final_metrics.json").is_file(), baseline
        results[baseline] = pd.read_csv(run / "test" / "results.csv")
        assert set(results[baseline]["dataset"]) == {target}
        assert set(results[baseline]["task"]) == target_tasks  # the held-out target's tasks only
        assert results[baseline]["shots"].eq(5).all() and results[baseline]["auroc"].between(0, 1).all()
    # the three baselines are tested on the very same episodes
    keys = [sorted(zip(r["task"], r["instance"])) for r in results.values()]
    assert keys[0] == keys[1] == keys[2]
    assert "IM-PT    steps done:    0" in text and "mm-PT    steps done:    4" in text
    assert "mm-MAML  steps done:    2" in text
    # the target is not among the training datasets, nor its overlaps
    trained_on = re.search(r"training datasets: \[(.*?)\]", text).group(1)
    assert target not in trained_on
    # ImageNet features already separate these easy real-image tasks (seeded, deterministic)
    assert results["IM-PT"]["auroc"].mean() > 0.6
    table = pd.read_csv(root / "auroc_table.csv")
    assert {"IM-PT", "mm-PT", "mm-MAML"} <= set(table.columns) and len(table) == len(target_tasks)


@pytest.mark.slow
def test_l2l_protocol_notebook(tmp_path, embedded_data) -> None:
    import pandas as pd

    nb, out, _ = execute_notebook(NOTEBOOK_DIR / "03_l2l_protocol.py", tmp_path)
    assert not cell_errors(nb)
    _figures(out, "03_l2l_protocol.py")
    root = out / "03_l2l_protocol"
    df = pd.read_csv(root / "l2l" / "results.csv")
    assert set(df["method"]) == {"protonet", "protonet_cosine", "linear_probe", "finetune"}
    assert sorted(df["shots"].unique()) == [3, 6, 10]
    # every method sees the same episodes
    per_method = [sorted(zip(g["task"], g["shots"], g["instance"])) for _, g in df.groupby("method")]
    assert all(p == per_method[0] for p in per_method)
    summary = (root / "l2l" / "summary.md").read_text()
    assert "Rank then aggregate" in summary
    # mean ranks of 4 methods over the same tasks average to (4 + 1) / 2
    ranks = [float(m) for m in re.findall(r"^\| \w+ \| (\d+\.\d+) \| \d+ \|", summary, flags=re.M)]
    assert len(ranks) == 4 and abs(sum(ranks) / 4 - 2.5) < 1e-9


@pytest.mark.slow
def test_segmentation_notebook(tmp_path) -> None:
    nb, out, _ = execute_notebook(NOTEBOOK_DIR / "05_segmentation.py", tmp_path)
    assert not cell_errors(nb)
    _figures(out, "05_segmentation.py")
    text = notebook_text(nb)
    assert "16 tiles" in text and "94 axial slices" in text
    # the table: (task, head) rows with Dice and NSD means; the hypercolumn probe segments the
    # bright nuclei well from 2 annotated tiles
    row = re.search(r"nuclei\s+linear\s+([\d.]+)\s+[\d.]+\s+([\d.]+)", text)
    assert row is not None, "no nuclei/linear row in the score table"
    assert float(row.group(1)) > 0.7 and 0.0 <= float(row.group(2)) <= 1.0


def test_a_cell_that_raises_fails_the_run(tmp_path) -> None:
    """The harness really fails on an error: a percent-format notebook whose second cell raises."""
    from nbclient.exceptions import CellExecutionError

    bad = tmp_path / "bad.py"
    bad.write_text("# %%\nx = 1\n\n# %%\nraise ValueError('cell two is broken')\n")
    with pytest.raises(CellExecutionError, match="cell two is broken"):
        execute_notebook(bad, tmp_path)
    assert (tmp_path / "bad.ipynb").is_file()  # the executed copy is kept for inspection


def _runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOK_DIR / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_selects_notebooks_and_names_unknown_ones() -> None:
    runner = _runner()
    assert [p.name for p in runner.notebooks(["01", "04_slides"])] == ["01_quickstart.py", "04_slides.py"]
    assert [p.name for p in runner.notebooks([])] == sorted(NOTEBOOKS)
    with pytest.raises(SystemExit, match="no notebook matches \\['09'\\]"):
        runner.notebooks(["09"])


def test_runner_reports_a_failing_notebook(tmp_path, monkeypatch, capsys) -> None:
    runner = _runner()
    bad = tmp_path / "nb" / "01_bad.py"
    bad.parent.mkdir()
    bad.write_text("# %%\nprint('fine')\n\n# %%\n1 / 0\n")
    monkeypatch.setattr(runner, "HERE", bad.parent)
    for key in ("MEDMETA_NOTEBOOK_QUICK", "MEDMETA_NOTEBOOK_OUT"):
        monkeypatch.setenv(key, "")  # restored after the test (main() sets them)
    assert runner.main(["--quick", "--out", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr().out
    assert "01_bad.py" in printed and "ZeroDivisionError" in printed
    assert (tmp_path / "out" / "01_bad.ipynb").is_file()

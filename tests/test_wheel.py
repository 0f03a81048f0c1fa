"""The package as a researcher installs it: an sdist and a wheel that carry the Hydra configs
(the top-level conf/ folder, installed as the package medmeta.conf), installed into a fresh
virtual environment (not editable, no checkout on the path), whose console commands run from a
folder outside the checkout, with the shipped configs and with a user's own config folder."""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def test_setup_cfg_lists_every_package_and_config_file() -> None:
    """setup.cfg lists its packages (medmeta.conf lives outside medmeta/, so find: cannot be
    used): the list must name every package under medmeta/, and the package-data globs of
    medmeta.conf must cover every file of conf/ (a file they miss is silently left out of the wheel)."""
    cfg = _setup_cfg()
    listed = set(_lines(cfg["options"]["packages"]))
    found = set(find_packages(where=str(ROOT), include=["medmeta", "medmeta.*"]))
    assert listed == found | {"medmeta.conf"}, "update [options] packages in setup.cfg"
    assert _lines(cfg["options"]["package_dir"]) == ["medmeta.conf = conf"]
    conf = ROOT / "conf"
    shipped = {p for pattern in _lines(cfg["options.package_data"]["medmeta.conf"]) for p in conf.glob(pattern)}
    files = {p for p in conf.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"}
    assert files and files <= shipped, f"not shipped: {sorted(str(p) for p in files - shipped)}"


def test_configs_are_the_package_medmeta_conf() -> None:
    """In this (editable) install medmeta.conf is the checkout's conf/ folder itself: one copy."""
    from medmeta.cli import CONFIG_PATH, config_dir

    spec = importlib.util.find_spec("medmeta.conf")
    assert spec is not None and spec.submodule_search_locations is not None
    assert Path(list(spec.submodule_search_locations)[0]).resolve() == (ROOT / "conf").resolve()
    assert config_dir().resolve() == (ROOT / "conf").resolve()
    assert CONFIG_PATH == "pkg://medmeta.conf"


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MEDMETA_", "VIRTUAL_ENV"))}
    env.update(MEDMETA_DATA_DIR=str(data_dir), MEDMETA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 180) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_built_wheel_runs_from_a_fresh_venv(tmp_path: Path) -> None:
    """python -m build (sdist, then the wheel from the sdist), twine check, install the wheel
    into a new venv with --no-deps, and run ``medmeta-train --multirun`` (two jobs, a user config
    folder through --config-dir) and ``medmeta-evaluate`` (a user folder through hydra.searchpath)
    through that venv's console scripts from a folder outside the checkout."""
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)], ROOT,
         {**os.environ, "PYTHONWARNINGS": "ignore"})
    wheels, sdists = sorted(dist.glob("medmeta-*.whl")), sorted(dist.glob("medmeta-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert {"medmeta/conf/__init__.py", "medmeta/conf/train.yaml", "medmeta/conf/evaluate.yaml",
            "medmeta/conf/learner/protonet.yaml", "medmeta/conf/hydra/launcher/local.yaml"} <= set(names)
    assert not any(n.startswith(("conf/", "tests/")) for n in names)  # no stray top-level packages
    if importlib.util.find_spec("twine") is not None:
        out = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, (*wheels, *sdists))], ROOT,
                   dict(os.environ))
        assert out.count("PASSED") == 2

    # a fresh venv holding only the wheel; the dependencies come from this environment's
    # site-packages through a .pth file (whose own .pth files, the editable medmeta's finder
    # among them, are not processed)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--no-compile", "-q", str(wheels[0])], tmp_path, {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, dict(os.environ)).strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_medmeta_test_dependencies.pth").write_text("\n".join(sorted(outer)) + "\n")

    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    env = _env(tmp_path / "data")
    where = json.loads(_run([str(python), "-c", "import json, medmeta, medmeta.conf; print(json.dumps("
                             "[medmeta.__file__, medmeta.conf.__file__]))"], work, env).strip().splitlines()[-1])
    for path in where:
        assert Path(path).resolve().is_relative_to(site.resolve()), where

    # the user's own config folder, with options built on the shipped ones: added in front of the
    # shipped configs with --config-dir (train) and with hydra.searchpath (evaluate)
    mine = tmp_path / "my_conf"
    (mine / "trainer").mkdir(parents=True)
    (mine / "trainer" / "tiny.yaml").write_text(
        "defaults:\n  - debug\n  - _self_\nsteps: 2\nval_episodes: 0\ntest: false\n")
    (mine / "protocol").mkdir()
    (mine / "protocol" / "tiny.yaml").write_text(
        "defaults:\n  - quick\n  - _self_\nshots: [1]\ninstances: 2\nn_query: 2\n")

    log = _run([str(bin_dir / "medmeta-train"), "--multirun", "--config-dir", str(mine), "data=synthetic",
                "backbone=conv4_tiny", "trainer=tiny", "logger=csv", "output_root=out", "trainer.seed=0,1"], work, env)
    assert log.count("CPU threads: 1 (MEDMETA_NUM_THREADS=1)") == 2
    runs = sorted((work / "out" / "multirun" / "train").rglob("final_metrics.json"))
    assert [p.parent.name for p in runs] == ["0", "1"]
    assert [json.loads(p.read_text())["steps_done"] for p in runs] == [2, 2]  # the user's trainer/tiny.yaml

    _run([str(bin_dir / "medmeta-evaluate"), f"hydra.searchpath=[file://{mine}]", "protocol=tiny", "data=synthetic",
          "data.test.dataset_ids=[syn_derm]", "backbone=conv4_tiny", "backbone.pretrained=null",
          "~learner@learners.finetune", "~learner@learners.linear_probe", "progress=false", "logger=csv",
          "output_root=out"], work, env)
    (results,) = (work / "out" / "evaluate").rglob("results.csv")
    rows = pd.read_csv(results)
    assert set(rows["method"]) == {"protonet"} and set(rows["shots"]) == {1}  # the user's protocol/tiny.yaml
    assert rows.groupby(["dataset", "task"])["instance"].nunique().eq(2).all()

"""torch's CPU thread count per medmeta process (medmeta.threads): the rule, its order of
precedence, its errors, and that every app applies it before any work."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir

from medmeta import threads
from medmeta.errors import ConfigError
from medmeta.threads import (
    THREADS_ENV,
    apply_num_threads,
    available_cpus,
    default_num_threads,
    local_world_size,
    resolve_num_threads,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def _keep_torch_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests change torch's global thread count and the environment: restore both."""
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before, set_threads = torch.get_num_threads(), torch.set_num_threads
    yield
    set_threads(before)  # the real one: some tests replace torch.set_num_threads


# the rule: max(1, cpus // (local_world_size * (1 + workers)))
@pytest.mark.parametrize(
    "cpus, workers, ranks, expected",
    [
        (8, 0, 1, 8),    # alone: every CPU
        (8, 1, 1, 4),    # main process + 1 worker
        (8, 3, 1, 2),
        (7, 1, 1, 3),    # rounds down
        (8, 0, 2, 4),    # torchrun --nproc_per_node=2
        (8, 1, 2, 2),    # 2 ranks x (main + 1 worker)
        (16, 3, 2, 2),
        (2, 4, 1, 1),    # more processes than CPUs: still one thread
        (1, 0, 4, 1),
    ],
)
def test_default_rule_known_answers(cpus: int, workers: int, ranks: int, expected: int) -> None:
    assert default_num_threads(cpus, workers, ranks) == expected


@pytest.mark.parametrize(
    "args, name",
    [((0, 0, 1), "cpus"), ((4, -1, 1), "num_workers"), ((4, 0, 0), "LOCAL_WORLD_SIZE"), ((True, 0, 1), "cpus"),
     ((4.5, 0, 1), "cpus")],
)
def test_default_rule_rejects_bad_numbers(args: tuple, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        default_num_threads(*args)


def test_precedence_setting_then_env_then_default() -> None:
    assert resolve_num_threads(3, environ={THREADS_ENV: "5"}, cpus=8) == (3, "num_threads=3")
    assert resolve_num_threads("3", name="trainer.num_threads", environ={}, cpus=8) == (3, "trainer.num_threads=3")
    assert resolve_num_threads(None, environ={THREADS_ENV: "5"}, cpus=8) == (5, f"{THREADS_ENV}=5")
    assert resolve_num_threads("auto", environ={THREADS_ENV: " 5 "}, cpus=8)[0] == 5
    n, source = resolve_num_threads(None, workers=1, environ={THREADS_ENV: "auto"}, cpus=8)
    assert n == 4 and source.startswith("default: 8 CPU(s)") and "1 DataLoader worker" in source
    # torchrun's LOCAL_WORLD_SIZE divides the share
    n, source = resolve_num_threads(None, workers=1, environ={"LOCAL_WORLD_SIZE": "2"}, cpus=8)
    assert n == 2 and "2 local ranks" in source
    assert resolve_num_threads(None, environ={}, cpus=6) == (6, "default: 6 CPU(s)")


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_bad_environment_value_names_the_variable(value: str) -> None:
    if value == "":  # empty means unset
        assert resolve_num_threads(None, environ={THREADS_ENV: value}, cpus=4)[0] == 4
        return
    with pytest.raises(ConfigError, match=f"{THREADS_ENV}: expected an integer >= 1, got '{value}'"):
        resolve_num_threads(None, environ={THREADS_ENV: value}, cpus=4)


@pytest.mark.parametrize("value", [0, -1, True, "many", 2.0])
def test_bad_setting_names_the_setting(value: object) -> None:
    with pytest.raises(ConfigError, match="trainer.num_threads: expected an integer >= 1"):
        resolve_num_threads(value, name="trainer.num_threads", environ={THREADS_ENV: "2"}, cpus=4)  # type: ignore[arg-type]


def test_local_world_size() -> None:
    assert local_world_size({}) == 1
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE"):
        local_world_size({"LOCAL_WORLD_SIZE": "0"})


def test_available_cpus_affinity_and_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    empty = tmp_path / "none"
    empty.mkdir()
    assert available_cpus(empty) == 8  # no cgroup files: the affinity
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of quota -> 2
    assert available_cpus(v2) == 2
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cpus(v2) == 8
    (v2 / "cpu.max").write_text("2000000 100000\n")  # quota above the affinity: the affinity
    assert available_cpus(v2) == 8
    (v2 / "cpu.max").write_text("garbage\n")
    assert available_cpus(v2) == 8
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    assert available_cpus(v1.parent) == 3
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(v1.parent) == 8
    assert 1 <= available_cpus() <= (len(threads.os.sched_getaffinity(0)))


def test_apply_sets_torch_and_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(THREADS_ENV, "1")
    with caplog.at_level(logging.INFO, logger="medmeta.threads"):
        assert apply_num_threads(workers=3) == 1
    assert torch.get_num_threads() == 1
    assert [r.getMessage() for r in caplog.records] == [f"CPU threads: 1 ({THREADS_ENV}=1)"]


# the apps apply it first thing ------------------------------------------------------------------
class _Stop(Exception):
    pass


def _record_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []

    def fake(n: int) -> None:
        seen.append(n)
        raise _Stop  # nothing after it runs: the thread count comes before any work

    monkeypatch.setattr(torch, "set_num_threads", fake)
    return seen


def _compose(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=overrides)


def test_run_training_applies_the_trainer_setting_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from medmeta.training.run import run_training

    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    cfg = _compose("train", ["data=synthetic", "backbone=conv4_tiny", "trainer.num_workers=1"])
    seen = _record_threads(monkeypatch)
    with pytest.raises(_Stop):
        run_training(cfg)
    assert seen == [4]  # 8 CPUs shared by the main process and its one worker
    with pytest.raises(_Stop):
        run_training(_compose("train", ["data=synthetic", "backbone=conv4_tiny", "trainer.num_threads=3"]))
    assert seen == [4, 3]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="trainer.num_threads: expected an integer >= 1, got 0"):
        run_training(_compose("train", ["data=synthetic", "backbone=conv4_tiny", "trainer.num_threads=0"]))


def test_run_evaluation_applies_its_setting_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from medmeta.training.run import run_evaluation

    overrides = ["data=synthetic", "backbone=conv4_tiny", "backbone.pretrained=null"]
    monkeypatch.setenv(THREADS_ENV, "2")
    seen = _record_threads(monkeypatch)
    with pytest.raises(_Stop):
        run_evaluation(_compose("evaluate", overrides))
    with pytest.raises(_Stop):
        run_evaluation(_compose("evaluate", [*overrides, "num_threads=1"]))
    assert seen == [2, 1]


@pytest.mark.parametrize(
    "module, argv",
    [
        ("medmeta.evaluation.challenge", ["convert", "{missing}/task.pkl", "--out", "{missing}/task.pt"]),
        ("medmeta.adapters.slides.detection.cli", ["score", "--submission", "{missing}", "--annotations", "{missing}"]),
        ("medmeta.adapters.segmentation.flare", ["--input", "{missing}", "--output", "{missing}/out",
                                                 "--support-images", "{missing}", "--support-labels", "{missing}"]),
        ("medmeta.adapters.slides.visiomel", ["--data-dir", "{missing}", "--assets", "{missing}"]),
    ],
)
def test_other_commands_apply_the_setting_before_work(
    module: str, argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    main = importlib.import_module(module).main
    args = [a.format(missing=tmp_path / "missing") for a in argv]
    monkeypatch.setenv(THREADS_ENV, "zero")  # a bad value: one line, exit status 2, before any file is read
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{THREADS_ENV}: expected an integer >= 1, got 'zero'" in err and "missing" not in err
    monkeypatch.setenv(THREADS_ENV, "1")  # a good one is applied, then the missing input stops the command
    torch.set_num_threads(2)
    with pytest.raises(SystemExit):
        main(args)
    assert torch.get_num_threads() == 1

"""The reliability harness (benchmarks/reliability.py) in its short mode: every category, every case passes.

Also unit checks of the pieces it relies on: the run-folder lock (refusal naming the holder,
re-entrant in one process, freed when the holder dies) and the named full-disk error."""
from __future__ import annotations

import errno
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from medmeta.errors import BusyError, DiskFullError, UserError
from medmeta.io import contained_path, write_bytes_atomic
from medmeta.locks import hold, holder_of

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("reliability", ROOT / "benchmarks" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reliability"] = module
    spec.loader.exec_module(module)
    return module


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    import subprocess

    code = "import sys, time\nfrom medmeta.locks import hold\nwith hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        info = holder_of(tmp_path / ".medmeta.lock")
        assert info["pid"] == proc.pid
        with pytest.raises(BusyError, match=rf"run folder {tmp_path} is in use by pid {proc.pid} on host"):
            with hold(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    with hold(tmp_path), hold(tmp_path):  # free again at once, and re-entrant in one process
        assert holder_of(tmp_path / ".medmeta.lock")["pid"] == os.getpid()
    assert not (tmp_path / ".medmeta.lock").exists()  # a finished holder removes its lock file


def test_full_disk_is_a_named_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_bytes_atomic(tmp_path / "results.csv", b"a,b\n1,2\n")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError, match=r"results.csv: no space left on the device") as info:
        write_bytes_atomic(path, b"a,b\n3,4\n")
    assert isinstance(info.value, UserError) and isinstance(info.value, OSError)
    monkeypatch.undo()
    assert path.read_bytes() == b"a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_contained_path_refuses_paths_out_of_the_folder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    (tmp_path / "in" / "link.png").symlink_to(tmp_path / "outside.png")
    assert contained_path(tmp_path / "in", "a.png", "t.csv") == tmp_path / "in" / "a.png"
    for bad in ("../outside.png", str(tmp_path / "outside.png"), "link.png", "", None):
        with pytest.raises(UserError, match="t.csv"):
            contained_path(tmp_path / "in", bad, "t.csv")


def test_checkpoint_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    from medmeta.learners.state import read_checkpoint, write_checkpoint

    harness = _harness()
    path = write_checkpoint({"format": "medmeta-checkpoint", "version": 2, "model": {"w": torch.zeros(3)}}, tmp_path / "last.pt")
    with harness.disk_full_after(2, tmp_path), pytest.raises(DiskFullError, match="last.pt: no space left"):
        write_checkpoint({"format": "medmeta-checkpoint", "version": 2, "model": {"w": torch.ones(10000)}}, path)
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.zeros(3))


@pytest.mark.slow
def test_short_mode_every_case_passes(tmp_path):
    harness = _harness()
    cats = harness.run_all(short=True, seed=0, work=tmp_path)
    names = {c.name for c in cats}
    assert names == {"killed runs", "full disk", "concurrent runs", "corrupted and hostile inputs", "read-only data", "offline"}
    for c in cats:
        assert c.tried > 0, c.name
        assert c.passed == c.tried, f"{c.name}: {c.failures}"
    killed = next(c for c in cats if c.name == "killed runs")
    # meta-training and the protocol run (resumed) and the VisioMel runner (rerun): a kill and a finished chain each
    assert [(name, tried) for name, tried, _, _ in killed.parts] == [
        ("meta-training (protonet)", 2), ("protocol run (evaluate)", 2), ("VisioMel runner", 2)]
    readonly = next(c for c in cats if c.name == "read-only data")
    assert readonly.tried == 3  # the reader, the hook's own check and the VisioMel runner on read-only folders


def test_harness_scan_flags_half_written_files_and_skips_temporaries(tmp_path):
    harness = _harness()
    (tmp_path / "metrics.csv").write_bytes(b"step,name,value\n1,loss,0.5\n2,lo")  # last row cut short
    (tmp_path / "report.json").write_text('{"a": 1')
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:40])
    (tmp_path / ".case_000.nii.gz.ab12cd_3.nii.gz").write_bytes(b"\x1f\x8b")  # an atomic write cut short
    (tmp_path / ".last.pt.zz9x_k01.tmp").write_bytes(b"")
    problems, temps = harness.scan_folder(tmp_path)
    assert temps == 2
    assert sorted(p.split(":")[0] for p in problems) == ["cut.pt", "metrics.csv", "report.json"]


def test_detection_cli_passes_checkpoint_every_to_the_trainer(tmp_path, monkeypatch):
    """``--checkpoint-every`` (what the harness uses to kill detection training between checkpoints)
    reaches ``train_detector``; without it the trainer's default (100 steps) applies."""
    import warnings

    from medmeta.adapters.slides.detection import cli, detector
    from medmeta.adapters.slides.detection.synthetic_cytology import make_synthetic_cytology_set

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_synthetic_cytology_set(tmp_path / "set", 1, 0, size=(384, 384), seed=0)
    seen = []

    def fake_train(model, dataset, **kwargs):
        seen.append(kwargs.get("checkpoint_every"))
        return [{"loss": 0.0}]

    monkeypatch.setattr(detector, "train_detector", fake_train)
    args = ["train", "--slides", str(tmp_path / "set" / "slides"), "--annotations", str(tmp_path / "set" / "annotations"),
            "--arch", "retinanet", "--backbone", "medmeta_conv4_tiny", "--fpn-channels", "16", "--patch-size", "96",
            "--cell-patches", "1", "--background-patches", "1", "--negative-patches", "1", "--iterations", "3",
            "--device", "cpu", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "d.pt")]
    assert cli.main([*args, "--checkpoint-every", "2"]) == 0
    assert cli.main(args) == 0
    assert seen == [2, None]

"""Atomic writes: the old file survives a failed write, no temporary files are left behind, and
files get the umask's permissions (not mkstemp's owner-only 0600)."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from medmeta.io import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic
from medmeta.training.checkpoint import atomic_torch_save


def test_writers_replace_content_and_leave_nothing_else(tmp_path) -> None:
    target = tmp_path / "sub" / "result.txt"
    write_text_atomic(target, "first")
    write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["r.json", "result.txt", "sub"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path) -> None:
    target = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a checkpo")
            raise RuntimeError("killed mid-write")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_files_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "shared.csv", "a,b\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_suffix_is_kept_for_writers_that_pick_the_format_by_extension(tmp_path) -> None:
    with atomic_path(tmp_path / "mask.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "mask.nii.gz").read_bytes() == b"x"

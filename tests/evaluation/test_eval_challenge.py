"""The challenge interface: tensor files, image folders with CSV, TorchCross pickles behind a flag."""
from __future__ import annotations

import csv
import dataclasses
import enum
import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from eval_fixtures import TinyCentroidLearner, class_source
from PIL import Image

from medmeta.evaluation.challenge import (
    convert_torchcross_task,
    encode_label_names,
    load_tensor_file,
    main,
    make_description,
    run_challenge,
    save_tensor_file,
)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _split(source, n_support):
    images = source.images
    labels = torch.as_tensor(source.labels)
    return images[:n_support], labels[:n_support], images[n_support:], labels[n_support:]


def test_predict_from_a_tensor_file_via_the_command_line(tmp_path):
    src = class_source(counts=(10, 10, 10), noise=0.05)
    s_x, s_y, q_x, q_y = _split(src, 15)
    assert len(set(s_y.tolist())) == 3
    tensors = tmp_path / "task.safetensors"
    save_tensor_file(tensors, {"support_images": s_x, "support_labels": s_y, "query_images": q_x},
                     {"task_target": "MULTICLASS_CLASSIFICATION", "classes": json.dumps(["a", "b", "c"])})
    out = tmp_path / "preds.csv"
    rc = main(["predict", "--support", str(tensors), "--learner", "protonet", "--backbone", "medmeta_conv4_tiny",
               "--channels", "1", "--out", str(out), "--probabilities-out", str(tmp_path / "probs.pt")])
    assert rc == 0
    rows = _read_csv(out)
    assert len(rows) == 15 and list(rows[0]) == ["index", "file", "prediction", "prob_a", "prob_b", "prob_c"]
    predicted = [["a", "b", "c"].index(r["prediction"]) for r in rows]
    assert np.mean(np.array(predicted) == q_y.numpy()) >= 0.8
    probs = np.array([[float(r[f"prob_{c}"]) for c in "abc"] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    saved = torch.load(tmp_path / "probs.pt", weights_only=True)
    np.testing.assert_allclose(saved["probabilities"].numpy(), probs, atol=1e-5)


def _write_png_set(folder, images, names, labels=None):
    folder.mkdir()
    rows = []
    for i, img in enumerate(images):
        arr = (np.clip(img[0].numpy() / 4.0, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")
        rows.append({"file": f"img{i:03d}.png", **({"label": names[int(labels[i].item())]} if labels is not None else {})})
    if labels is not None:
        with open(folder / "labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def test_predict_from_image_folders_binary(tmp_path):
    src = class_source("BINARY_CLASSIFICATION", counts=(12, 12), noise=0.05)
    s_x, s_y, q_x, q_y = _split(src, 12)
    _write_png_set(tmp_path / "support", s_x, ["healthy", "sick"], s_y)
    _write_png_set(tmp_path / "query", q_x, ["healthy", "sick"])  # no CSV: every image, sorted
    description = make_description("binary", ["healthy", "sick"])
    preds, probs = run_challenge(TinyCentroidLearner(), tmp_path / "support", tmp_path / "query", description,
                                 tmp_path / "out.csv", channels=1)
    rows = _read_csv(tmp_path / "out.csv")
    assert [r["file"] for r in rows] == [f"img{i:03d}.png" for i in range(12)]
    assert probs.shape == (12, 2) and preds.shape == (12, 1)
    truth = ["healthy", "sick"]
    assert np.mean([r["prediction"] == truth[int(y)] for r, y in zip(rows, q_y)]) >= 0.9
    assert all(abs(float(r["prob_healthy"]) + float(r["prob_sick"]) - 1) < 1e-5 for r in rows)


def test_csv_label_encoding_and_errors():
    ml = make_description("multilabel", ["x", "y", "z"])
    by_names = encode_label_names([{"file": "a", "labels": "x;z"}, {"file": "b", "labels": ""}], ml, "s.csv")
    assert by_names.tolist() == [[1, 0, 1], [0, 0, 0]]
    by_cols = encode_label_names([{"file": "a", "x": "0", "y": "1", "z": "1"}], ml, "s.csv")
    assert by_cols.tolist() == [[0, 1, 1]]
    mc = make_description("ordinal", ["low", "mid", "high"])
    assert encode_label_names([{"label": "high"}, {"label": "0"}], mc, "s.csv").tolist() == [2, 0]
    with pytest.raises(ValueError, match="s.csv, row 3: label 'huge'"):
        encode_label_names([{"label": "low"}, {"label": "huge"}], mc, "s.csv")
    with pytest.raises(ValueError, match="exactly 2 class names"):
        make_description("binary", ["a", "b", "c"])
    with pytest.raises(ValueError, match="--task-kind"):
        make_description("segmentation-ish", ["a", "b"])


def _fake_torchcross():
    """A stand-in of the torchcross.data.task module, as the organisers' pickles reference it."""
    pkg = types.ModuleType("torchcross")
    data = types.ModuleType("torchcross.data")
    task_mod = types.ModuleType("torchcross.data.task")

    class TaskTarget(enum.Enum):
        MULTICLASS_CLASSIFICATION = enum.auto()
        BINARY_CLASSIFICATION = enum.auto()
        MULTILABEL_CLASSIFICATION = enum.auto()

    @dataclasses.dataclass
    class TaskDescription:
        task_target: TaskTarget
        classes: dict = None
        task_identifier: str = None
        domain_identifier: str = None

    @dataclasses.dataclass
    class Task:
        support: object
        query: object
        description: TaskDescription

    for cls in (TaskTarget, TaskDescription, Task):
        cls.__module__ = "torchcross.data.task"
        cls.__qualname__ = cls.__name__
        setattr(task_mod, cls.__name__, cls)
    return {"torchcross": pkg, "torchcross.data": data, "torchcross.data.task": task_mod}


def test_torchcross_pickle_only_with_trust_flag(tmp_path, monkeypatch):
    modules = _fake_torchcross()
    tc = modules["torchcross.data.task"]
    src = class_source("BINARY_CLASSIFICATION", counts=(8, 8), noise=0.05)
    s_x, s_y, q_x, _ = _split(src, 8)
    task = tc.Task(
        support=[(s_x[i], torch.tensor([int(s_y[i])])) for i in range(8)],
        query=[q_x[i] for i in range(8)],
        description=tc.TaskDescription(tc.TaskTarget.BINARY_CLASSIFICATION, {0: "no", 1: "yes"}, "t: bin", "dom"),
    )
    with monkeypatch.context() as m:
        for name, mod in modules.items():
            m.setitem(sys.modules, name, mod)
        data = pickle.dumps(task)
    # The converter must not need TorchCross: hide any real copy another test imported and make
    # ``import torchcross`` fail for the rest of this test (a None entry blocks the import).
    for name in [n for n in sys.modules if n == "torchcross" or n.startswith("torchcross.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchcross", None)
    pkl = tmp_path / "task.pkl"
    pkl.write_bytes(data)
    out = tmp_path / "task.safetensors"
    with pytest.raises(PermissionError, match="--trust-pickle"):
        convert_torchcross_task(pkl, out)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(pkl), "--out", str(out)])
    assert exit_info.value.code == 2 and not out.exists()
    assert main(["convert", str(pkl), "--out", str(out), "--trust-pickle"]) == 0
    tensors, meta = load_tensor_file(out)
    assert meta["task_target"] == "BINARY_CLASSIFICATION" and json.loads(meta["classes"]) == ["no", "yes"]
    torch.testing.assert_close(tensors["support_images"], s_x)
    assert tensors["support_labels"].shape == (8, 1) and tensors["support_labels"].dtype == torch.float32
    torch.testing.assert_close(tensors["query_images"], q_x)
    rc = main(["predict", "--support", str(out), "--learner", "protonet", "--backbone", "medmeta_conv4_tiny",
               "--channels", "1", "--out", str(tmp_path / "p.csv")])
    assert rc == 0 and len(_read_csv(tmp_path / "p.csv")) == 8


def test_tensor_files_are_read_without_pickle_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pt"
    torch.save({"support_images": torch.zeros(2, 1, 4, 4), "x": Evil()}, bad)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_tensor_file(bad)


def test_command_line_end_to_end_image_folders_checkpoint_and_multilabel(tmp_path, capsys):
    """Support folder + CSV of label names, query folder + CSV of files, a saved learner checkpoint:
    the command's CSV equals the Python API's predictions with the same learner."""
    from medmeta.backbones import create_backbone
    from medmeta.learners import ProtoNet, save_learner

    src = class_source("MULTILABEL_CLASSIFICATION", n_items=48, n_labels=3, noise=0.05, seed=3)
    names = ["effusion", "nodule", "edema"]
    labels = torch.as_tensor(src.labels, dtype=torch.float32)
    for part, rows in (("support", range(24)), ("query", range(24, 48))):
        folder = tmp_path / part / "images"
        folder.mkdir(parents=True)
        records = []
        for i in rows:
            arr = (np.clip(src.images[i, 0].numpy() / 8.0, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"case{i:02d}.png")
            record = {"file": f"images/case{i:02d}.png"}
            if part == "support":
                record["labels"] = ";".join(n for n, v in zip(names, labels[i].tolist()) if v == 1)
            records.append(record)
        with open(tmp_path / part / f"{part}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    torch.manual_seed(0)
    learner = ProtoNet(create_backbone("medmeta_conv4_tiny", in_chans=1), temperature=0.5)
    with torch.no_grad():  # a checkpoint that differs from a fresh backbone
        for p in learner.parameters():
            p.add_(0.01)
    ckpt = save_learner(tmp_path / "protonet.pt", learner)
    out = tmp_path / "out" / "predictions.csv"
    argv = ["predict", "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query" / "query.csv"),
            "--task-kind", "multilabel", "--classes", ",".join(names), "--learner", "protonet",
            "--backbone", "medmeta_conv4_tiny", "--channels", "1", "--option", "temperature=0.5",
            "--checkpoint", str(ckpt), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    rows = _read_csv(out)
    assert [r["file"] for r in rows] == [f"images/case{i:02d}.png" for i in range(24, 48)]
    assert list(rows[0])[3:] == [f"prob_{n}" for n in names]
    probs = torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    for r, p in zip(rows, probs):
        assert r["prediction"] == ";".join(n for n, v in zip(names, p.tolist()) if v > 0.5)
    description = make_description("multilabel", names)
    _, expected = run_challenge(learner, tmp_path / "support", tmp_path / "query" / "query.csv", description,
                                tmp_path / "api.csv", channels=1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    # the checkpoint was loaded: a fresh learner (no checkpoint) predicts otherwise
    torch.manual_seed(0)
    fresh = ProtoNet(create_backbone("medmeta_conv4_tiny", in_chans=1), temperature=0.5)
    _, other = run_challenge(fresh, tmp_path / "support", tmp_path / "query" / "query.csv", description,
                             tmp_path / "fresh.csv", channels=1)
    assert not torch.allclose(other, expected, atol=1e-4)


def test_command_line_bad_input_exits_with_a_clear_message(tmp_path, capsys):
    src = class_source(counts=(4, 4, 4), noise=0.05)
    bad = tmp_path / "bad.pt"
    save_tensor_file(bad, {"support_images": src.images[:6], "support_labels": torch.tensor([0, 1, 2, 0, 1, 5]),
                           "query_images": src.images[6:]})
    base = ["predict", "--learner", "protonet", "--backbone", "medmeta_conv4_tiny", "--channels", "1",
            "--out", str(tmp_path / "p.csv")]
    for args, message in [
        (["--support", str(bad), "--task-kind", "multiclass", "--classes", "a,b,c"], "labels outside 0..2"),
        (["--support", str(bad)], "--task-kind and --classes are required"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("medmeta-challenge: error: ") and message in err
    rgb = tmp_path / "rgb.pt"
    save_tensor_file(rgb, {"support_images": src.images[:6], "support_labels": torch.tensor([0, 1, 2, 0, 1, 2]),
                           "query_images": src.images[6:].expand(-1, 3, -1, -1)})
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--support", str(rgb), "--task-kind", "multiclass", "--classes", "a,b,c"])
    assert exit_info.value.code == 2 and "3 channels" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()

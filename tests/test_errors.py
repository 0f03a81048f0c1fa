"""One error root: every error medmeta raises on purpose is a MedMetaError; the ones a user can
fix are UserErrors (keeping the built-in base callers catch), and every console command ends
one with one stderr line ``<app>: error: ...`` and exit status 2."""
from __future__ import annotations

import configparser
import importlib
import logging
import re
import sys
from pathlib import Path

import pytest

import medmeta
from medmeta import errors
from medmeta.errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    DataFormatError,
    InsufficientDataError,
    MedMetaError,
    MissingDataError,
    MissingDependencyError,
    UnknownNameError,
    UntrustedFileError,
    UserError,
    exit_on_user_error,
    known_names,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(medmeta.__file__).resolve().parent


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (ConfigError, ValueError),
        (DataFormatError, ValueError),
        (MissingDataError, FileNotFoundError),
        (UnknownNameError, KeyError),
        (UnknownNameError, ValueError),
        (InsufficientDataError, ValueError),
        (CheckpointError, ValueError),
        (ArgumentError, TypeError),
        (ArgumentError, ValueError),
        (MissingDependencyError, ModuleNotFoundError),
        (UntrustedFileError, PermissionError),
    ],
)
def test_user_errors_keep_the_builtin_base_callers_catch(cls, builtin):
    assert issubclass(cls, UserError) and issubclass(cls, builtin)
    # the message reads as given: no KeyError quotes, no OSError "[Errno ...]"
    assert str(cls("data.root=/x: the folder does not exist")) == "data.root=/x: the folder does not exist"


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every ``class ...Error(...)`` defined in the package source."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in re.findall(r"^class (\w+Error)\(", path.read_text(), flags=re.M):
            module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
            found.append((module, name))
    return found


def test_every_error_class_in_the_package_is_under_the_root():
    classes = _error_classes()
    names = {name for _, name in classes}
    # the ones the command lines and batch runs rely on are all found by the scan
    assert {"SlideError", "AnnotationError", "StainNormalizationError"} <= names
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, MedMetaError), f"{module}.{name} is not a MedMetaError"
    assert not (PACKAGE / "data" / "errors.py").exists() and not (PACKAGE / "training" / "app_errors.py").exists()


def test_purposeful_errors_of_the_adapters_are_user_errors():
    from medmeta.adapters.slides.detection.annotations import AnnotationError
    from medmeta.adapters.slides.errors import BackendUnavailableError, SlideError, SlideOpenError
    from medmeta.adapters.slides.stain import StainNormalizationError
    from medmeta.episodes import InsufficientDataError as EpisodesInsufficientDataError

    assert EpisodesInsufficientDataError is InsufficientDataError
    for cls in (SlideError, SlideOpenError, BackendUnavailableError, AnnotationError, StainNormalizationError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls


def test_known_names_lists_the_closest_first():
    assert known_names("mamll", ["protonet", "maml", "fomaml"], what="learners") == (
        "did you mean 'maml', 'fomaml'? Known learners: 'maml', 'fomaml', 'protonet'"
    )
    assert known_names("x", ["b", "a"]) == "known: 'a', 'b'"
    assert known_names("x", []) == "none exist"
    assert known_names("x", [], what="segmenters") == "no segmenters exist"


def test_exit_on_user_error_prints_one_line_and_exits_2(capsys, caplog):
    def fail(path: str) -> None:
        raise MissingDataError(f"{path}: file not found")

    with caplog.at_level(logging.ERROR, logger="medmeta"), pytest.raises(SystemExit) as exit_info:
        exit_on_user_error("medmeta-x", fail, "/no/such.file")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "medmeta-x: error: /no/such.file: file not found\n"
    assert "MissingDataError: /no/such.file: file not found" in caplog.text
    # a bug is not a user error: it keeps its type (and traceback)
    with pytest.raises(ZeroDivisionError):
        exit_on_user_error("medmeta-x", lambda: 1 / 0)
    assert exit_on_user_error("medmeta-x", lambda a, b=0: a + b, 1, b=2) == 3


def _console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)  # type: ignore[misc]


def _bad_arguments(app: str, tmp: Path) -> tuple[list[str], str, str]:
    """Arguments naming missing files, the error line's prefix and a part of its message."""
    missing = tmp / "missing"
    if app in ("medmeta-train", "medmeta-evaluate"):  # Hydra apps read sys.argv
        return ["data=medimeta", f"data.root={missing}", f"hydra.run.dir={tmp / 'run'}"], app, "the folder does not exist"
    if app == "medmeta-challenge":
        return ["convert", str(missing / "task.pkl"), "--out", str(tmp / "t.safetensors"), "--trust-pickle"], app, \
            "task.pkl does not exist"
    if app == "medmeta-visiomel":
        return ["--data-dir", str(missing), "--assets", str(missing), "--output", str(tmp / "s.csv")], app, \
            "submission_format.csv does not exist"
    if app == "medmeta-detect":
        return ["score", "--submission", str(missing), "--annotations", str(missing)], f"{app} score", \
            "does not exist"
    if app == "medmeta-flare":
        return ["--input", str(missing), "--output", str(tmp / "out"), "--support-images", str(missing),
                "--support-labels", str(missing)], app, "not found"
    raise AssertionError(f"no bad arguments for the new console script {app}: add them here")


SCRIPTS = _console_scripts()


@pytest.fixture
def restore_logging():
    """The apps configure logging (Hydra, ``basicConfig``) for their process: undo it after the test."""
    loggers = [logging.getLogger(), logging.getLogger("medmeta")]
    saved = [(lg, list(lg.handlers), lg.level) for lg in loggers]
    yield
    for lg, handlers, level in saved:
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)


@pytest.mark.parametrize("app", sorted(SCRIPTS))
def test_console_entry_points_end_a_user_error_with_one_line_and_status_2(
    app, tmp_path, monkeypatch, capsys, restore_logging
):
    module, function = SCRIPTS[app].split(":")
    main = getattr(importlib.import_module(module), function)
    args, prefix, message = _bad_arguments(app, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        if app in ("medmeta-train", "medmeta-evaluate"):
            monkeypatch.setattr(sys, "argv", [app, *args])
            main()
        else:
            main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prefix}: error: ")]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    # said once on the console (log files may record it too)
    assert sum(message in line for line in err.splitlines()) == 1, err


def test_every_console_script_is_covered():
    assert set(SCRIPTS) == {
        "medmeta-train", "medmeta-evaluate", "medmeta-challenge", "medmeta-visiomel", "medmeta-detect", "medmeta-flare"
    }
    assert all(hasattr(errors, name) for name in errors.__all__)

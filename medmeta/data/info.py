"""``info.yaml``: the description of one MedIMeta dataset and its tasks, parsed and validated.

The file is read with ``yaml.safe_load`` (YAML 1.1 integers such as ``109_309`` are ints). Every
problem is reported with the file and the field, e.g.
``.../bus/info.yaml: field 'tasks[1].task_target': unknown task target 'BINARY'; expected ...``.
Keys this module does not interpret (``project_website``, ``DOI``, ``original_data``, ...) are
kept in :attr:`DatasetInfo.extra` and written back unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from medmeta.errors import DataFormatError, MissingDataError, UnknownNameError, known_names
from medmeta.tasks import TaskDescription, TaskTarget

__all__ = ["SPLIT_NAMES", "TaskInfo", "DatasetInfo", "read_info"]

SPLIT_NAMES = ("train", "val", "test")
"""The split names of MedIMeta's ``splits/`` and ``original_splits/`` folders."""

_KEY_ORDER = (
    "id",
    "name",
    "summary",
    "domain",
    "tasks",
    "input_size",
    "total_num_samples",
    "splits_num_samples",
    "original_splits_num_samples",
    "domain_overlaps",
    "subject_overlaps",
    "license",
)
_REQUIRED = ("id", "name", "domain", "tasks", "input_size", "total_num_samples", "splits_num_samples")


def _fail(where: str, field_name: str, message: str) -> DataFormatError:
    return DataFormatError(f"{where}: field '{field_name}': {message}")


def _as_int(value: Any, where: str, field_name: str, minimum: int = 0) -> int:
    """An integer field (YAML int, or a string such as ``"109_309"``), at least ``minimum``."""
    if isinstance(value, bool):
        raise _fail(where, field_name, f"expected an integer >= {minimum}, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _fail(where, field_name, f"expected an integer >= {minimum}, got {value!r}") from None
    if hasattr(value, "__index__"):
        value = int(value)
    if not isinstance(value, int) or value < minimum:
        raise _fail(where, field_name, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _as_text(value: Any, where: str, field_name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise _fail(where, field_name, f"expected a {'' if allow_empty else 'non-empty '}string, got {value!r}")
    return value


def _as_name_list(value: Any, where: str, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _fail(where, field_name, f"expected a list of dataset ids, got {value!r}")
    return tuple(value)


def _as_counts(value: Any, where: str, field_name: str, total: int) -> dict[str, int]:
    if not isinstance(value, Mapping) or not value:
        raise _fail(where, field_name, f"expected a mapping of split name to count (train, val, test), got {value!r}")
    counts = {}
    for name, count in value.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise _fail(where, field_name, f"split names must be plain strings, got {name!r}")
        counts[name] = _as_int(count, where, f"{field_name}.{name}")
    if sum(counts.values()) != total:
        raise _fail(
            where,
            field_name,
            f"the split counts {counts} sum to {sum(counts.values())}, expected total_num_samples = {total}",
        )
    return counts


@dataclass(frozen=True)
class TaskInfo:
    """One entry of ``tasks`` in ``info.yaml``: a name, a target and ``{label key: class name}``.

    Keys are the raw integers stored in ``task_labels/<task_name>.npy`` (multi-class, binary,
    ordinal; ordinal keys may have gaps) or the column indices ``0..K-1`` (multi-label).
    """

    task_name: str
    task_target: TaskTarget
    labels: dict[int, str]

    @property
    def label_keys(self) -> tuple[int, ...]:
        return tuple(sorted(self.labels))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.labels[k] for k in self.label_keys)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def description(self, dataset_info: "DatasetInfo") -> TaskDescription:
        """The shared task description: ``"<info name>: <task name>"``, domain, sorted keys."""
        return TaskDescription(
            task_target=self.task_target,
            classes=self.classes,
            task_identifier=f"{dataset_info.name}: {self.task_name}",
            domain_identifier=dataset_info.domain,
            label_keys=self.label_keys,
            dataset_id=dataset_info.id,
            task_name=self.task_name,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_name": self.task_name,
            "task_target": self.task_target.value,
            "labels": {int(k): str(self.labels[k]) for k in self.label_keys},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "<info>", field_name: str = "tasks[0]") -> "TaskInfo":
        """Parse and validate one task entry; errors name ``where`` and ``field_name``."""
        if not isinstance(data, Mapping):
            raise _fail(where, field_name, f"expected a mapping with task_name, task_target, labels; got {data!r}")
        for key in ("task_name", "task_target", "labels"):
            if key not in data:
                raise _fail(where, f"{field_name}.{key}", "missing (every task needs task_name, task_target and labels)")
        name = data["task_name"]
        if isinstance(name, (int, float)) and not isinstance(name, bool):
            name = str(name)
        name = _as_text(name, where, f"{field_name}.task_name")
        if "/" in name or "\\" in name or "\0" in name or name.strip() != name or name in (".", ".."):
            raise _fail(
                where,
                f"{field_name}.task_name",
                f"{name!r} cannot be a file name (task_labels/<task name>.npy); no slashes or surrounding spaces",
            )
        try:
            target = TaskTarget.parse(data["task_target"], where=f"{where}: field '{field_name}.task_target'")
        except ValueError as err:
            raise DataFormatError(str(err)) from None
        raw_labels = data["labels"]
        if raw_labels is None:
            raw_labels = {}
        if not isinstance(raw_labels, Mapping):
            raise _fail(where, f"{field_name}.labels", f"expected a mapping of integer key to class name, got {raw_labels!r}")
        labels: dict[int, str] = {}
        for key, label in raw_labels.items():
            k = _as_int(key, where, f"{field_name}.labels", minimum=-(2**62))
            if k in labels:
                raise _fail(where, f"{field_name}.labels", f"key {k} appears twice")
            labels[k] = str(label)
        if target.is_classification and not labels:
            raise _fail(where, f"{field_name}.labels", f"a {target.value} task needs at least one label")
        if target is TaskTarget.BINARY_CLASSIFICATION and len(labels) != 2:
            raise _fail(
                where, f"{field_name}.labels", f"a BINARY_CLASSIFICATION task needs exactly 2 labels, got {sorted(labels)}"
            )
        if target is TaskTarget.MULTILABEL_CLASSIFICATION and sorted(labels) != list(range(len(labels))):
            raise _fail(
                where,
                f"{field_name}.labels",
                f"multi-label keys are label-file columns and must be 0..{len(labels) - 1}, got {sorted(labels)}",
            )
        return cls(task_name=name, task_target=target, labels=labels)


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's ``info.yaml`` (see ``MEDIMETA_FORMAT``): identity, domain, tasks and counts.

    ``original_splits_num_samples`` is ``None`` for a dataset without ``original_splits/``
    (user data); every MedIMeta v1.0 dataset has it.
    """

    id: str
    name: str
    domain: str
    tasks: tuple[TaskInfo, ...]
    input_size: tuple[int, int, int]
    total_num_samples: int
    splits_num_samples: dict[str, int]
    original_splits_num_samples: Optional[dict[str, int]] = None
    domain_overlaps: tuple[str, ...] = ()
    subject_overlaps: tuple[str, ...] = ()
    summary: str = ""
    license: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = field(default=None, compare=False)

    # -- access --------------------------------------------------------------------------------
    @property
    def num_channels(self) -> int:
        return int(self.input_size[0])

    @property
    def task_names(self) -> list[str]:
        return [t.task_name for t in self.tasks]

    @property
    def overlaps(self) -> tuple[str, ...]:
        """``domain_overlaps`` then ``subject_overlaps``, without repeats."""
        return tuple(dict.fromkeys(self.domain_overlaps + self.subject_overlaps))

    def task(self, task_name: str) -> TaskInfo:
        """The task called ``task_name``; an unknown name lists the dataset's tasks."""
        for t in self.tasks:
            if t.task_name == task_name:
                return t
        raise UnknownNameError(
            f"dataset {self.id!r} ({self._where()}) has no task {task_name!r}; "
            f"{known_names(task_name, self.task_names)}"
        )

    def split_counts(self, original: bool = False) -> dict[str, int]:
        """``splits_num_samples`` (or ``original_splits_num_samples``; empty when absent)."""
        if original:
            return dict(self.original_splits_num_samples or {})
        return dict(self.splits_num_samples)

    def _where(self) -> str:
        return str(self.path) if self.path is not None else f"info of {self.id!r}"

    # -- parsing / writing ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str = "<info dict>", path: Optional[Path] = None) -> "DatasetInfo":
        """Parse and validate an info mapping; errors start with ``where`` and name the field."""
        if not isinstance(data, Mapping):
            raise DataFormatError(f"{where}: expected a YAML mapping of info fields, got {type(data).__name__}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise DataFormatError(
                f"{where}: missing required field(s) {missing}; an info.yaml needs {list(_REQUIRED)}"
            )
        dataset_id = data["id"]
        dataset_id = _as_text(dataset_id, where, "id")
        if "/" in dataset_id or "\\" in dataset_id or dataset_id in (".", "..") or dataset_id.strip() != dataset_id:
            raise _fail(where, "id", f"{dataset_id!r} cannot be a folder name")
        name = _as_text(data["name"], where, "name")
        domain = _as_text(data["domain"], where, "domain")
        raw_tasks = data["tasks"]
        if not isinstance(raw_tasks, (list, tuple)) or not raw_tasks:
            raise _fail(where, "tasks", f"expected a non-empty list of tasks, got {raw_tasks!r}")
        tasks = tuple(TaskInfo.from_dict(t, where, f"tasks[{i}]") for i, t in enumerate(raw_tasks))
        names = [t.task_name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise _fail(where, "tasks", f"task names must be unique, repeated: {dupes}")
        size = data["input_size"]
        if not isinstance(size, (list, tuple)) or len(size) != 3:
            raise _fail(where, "input_size", f"expected [C, H, W] such as [3, 224, 224], got {size!r}")
        input_size = tuple(_as_int(v, where, f"input_size[{i}]", minimum=1) for i, v in enumerate(size))
        if input_size[0] not in (1, 3):
            raise _fail(where, "input_size", f"channels must be 1 or 3, got {list(input_size)}")
        total = _as_int(data["total_num_samples"], where, "total_num_samples")
        splits = _as_counts(data["splits_num_samples"], where, "splits_num_samples", total)
        original = data.get("original_splits_num_samples")
        if original is not None:
            original = _as_counts(original, where, "original_splits_num_samples", total)
        summary = data.get("summary") or ""
        license_text = data.get("license") or ""
        extra = {k: v for k, v in data.items() if k not in _KEY_ORDER}
        return cls(
            id=dataset_id,
            name=name,
            domain=domain,
            tasks=tasks,
            input_size=input_size,  # type: ignore[arg-type]
            total_num_samples=total,
            splits_num_samples=splits,
            original_splits_num_samples=original,
            domain_overlaps=_as_name_list(data.get("domain_overlaps"), where, "domain_overlaps"),
            subject_overlaps=_as_name_list(data.get("subject_overlaps"), where, "subject_overlaps"),
            summary=_as_text(summary, where, "summary", allow_empty=True),
            license=_as_text(license_text, where, "license", allow_empty=True),
            extra=extra,
            path=path,
        )

    @classmethod
    def from_yaml(cls, path: "str | Path") -> "DatasetInfo":
        """Read and validate an ``info.yaml`` file."""
        path = Path(path)
        if not path.is_file():
            raise MissingDataError(f"{path}: info.yaml not found (every dataset folder needs one)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise DataFormatError(f"{path}: not valid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not UTF-8 text: {err}") from None
        return cls.from_dict(data, where=str(path), path=path)

    def to_dict(self) -> dict[str, Any]:
        """The info as plain YAML-ready data, keys in MedIMeta's order."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "summary": self.summary,
            "domain": self.domain,
            "tasks": [t.to_dict() for t in self.tasks],
            "input_size": [int(v) for v in self.input_size],
            "total_num_samples": int(self.total_num_samples),
            "splits_num_samples": {k: int(v) for k, v in self.splits_num_samples.items()},
        }
        if self.original_splits_num_samples is not None:
            out["original_splits_num_samples"] = {k: int(v) for k, v in self.original_splits_num_samples.items()}
        out["domain_overlaps"] = list(self.domain_overlaps)
        out["subject_overlaps"] = list(self.subject_overlaps)
        out["license"] = self.license
        out.update(self.extra)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def read_info(dataset_dir: "str | Path") -> DatasetInfo:
    """The validated ``info.yaml`` of a dataset folder."""
    return DatasetInfo.from_yaml(Path(dataset_dir) / "info.yaml")


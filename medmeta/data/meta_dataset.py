"""MetaDataset: every (dataset, task) pair under a MedIMeta-format root, with filters and hold-outs.

A root holds one folder per dataset, each with an ``info.yaml`` (see :mod:`medmeta.data.layout`).
:class:`MetaDataset` lists the tasks with their domain, target, size and class counts, keeps a
subset (:meth:`MetaDataset.filter`), leaves out a held-out target with the datasets its
``domain_overlaps`` and ``subject_overlaps`` name (:meth:`MetaDataset.held_out`, as in the
MedIMeta paper's leave-one-out experiments), opens a task as a
:class:`~medmeta.data.medimeta.MedIMetaTaskSource` (:meth:`MetaDataset.source`, at the
meta-dataset's default ``image_size``), and selects the train / validation / test tasks of an
experiment (:func:`plan_tasks`, :class:`TaskPlan`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from medmeta.data.info import DatasetInfo, read_info
from medmeta.data.layout import HDF5_FILE, INFO_FILE, LABEL_DIR, load_task_labels
from medmeta.data.medimeta import MedIMetaTaskSource, class_counts
from medmeta.errors import ConfigError, DataFormatError, MissingDataError, UnknownNameError, known_names
from medmeta.tasks import TaskDescription, TaskTarget

__all__ = ["TaskEntry", "TaskPlan", "MetaDataset", "discover_datasets", "plan_tasks"]


@dataclass(frozen=True)
class TaskEntry:
    """One task of one dataset, as listed by :attr:`MetaDataset.tasks`.

    ``target`` is the name used in ``info.yaml`` (e.g. ``"ORDINAL_REGRESSION"``); ``num_samples``
    counts every image of the dataset; ``class_counts`` maps each label key to its number of
    images (multi-label: positives per label column); ``description`` is the task's
    :class:`~medmeta.tasks.TaskDescription` (classes, raw label keys, identifiers).
    """

    dataset_id: str
    task_name: str
    domain: str
    target: str
    num_classes: int
    num_samples: int
    class_counts: Mapping[int, int] = field(default_factory=dict, hash=False)
    description: Optional[TaskDescription] = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset_id, self.task_name)

    @property
    def task_target(self) -> TaskTarget:
        return TaskTarget.parse(self.target)


def discover_datasets(root: "str | Path") -> dict[str, DatasetInfo]:
    """The validated infos of the datasets under ``root``, by id (``root`` may itself be a dataset
    folder). Hidden folders (``.name``, e.g. unfinished writes) and folders that hold neither
    ``info.yaml`` nor dataset files are skipped; a folder with ``images.hdf5`` or ``task_labels/``
    but no ``info.yaml`` is an error."""
    root = Path(root).expanduser()
    if not root.exists():
        raise MissingDataError(f"{root}: data root not found (expected a folder with one sub-folder per dataset, each "
                               f"holding {INFO_FILE})")
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a folder (expected a MedIMeta-format data root)")
    if (root / INFO_FILE).is_file():
        info = read_info(root)
        return {info.id: info}
    found: dict[str, DatasetInfo] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (sub / INFO_FILE).is_file():
            if (sub / HDF5_FILE).exists() or (sub / LABEL_DIR).is_dir():  # a dataset folder without its info
                raise MissingDataError(f"{sub / INFO_FILE}: info.yaml not found (every dataset folder needs one; "
                                       f"{sub} holds {HDF5_FILE} or {LABEL_DIR}/)")
            continue
        info = read_info(sub)
        if info.id in found:
            raise DataFormatError(
                f"{sub / INFO_FILE}: field 'id': dataset id {info.id!r} is also used by {found[info.id].path}; ids must "
                f"be unique under {root}"
            )
        found[info.id] = info
    if not found:
        raise MissingDataError(f"{root}: no datasets found (expected sub-folders holding {INFO_FILE})")
    return found


def _sizes(size: Union[int, Sequence[int]]) -> list[int]:
    return [int(size)] if isinstance(size, int) else [int(v) for v in size]


def _names(value: Union[str, Iterable[str], None], argument: str) -> Optional[list[str]]:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else [str(v) for v in value]
    return names


class MetaDataset:
    """The datasets and tasks under a MedIMeta-format root (see module doc).

    Args:
        root: the data root (one folder per dataset), or a single dataset folder.
        dataset_ids: keep only these datasets (unknown ids raise, listing the known ones).
        channels / normalize / image_format / image_size: defaults for :meth:`source` (see
            :class:`~medmeta.data.medimeta.MedIMetaTaskSource`; ``channels=3`` and
            ``normalize="imagenet"`` reproduce the MedIMeta paper's experiments;
            ``image_size=None`` reads images at their stored size, an int resizes every image).
    """

    def __init__(
        self,
        root: "str | Path",
        dataset_ids: Optional[Sequence[str]] = None,
        *,
        channels: Optional[int] = None,
        normalize: Optional[str] = "official",
        image_format: str = "hdf5",
        image_size: Union[int, Sequence[int], None] = None,
        _infos: Optional[dict[str, DatasetInfo]] = None,
        _left_out: Sequence[str] = (),
    ) -> None:
        self.root = Path(root).expanduser()
        infos = dict(_infos) if _infos is not None else discover_datasets(self.root)
        ids = _names(dataset_ids, "dataset_ids")
        if ids is not None:
            for i in ids:
                if i not in infos:
                    raise UnknownNameError(f"dataset_ids: unknown dataset id {i!r} under {self.root}; "
                                           f"{known_names(i, infos)}")
            infos = {i: infos[i] for i in infos if i in ids}
        self.datasets: dict[str, DatasetInfo] = infos
        self.channels = channels
        self.normalize = normalize
        self.image_format = image_format
        if image_size is not None and min(_sizes(image_size)) < 1:
            raise ValueError(f"MetaDataset: image_size must be None or positive, got {image_size}")
        self.image_size = image_size
        self.left_out: tuple[str, ...] = tuple(_left_out)
        self._entries: Optional[list[TaskEntry]] = None
        self._sources: dict[Any, MedIMetaTaskSource] = {}
        self._pid = os.getpid()

    # -- listing ---------------------------------------------------------------------------------
    @property
    def dataset_ids(self) -> list[str]:
        return list(self.datasets)

    @property
    def domains(self) -> list[str]:
        return sorted({info.domain for info in self.datasets.values()})

    @property
    def tasks(self) -> list[TaskEntry]:
        """Every (dataset, task) pair, in dataset-id then info.yaml order."""
        if self._entries is None:
            self._entries = [self._entry(info, t.task_name) for info in self.datasets.values() for t in info.tasks]
        return list(self._entries)

    def _entry(self, info: DatasetInfo, task_name: str) -> TaskEntry:
        task = info.task(task_name)
        counts = self._stored_class_counts(info, task_name)
        if counts is None:
            labels = load_task_labels(self.dataset_dir(info.id), info, task)
            counts = class_counts(labels, task)
        return TaskEntry(
            dataset_id=info.id,
            task_name=task.task_name,
            domain=info.domain,
            target=task.task_target.value,
            num_classes=task.num_classes,
            num_samples=info.total_num_samples,
            class_counts=counts,
            description=task.description(info),
        )

    @staticmethod
    def _stored_class_counts(info: DatasetInfo, task_name: str) -> Optional[dict[int, int]]:
        """``class_counts`` written by :func:`medmeta.data.writer.write_dataset`, when consistent."""
        stored = info.extra.get("class_counts")
        if not isinstance(stored, Mapping) or not isinstance(stored.get(task_name), Mapping):
            return None
        task = info.task(task_name)
        try:
            counts = {int(k): int(v) for k, v in stored[task_name].items()}
        except (TypeError, ValueError):
            return None
        if sorted(counts) != list(task.label_keys):
            return None
        return {k: counts[k] for k in task.label_keys}

    def task(self, dataset_id: str, task_name: str) -> TaskEntry:
        """The entry of one task; unknown names list what exists."""
        info = self.info(dataset_id)
        info.task(task_name)  # raises with the known task names
        for entry in self.tasks:
            if entry.dataset_id == dataset_id and entry.task_name == task_name:
                return entry
        raise UnknownNameError(f"task {dataset_id}/{task_name}: not found")  # pragma: no cover

    def info(self, dataset_id: str) -> DatasetInfo:
        """The info of a dataset; an unknown id lists the known ones (and says if it was left out)."""
        if dataset_id not in self.datasets:
            note = f" (left out as an overlap of the held-out target: {list(self.left_out)})" if dataset_id in self.left_out else ""
            raise UnknownNameError(
                f"dataset_id={dataset_id!r}: no such dataset in this meta-dataset{note} ({self.root}); "
                f"{known_names(dataset_id, self.datasets)}"
            )
        return self.datasets[dataset_id]

    def dataset_dir(self, dataset_id: str) -> Path:
        info = self.info(dataset_id)
        return info.path.parent if info.path is not None else self.root / dataset_id

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, key: Any) -> bool:
        if isinstance(key, str):
            return key in self.datasets
        try:
            ds, name = key
        except (TypeError, ValueError):
            return False
        return ds in self.datasets and name in self.datasets[ds].task_names

    def __repr__(self) -> str:
        return (f"MetaDataset({str(self.root)!r}, {len(self.datasets)} datasets, {len(self.tasks)} tasks, "
                f"{len(self.domains)} domains)")

    # -- subsets ---------------------------------------------------------------------------------
    def _subset(self, ids: Iterable[str], left_out: Sequence[str] = ()) -> "MetaDataset":
        keep = set(ids)
        sub = MetaDataset(
            self.root,
            channels=self.channels,
            normalize=self.normalize,
            image_format=self.image_format,
            image_size=self.image_size,
            _infos={i: info for i, info in self.datasets.items() if i in keep},
            _left_out=tuple(dict.fromkeys([*self.left_out, *left_out])),
        )
        if self._entries is not None:
            sub._entries = [e for e in self._entries if e.dataset_id in keep]
        return sub

    def filter(
        self,
        dataset_ids: Union[str, Sequence[str], None] = None,
        domains: Union[str, Sequence[str], None] = None,
        targets: Union[str, TaskTarget, Sequence[Union[str, TaskTarget]], None] = None,
    ) -> "MetaDataset":
        """The datasets matching every given criterion; with ``targets``, :attr:`tasks` keeps only
        tasks of those targets. Unknown ids, domains or targets raise, listing the known ones."""
        ids = _names(dataset_ids, "dataset_ids")
        for i in ids or []:
            if i not in self.datasets:
                self.info(i)
        doms = _names(domains, "domains")
        for d in doms or []:
            if d not in self.domains:
                raise UnknownNameError(f"domains: unknown domain {d!r}; {known_names(d, self.domains)}")
        keep = [
            i for i, info in self.datasets.items()
            if (ids is None or i in ids) and (doms is None or info.domain in doms)
        ]
        sub = self._subset(keep)
        if targets is not None:
            raw = [targets] if isinstance(targets, (str, TaskTarget)) else list(targets)
            wanted = {TaskTarget.parse(t, where="targets") for t in raw}
            sub._entries = [e for e in sub.tasks if e.task_target in wanted]
            sub.datasets = {i: info for i, info in sub.datasets.items() if any(e.dataset_id == i for e in sub._entries)}
        return sub

    def overlaps_of(self, dataset_id: str) -> list[str]:
        """Ids the dataset's ``domain_overlaps`` and ``subject_overlaps`` name (present or not)."""
        return list(self.info(dataset_id).overlaps)

    def held_out(self, target_id: str) -> "MetaDataset":
        """The meta-dataset without ``target_id`` and the datasets its ``domain_overlaps`` and
        ``subject_overlaps`` name: the pre-training pool of a leave-one-out experiment.
        Overlap ids not present under the root (e.g. renamed datasets) are ignored."""
        info = self.info(target_id)
        drop = [target_id, *info.overlaps]
        return self._subset([i for i in self.datasets if i not in drop], left_out=[d for d in drop if d in self.datasets])

    # -- opening tasks ---------------------------------------------------------------------------
    def source(
        self,
        dataset_id: str,
        task_name: str,
        split: Union[str, Sequence[str], None] = "train",
        original_splits: bool = False,
        image_size: Union[int, Sequence[int], None] = None,
        transform: Optional[Callable[..., Any]] = None,
        **kwargs: Any,
    ) -> MedIMetaTaskSource:
        """Open one task as a :class:`~medmeta.data.medimeta.MedIMetaTaskSource`.

        ``split`` is a split name, a list of names, or ``None`` for every image;
        ``original_splits=True`` reads ``original_splits/`` instead of ``splits/``;
        ``image_size=None`` uses the meta-dataset's ``image_size``. Further keyword arguments (``channels``, ``normalize``, ``image_format``) override the
        meta-dataset's defaults. Sources without a ``transform`` are cached per process.
        """
        info = self.info(dataset_id)
        info.task(task_name)
        if image_size is None:
            image_size = self.image_size
        options: dict[str, Any] = {"channels": self.channels, "normalize": self.normalize, "image_format": self.image_format}
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise TypeError(f"MetaDataset.source: unexpected argument(s) {unknown}; accepted: split, original_splits, "
                            f"image_size, transform, {', '.join(options)}")
        options.update(kwargs)
        split_key = tuple(split) if isinstance(split, (list, tuple)) else split
        key = (dataset_id, task_name, split_key, bool(original_splits),
               tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size, tuple(sorted(options.items())))
        if os.getpid() != self._pid:
            self._sources, self._pid = {}, os.getpid()
        if transform is None and key in self._sources:
            return self._sources[key]
        source = MedIMetaTaskSource(
            self.dataset_dir(dataset_id),
            dataset_id,
            task_name,
            split=None if original_splits else split,
            original_split=split if original_splits else None,
            transform=transform,
            image_size=image_size,
            info=info,
            **options,
        )
        if transform is None:
            self._sources[key] = source
        return source

    def plan_tasks(
        self,
        train: Any = None,
        val: Any = None,
        test: Any = None,
        target: Optional[str] = None,
        need: Sequence[str] = ("train", "val", "test"),
        where: str = "data",
    ) -> "TaskPlan":
        """The train / val / test tasks of an experiment (see :func:`plan_tasks`)."""
        return plan_tasks(self, train, val, test, target=target, need=need, where=where)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sources"] = {}
        return state

    # -- reports ---------------------------------------------------------------------------------
    def summary(self) -> "Any":
        """One row per task: ids, domain, target, classes, images per split, class counts."""
        import pandas as pd

        rows = []
        for e in self.tasks:
            info = self.datasets[e.dataset_id]
            counts = info.split_counts()
            rows.append({
                "dataset_id": e.dataset_id,
                "task_name": e.task_name,
                "domain": e.domain,
                "target": e.target,
                "num_classes": e.num_classes,
                "num_samples": e.num_samples,
                "train": counts.get("train", 0),
                "val": counts.get("val", 0),
                "test": counts.get("test", 0),
                "input_size": "x".join(str(v) for v in info.input_size),
                "class_counts": dict(e.class_counts),
                "min_class_count": int(min(e.class_counts.values())) if e.class_counts else 0,
            })
        columns = ["dataset_id", "task_name", "domain", "target", "num_classes", "num_samples", "train", "val", "test",
                   "input_size", "class_counts", "min_class_count"]
        return pd.DataFrame(rows, columns=columns)


# task selection of an experiment ---------------------------------------------------------------
@dataclass
class TaskPlan:
    """The ``(dataset_id, task_name)`` pairs of each phase, and what the target left out."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    left_out: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": [f"{d}/{t}" for d, t in self.train],
            "val": [f"{d}/{t}" for d, t in self.val],
            "test": [f"{d}/{t}" for d, t in self.test],
            "left_out_datasets": list(self.left_out),
        }


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):  # dicts and OmegaConf DictConfigs
        return obj.get(key, default)
    return getattr(obj, key, default)


def _entry_target(entry: Any) -> TaskTarget:
    return TaskTarget.parse(getattr(entry, "target"))


def _classification(entry: Any) -> bool:
    from medmeta.episodes.labels import SUPPORTED_TARGETS

    return _entry_target(entry) in SUPPORTED_TARGETS


def _select(entries: Sequence[Any], sel: Any, where: str, all_entries: Sequence[Any]) -> list[tuple[str, str]]:
    """Apply one task selection (:class:`~medmeta.config.TaskSelection`) to task entries,
    validating every name against ``all_entries``."""
    known_ids = sorted({e.dataset_id for e in all_entries})
    known_domains = sorted({str(e.domain) for e in all_entries})
    known_tasks = {(e.dataset_id, e.task_name) for e in all_entries}

    def names(key: str) -> Optional[list[str]]:
        value = _get(sel, key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in value]

    ids, domains, targets, tasks = names("dataset_ids"), names("domains"), names("targets"), names("tasks")
    exclude = names("exclude") or []
    for i in ids or []:
        if i not in known_ids:
            raise ConfigError(f"{where}.dataset_ids: unknown dataset id {i!r}; the meta-dataset has {known_ids}")
    for d in domains or []:
        if d not in known_domains:
            raise ConfigError(f"{where}.domains: unknown domain {d!r}; the meta-dataset has {known_domains}")
    parsed_targets = None
    if targets is not None:
        parsed_targets = {TaskTarget.parse(t, where=f"{where}.targets") for t in targets}

    def parse_task(text: str, key: str) -> tuple[str, str]:
        if "/" not in text:
            raise ConfigError(f"{where}.{key}: {text!r} should be 'dataset_id/task_name'")
        ds, name = text.split("/", 1)
        if ds not in known_ids:
            raise ConfigError(f"{where}.{key}: unknown dataset id {ds!r} in {text!r}; the meta-dataset has {known_ids}")
        if (ds, name) not in known_tasks:
            have = sorted(t for d, t in known_tasks if d == ds)
            raise ConfigError(f"{where}.{key}: dataset {ds!r} has no task {name!r}; its tasks are {have}")
        return ds, name

    explicit = None if tasks is None else [parse_task(t, "tasks") for t in tasks]
    excluded_ids: set[str] = set()
    excluded_tasks: set[tuple[str, str]] = set()
    for item in exclude:
        if "/" in item:
            excluded_tasks.add(parse_task(item, "exclude"))
        elif item in known_ids:
            excluded_ids.add(item)
        else:
            raise ConfigError(
                f"{where}.exclude: {item!r} is neither a dataset id nor 'dataset_id/task_name'; dataset ids are {known_ids}"
            )
    out = []
    for e in entries:
        key = (e.dataset_id, e.task_name)
        if explicit is not None and key not in explicit:
            continue
        if ids is not None and e.dataset_id not in ids:
            continue
        if domains is not None and str(e.domain) not in domains:
            continue
        if parsed_targets is not None and _entry_target(e) not in parsed_targets:
            continue
        if e.dataset_id in excluded_ids or key in excluded_tasks:
            continue
        if not _classification(e):
            if explicit is not None:
                raise ConfigError(
                    f"{where}.tasks: {e.dataset_id}/{e.task_name} has target {_entry_target(e).value}, "
                    f"which few-shot classification cannot use"
                )
            continue
        out.append(key)
    return out


def plan_tasks(
    meta_dataset: Any,
    train: Any = None,
    val: Any = None,
    test: Any = None,
    target: Optional[str] = None,
    need: Sequence[str] = ("train", "val", "test"),
    where: str = "data",
) -> TaskPlan:
    """The train / val / test tasks of an experiment on ``meta_dataset`` (a :class:`MetaDataset`,
    or anything with ``tasks`` and ``held_out``).

    ``train`` / ``val`` / ``test`` are task selections (:class:`~medmeta.config.TaskSelection`,
    a mapping with its keys, or ``None`` for every task). With ``target`` set, train and val
    leave out the target and its overlapping datasets (``meta_dataset.held_out(target)``) and
    test draws from the target's tasks. Only classification tasks are kept. Every phase in
    ``need`` must end up with at least one task. Errors are :class:`~medmeta.errors.ConfigError`
    naming the option (``<where>.train.dataset_ids``, ...) and what exists.
    """
    entries = list(meta_dataset.tasks)
    left_out: list[str] = []
    pool = entries
    test_pool = entries
    if target is not None:
        known_ids = sorted({e.dataset_id for e in entries})
        if target not in known_ids:
            raise ConfigError(f"{where}.target: unknown dataset id {target!r}; the meta-dataset has {known_ids}")
        kept = meta_dataset.held_out(target)
        kept_keys = {(e.dataset_id, e.task_name) for e in kept.tasks}
        pool = [e for e in entries if (e.dataset_id, e.task_name) in kept_keys]
        left_out = sorted({e.dataset_id for e in entries} - {e.dataset_id for e in pool})
        test_pool = [e for e in entries if e.dataset_id == target]
    plan = TaskPlan(
        train=_select(pool, train, f"{where}.train", entries),
        val=_select(pool, val, f"{where}.val", entries),
        test=_select(test_pool, test, f"{where}.test", entries),
        left_out=left_out,
    )
    for phase in need:
        if not getattr(plan, phase):
            extra = f" (target {target!r} leaves out {left_out})" if target is not None else ""
            raise ConfigError(f"{where}.{phase}: the selection matches no classification task{extra}")
    return plan

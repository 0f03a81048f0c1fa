"""Frozen episode lists: an evaluation set of episodes written down once, replayed by every method.

A list is one small JSON file (no pickle) holding the seed, the protocol settings, the version
facts of every task source it uses (dataset id, task, split, number of items, SHA-256 of the
labels and of the image indices) and, per episode, the support/query item positions, original
image indices and episode labels. Loading checks the facts against the data at hand and every
episode against its source, so a list made on another version or split of a dataset fails with
a clear error instead of silently evaluating other images.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from medmeta.data.source import TaskSource
from medmeta.episodes.labels import encode_labels
from medmeta.episodes.provider import SourceProvider, SourcesLike
from medmeta.episodes.samplers import task_names
from medmeta.episodes.spec import EpisodeSpec
from medmeta.io import write_bytes_atomic, write_json_atomic

__all__ = [
    "FORMAT",
    "source_facts",
    "save_episode_list",
    "load_episode_list",
    "read_episode_list",
    "write_json_atomic",
    "write_bytes_atomic",
]

FORMAT = "medmeta.episode-list"
VERSION = 1
_CHECKED_FACTS = ("num_items", "target", "num_classes", "label_keys", "labels_sha256", "image_indices_sha256")


def _sha256(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    if array.dtype.kind in "biu":
        array = array.astype("<i8")
    elif array.dtype.kind == "f":
        array = array.astype("<f8")
    h = hashlib.sha256()
    h.update(repr(tuple(array.shape)).encode())
    h.update(array.tobytes())
    return h.hexdigest()


def source_facts(source: TaskSource) -> dict[str, Any]:
    """Version facts of a task source: identity, size, classes and hashes of labels and indices."""
    dataset_id, task_name = task_names(source)
    d = source.description
    return {
        "dataset_id": dataset_id,
        "task_name": task_name,
        "split": str(getattr(source, "split", "")),
        "num_items": int(len(source)),
        "target": d.task_target.value,
        "num_classes": d.num_classes,
        "label_keys": list(d.label_keys),
        "labels_sha256": _sha256(np.asarray(source.labels)),
        "image_indices_sha256": _sha256(np.asarray(source.image_indices, dtype=np.int64)),
    }


def _facts_key(facts: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(facts["dataset_id"]), str(facts["task_name"]), str(facts.get("split", "")))


def _collect_facts(dataset_facts: Any) -> list[dict[str, Any]]:
    if isinstance(dataset_facts, TaskSource):
        return [source_facts(dataset_facts)]
    if isinstance(dataset_facts, Mapping):
        if "dataset_id" in dataset_facts:
            return [dict(dataset_facts)]
        items: Iterable[Any] = dataset_facts.values()
    else:
        items = dataset_facts
    out = []
    for item in items:
        out.append(source_facts(item) if isinstance(item, TaskSource) else dict(item))
    for f in out:
        missing = [k for k in ("dataset_id", "task_name", *_CHECKED_FACTS) if k not in f]
        if missing:
            raise ValueError(f"dataset_facts: entry {f.get('dataset_id')!r} lacks {missing}; use source_facts(source)")
    return out


def save_episode_list(
    path: Union[str, Path],
    specs: Sequence[EpisodeSpec],
    seed: int,
    dataset_facts: Any,
    protocol: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``specs`` to a JSON episode list (atomically).

    ``dataset_facts``: the task sources the episodes come from (or their :func:`source_facts`),
    as one source, a sequence or a mapping. ``protocol``: settings to store and check on load.
    """
    facts = _collect_facts(dataset_facts)
    known = {_facts_key(f) for f in facts}
    for spec in specs:
        if (spec.dataset_id, spec.task_name, spec.split) not in known:
            raise ValueError(
                f"save_episode_list: episode {spec.key} (split {spec.split!r}) has no dataset facts; "
                f"facts given for {sorted(known)}"
            )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "seed": int(seed),
        "protocol": dict(protocol or {}),
        "datasets": facts,
        "episodes": [s.to_dict() for s in specs],
    }
    return write_json_atomic(path, payload)


def read_episode_list(path: Union[str, Path]) -> tuple[dict[str, Any], list[EpisodeSpec]]:
    """The header (format, seed, protocol, dataset facts) and the episodes, unchecked."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"episode list {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"episode list {path}: not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"episode list {path}: not a medmeta episode list (expected format {FORMAT!r})")
    if int(payload.get("version", -1)) > VERSION:
        raise ValueError(f"episode list {path}: version {payload.get('version')} is newer than this medmeta ({VERSION})")
    try:
        specs = [EpisodeSpec.from_dict(e) for e in payload["episodes"]]
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"episode list {path}: malformed episode record ({exc})") from None
    header = {k: v for k, v in payload.items() if k != "episodes"}
    return header, specs


def load_episode_list(
    path: Union[str, Path],
    meta_dataset_or_source: SourcesLike,
    protocol: Optional[Mapping[str, Any]] = None,
    split: Optional[str] = None,
) -> list[EpisodeSpec]:
    """Read an episode list and verify it against the data (and ``protocol`` settings, if given).

    Sources are opened by (dataset, task) with ``split`` (default: the split each source had
    when the list was written).

    Raises ``ValueError`` naming the file, the task and the differing fact when the dataset is
    not the one the list was made on, or when an episode's images or labels do not match.
    """
    path = Path(path)
    header, specs = read_episode_list(path)
    if protocol is not None:
        stored = header.get("protocol", {})
        diff = {k: (stored.get(k), v) for k, v in protocol.items() if _norm(stored.get(k)) != _norm(v)}
        if diff:
            detail = "; ".join(f"{k}: file has {a!r}, expected {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"episode list {path}: made with other protocol settings ({detail})")
    provider = SourceProvider(meta_dataset_or_source)
    sources: dict[tuple[str, str, str], TaskSource] = {}
    for facts in header.get("datasets", []):
        key = _facts_key(facts)
        try:
            source = provider.get(key[0], key[1], split if split is not None else (key[2] or None))
        except KeyError as exc:
            raise ValueError(f"episode list {path}: task {key[0]!r}/{key[1]!r} ({key[2]}) is not available: {exc}") from None
        found = source_facts(source)
        for name in _CHECKED_FACTS:
            if _norm(found[name]) != _norm(facts.get(name)):
                raise ValueError(
                    f"episode list {path}: dataset {key[0]!r} task {key[1]!r} ({key[2] or 'all'} split) does not "
                    f"match the list: {name} is {found[name]!r} here but {facts.get(name)!r} in the file "
                    f"(another version or split of the dataset?)"
                )
        sources[key] = source
    for spec in specs:
        key = (spec.dataset_id, spec.task_name, spec.split)
        if key not in sources:
            raise ValueError(f"episode list {path}: episode {spec.key} refers to {key}, which has no dataset facts")
        source = sources[key]
        try:
            spec.check_source(source)
        except ValueError as exc:
            raise ValueError(f"episode list {path}: {exc}") from None
        raw = np.asarray(source.labels)
        task_desc = source.description
        for part in ("support", "query"):
            expected = encode_labels(raw[getattr(spec, f"{part}_positions")], spec.description, task_desc)
            if not np.array_equal(expected, getattr(spec, f"{part}_labels")):
                raise ValueError(f"episode list {path}: episode {spec.key} has {part} labels that differ from the data")
    return specs


def _norm(value: Any) -> Any:
    """JSON round-trip normal form (tuples become lists) for comparisons."""
    return json.loads(json.dumps(value))

"""Evaluation protocols: frozen episodes per task, every method on the same episodes, tidy results.

* ``l2l`` (MICCAI 2023 Learn2Learn challenge): for each test task, 100 instances for every shot
  count N in 3..10; a task's score is query accuracy averaged over N; methods are ranked per
  task and the ranks averaged (:func:`medmeta.evaluation.ranking.rank_then_aggregate`).
* ``medimeta`` (MedIMeta paper): 100 presampled 5-shot tasks per task with 10 query images per
  class; mean AUROC x 100 with a 95% confidence interval (1.96 x standard error), plus accuracy.
* custom: any shot list, instance count and metric set (:func:`custom_protocol`).

Episodes of a (task, shot count) come from a :class:`FewShotSampler` seeded by a stable hash of
(protocol seed, dataset, task, shots); instance ``i`` is episode ``i``. With ``episode_dir`` the
episodes are written as frozen lists on first use and read back (and verified against the data)
afterwards, so every method and every later run sees exactly the same images.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from medmeta.data.source import TaskSource
from medmeta.episodes.frozen import load_episode_list, save_episode_list
from medmeta.episodes.labels import SUPPORTED_TARGETS
from medmeta.episodes.provider import SourceProvider, SourcesLike, task_key
from medmeta.episodes.samplers import FewShotSampler, InsufficientDataError, task_names
from medmeta.episodes.spec import EpisodeSpec
from medmeta.evaluation.feature_cache import FeatureCache, supports_feature_cache
from medmeta.evaluation.metrics import METRICS, episode_metrics, metrics_for
from medmeta.learners.base import Learner
from medmeta.modes import module_mode
from medmeta.tasks import TaskTarget

__all__ = [
    "ProtocolConfig",
    "PROTOCOLS",
    "l2l_protocol",
    "medimeta_protocol",
    "custom_protocol",
    "get_protocol",
    "protocol_episodes",
    "evaluate_episodes",
    "run_protocol",
    "derive_seed",
    "RESULT_COLUMNS",
]

RESULT_COLUMNS = (
    "method",
    "transductive",
    "dataset",
    "task",
    "domain",
    "target",
    "split",
    "shots",
    "instance",
    "n_way",
    "n_support",
    "n_query",
    "seconds",
)


@dataclass
class ProtocolConfig:
    """Settings of an evaluation protocol.

    Attributes:
        name: protocol name (also part of episode list file names).
        shots: support images per class, one set of episodes per value.
        instances: episodes per shot count.
        n_query: query images per class.
        n_way: classes per episode (``None``: all classes of the task).
        metrics: metric names (:data:`medmeta.evaluation.metrics.METRICS`; ``mae`` only applies
            to ordinal tasks).
        primary_metric: the metric used for rankings and plots.
        higher_is_better: direction of the primary metric.
        aggregate: ``"rank"`` (rank then aggregate) or ``"mean_ci"`` (mean with 95% CI).
        seed: the protocol seed.
        split: the split episodes come from.
        episode_dir: where frozen episode lists are stored (``None``: ``out_dir/episodes`` when
            an output folder is given, else episodes are not stored).
        on_insufficient: ``"error"`` or ``"skip"`` (classes, or whole task/shot combinations,
            without enough images are left out, counted and reported).
        report_scale: multipliers for reported numbers (e.g. ``{"auroc": 100}``).
        feature_cache: solve frozen-backbone learners on cached features.
        feature_cache_dir: a folder of on-disk feature files shared by methods and runs
            (:mod:`medmeta.evaluation.feature_cache`: keyed by data, image transform, backbone
            weights; a second method or run with the same backbone embeds nothing). ``None``
            (default): features are cached in memory for one learner and task only.
        embed_batch_size: images per embedding call of the feature cache.
    """

    name: str = "custom"
    shots: tuple[int, ...] = (5,)
    instances: int = 100
    n_query: int = 10
    n_way: Optional[int] = None
    metrics: tuple[str, ...] = ("accuracy", "balanced_accuracy", "auroc", "mae")
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    aggregate: str = "mean_ci"
    seed: int = 0
    split: str = "test"
    episode_dir: Optional[str] = None
    on_insufficient: str = "error"
    report_scale: dict[str, float] = field(default_factory=dict)
    feature_cache: bool = True
    feature_cache_dir: Optional[str] = None
    embed_batch_size: int = 256

    def __post_init__(self) -> None:
        self.shots = tuple(int(s) for s in (self.shots if isinstance(self.shots, (list, tuple)) else [self.shots]))
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"ProtocolConfig.shots: expected shot counts >= 1, got {self.shots}")
        if len(set(self.shots)) != len(self.shots):
            raise ValueError(f"ProtocolConfig.shots: duplicates in {self.shots}")
        if int(self.instances) < 1:
            raise ValueError(f"ProtocolConfig.instances: expected >= 1, got {self.instances}")
        if int(self.n_query) < 1:
            raise ValueError(f"ProtocolConfig.n_query: expected >= 1, got {self.n_query}")
        self.metrics = tuple(self.metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"ProtocolConfig.metrics: unknown {unknown}; expected names from {METRICS}")
        if self.primary_metric not in self.metrics:
            raise ValueError(
                f"ProtocolConfig.primary_metric: {self.primary_metric!r} is not among metrics {self.metrics}"
            )
        if self.aggregate not in ("rank", "mean_ci"):
            raise ValueError(f"ProtocolConfig.aggregate: expected 'rank' or 'mean_ci', got {self.aggregate!r}")
        if self.on_insufficient not in ("error", "skip"):
            raise ValueError(f"ProtocolConfig.on_insufficient: expected 'error' or 'skip', got {self.on_insufficient!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"ProtocolConfig.name: use letters, digits, '_', '.', '-' only, got {self.name!r}")
        self.report_scale = dict(self.report_scale)
        if self.feature_cache_dir is not None:
            self.feature_cache_dir = str(Path(self.feature_cache_dir).expanduser())

    def episode_settings(self) -> dict[str, Any]:
        """The settings that determine the episodes (stored in and checked against episode lists)."""
        return {
            "name": self.name,
            "shots": list(self.shots),
            "instances": int(self.instances),
            "n_query": int(self.n_query),
            "n_way": self.n_way,
            "seed": int(self.seed),
            "split": self.split,
            "on_insufficient": self.on_insufficient,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shots"] = list(self.shots)
        d["metrics"] = list(self.metrics)
        return d


def l2l_protocol(**overrides: Any) -> ProtocolConfig:
    """The L2L challenge protocol: shots 3..10, 100 instances each, accuracy, rank then aggregate.

    The challenge did not publish its query-set size; 10 query images per class (as in the
    MedIMeta protocol) is the default here.
    """
    base = dict(
        name="l2l",
        shots=tuple(range(3, 11)),
        instances=100,
        n_query=10,
        metrics=("accuracy", "balanced_accuracy", "auroc", "mae"),
        primary_metric="accuracy",
        aggregate="rank",
        report_scale={"accuracy": 100.0, "balanced_accuracy": 100.0, "auroc": 100.0},
    )
    return ProtocolConfig(**{**base, **overrides})


def medimeta_protocol(**overrides: Any) -> ProtocolConfig:
    """The MedIMeta paper protocol: 100 5-shot tasks, 10 query per class, AUROC x 100 with 95% CI."""
    base = dict(
        name="medimeta",
        shots=(5,),
        instances=100,
        n_query=10,
        metrics=("auroc", "accuracy"),
        primary_metric="auroc",
        aggregate="mean_ci",
        report_scale={"auroc": 100.0, "accuracy": 100.0},
    )
    return ProtocolConfig(**{**base, **overrides})


def custom_protocol(
    shots: Sequence[int], instances: int, metrics: Sequence[str] = ("accuracy", "auroc"), **overrides: Any
) -> ProtocolConfig:
    """Any shot list, instance count and metric set."""
    overrides.setdefault("primary_metric", metrics[0])
    return ProtocolConfig(shots=tuple(shots), instances=instances, metrics=tuple(metrics), **overrides)


PROTOCOLS: dict[str, Callable[..., ProtocolConfig]] = {
    "l2l": l2l_protocol, "medimeta": medimeta_protocol, "custom": ProtocolConfig,
}


def get_protocol(name: str, **overrides: Any) -> ProtocolConfig:
    """A preset by name (``l2l``, ``medimeta``, ``custom``) with overrides."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol {name!r}: expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](**overrides)


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (same in every process and Python version)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def episode_list_path(episode_dir: Union[str, Path], config: ProtocolConfig, dataset_id: str, task_name: str) -> Path:
    """File of a task's frozen episodes: readable name plus a short hash against collisions."""
    tag = hashlib.blake2b(f"{dataset_id}\x1f{task_name}".encode(), digest_size=4).hexdigest()
    return Path(episode_dir) / f"{config.name}__{_safe(dataset_id)}__{_safe(task_name)}__{config.split}__{tag}.json"


def _sample_task(source: TaskSource, config: ProtocolConfig, skipped: list[dict[str, Any]]) -> list[EpisodeSpec]:
    dataset_id, task_name = task_names(source)
    specs: list[EpisodeSpec] = []
    for shots in config.shots:
        n_way = config.n_way
        if source.description.task_target is TaskTarget.BINARY_CLASSIFICATION:
            n_way = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sampler = FewShotSampler(
                    source,
                    n_way=n_way,
                    n_shot=shots,
                    n_query=config.n_query,
                    seed=derive_seed(config.seed, dataset_id, task_name, shots),
                    on_insufficient=config.on_insufficient,
                )
        except InsufficientDataError as exc:
            if config.on_insufficient != "skip":
                raise
            skipped.append({"dataset": dataset_id, "task": task_name, "shots": shots, "class": None, "reason": str(exc)})
            continue
        for item in sampler.skipped:
            skipped.append(
                {
                    "dataset": dataset_id,
                    "task": task_name,
                    "shots": shots,
                    "class": item["class"],
                    "reason": f"{item['positives']} positives"
                    + (f", {item['negatives']} negatives" if item["negatives"] is not None else "")
                    + f"; needs {item['needed']}",
                }
            )
        for w in caught:
            if not issubclass(w.category, UserWarning) or "skipping" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        try:
            drawn = sampler.specs(config.instances)
        except InsufficientDataError as exc:
            # a draw can fail where the class counts alone pass (multi-label: the query must come
            # from the images the support left); "skip" leaves the whole (task, shots) out
            if config.on_insufficient != "skip":
                raise
            skipped.append({"dataset": dataset_id, "task": task_name, "shots": shots, "class": None,
                            "reason": f"an episode could not be drawn: {exc}"})
            continue
        specs.extend(drawn)
    return specs


def protocol_episodes(
    source: TaskSource,
    config: ProtocolConfig,
    episode_dir: Optional[Union[str, Path]] = None,
    skipped: Optional[list[dict[str, Any]]] = None,
) -> list[EpisodeSpec]:
    """The frozen episodes of one task under ``config``: read (and verified) from ``episode_dir``
    when a list exists, else sampled (and written there when ``episode_dir`` is given)."""
    skipped = skipped if skipped is not None else []
    episode_dir = episode_dir if episode_dir is not None else config.episode_dir
    dataset_id, task_name = task_names(source)
    path = episode_list_path(episode_dir, config, dataset_id, task_name) if episode_dir is not None else None
    if path is not None and path.exists():
        specs = load_episode_list(path, source, protocol=config.episode_settings())
        present = {s.shots for s in specs}
        for shots in config.shots:
            if shots not in present:
                skipped.append(
                    {"dataset": dataset_id, "task": task_name, "shots": shots, "class": None,
                     "reason": f"no episodes in {path.name} (skipped when the list was made)"}
                )
        return specs
    specs = _sample_task(source, config, skipped)
    if path is not None:
        save_episode_list(path, specs, config.seed, [source], protocol=config.episode_settings())
    return specs


def _device_of(learner: Learner, device: Optional[Any]) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in learner.parameters():
        return p.device
    return torch.device("cpu")


def evaluate_episodes(
    learner: Learner,
    source: TaskSource,
    specs: Sequence[EpisodeSpec],
    config: ProtocolConfig,
    device: Optional[Any] = None,
    use_feature_cache: Optional[bool] = None,
    progress_bar: Any = None,
) -> list[dict[str, Any]]:
    """Metrics of one learner on frozen episodes of one task (rows without the method column).

    The torch RNG is seeded per episode (from the episode's seed and instance) so stochastic
    learners give the same results on the cached and plain paths; the caller's RNG state is
    restored afterwards. The learner is put in eval mode for the run and restored.
    """
    device = _device_of(learner, device)
    learner.to(device)
    cache_ok = supports_feature_cache(learner)
    use_cache = config.feature_cache if use_feature_cache is None else use_feature_cache
    use_cache = bool(use_cache and cache_ok)
    rows: list[dict[str, Any]] = []
    fork_devices = [device] if device.type == "cuda" else []
    with module_mode(learner, False), torch.random.fork_rng(devices=fork_devices):
        cache = (
            FeatureCache.for_specs(learner, source, specs, batch_size=config.embed_batch_size, device=device,
                                   cache_dir=config.feature_cache_dir)
            if use_cache and specs
            else None
        )
        for spec in specs:
            t0 = time.perf_counter()
            torch.manual_seed(derive_seed(spec.seed, spec.instance, "torch"))
            if cache is not None:
                logits = cache.solve(spec)
            else:
                logits = learner.predict(spec.materialize(source).to(device))
            seconds = time.perf_counter() - t0
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape != (
                len(spec.query_positions),
                spec.description.num_outputs,
            ):
                raise ValueError(
                    f"{type(learner).__name__} returned logits of shape "
                    f"{tuple(getattr(logits, 'shape', ()))} for episode {spec.key}; expected "
                    f"({len(spec.query_positions)}, {spec.description.num_outputs})"
                )
            values = episode_metrics(logits.detach().float().cpu(), spec.query_labels, spec.target, _metric_names(spec, config))
            rows.append(
                {
                    "dataset": spec.dataset_id,
                    "task": spec.task_name,
                    "domain": spec.description.domain_identifier,
                    "target": spec.target.value,
                    "split": spec.split,
                    "shots": int(spec.shots),
                    "instance": int(spec.instance),
                    "n_way": int(spec.n_way),
                    "n_support": int(len(spec.support_positions)),
                    "n_query": int(len(spec.query_positions)),
                    "seconds": seconds,
                    **values,
                }
            )
            if progress_bar is not None:
                progress_bar.update(1)
    return rows


def _metric_names(spec: EpisodeSpec, config: ProtocolConfig) -> list[str]:
    return metrics_for(spec.target, config.metrics)


def _task_list(provider: SourceProvider, tasks: Optional[Sequence[Any]]) -> list[tuple[str, str]]:
    if tasks is not None:
        keys = [task_key(t) for t in tasks]
    else:
        keys = []
        for entry in provider.task_entries():
            target = getattr(entry, "target", None)
            if target is not None and TaskTarget.parse(target) not in SUPPORTED_TARGETS:
                continue
            keys.append(task_key(entry))
    if not keys:
        raise ValueError("run_protocol: no tasks to evaluate")
    if len(set(keys)) != len(keys):
        raise ValueError(f"run_protocol: duplicate tasks in {keys}")
    return keys


def run_protocol(
    learners: Mapping[str, Learner],
    meta_dataset: SourcesLike,
    tasks: Optional[Sequence[Any]],
    config: ProtocolConfig,
    out_dir: Optional[Union[str, Path]] = None,
    device: Optional[Any] = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate every learner on the same frozen episodes of every task.

    Args:
        learners: method name -> learner.
        meta_dataset: a meta-dataset, a mapping of tasks to sources, or one source.
        tasks: ``(dataset_id, task_name)`` pairs or task entries (``None``: every classification
            task of the meta-dataset).
        config: the protocol (:func:`l2l_protocol`, :func:`medimeta_protocol`, ...).
        out_dir: if given, writes ``results.csv``, ``summary.md``, a plot of the primary metric
            against shots, and (unless ``config.episode_dir`` is set) ``episodes/``.
        device: where learners run (default: each learner's own device).
        progress: show a progress bar on stderr.

    Returns:
        A tidy table, one row per (method, episode): ``method, transductive, dataset, task,
        domain, target, split, shots, instance, n_way, n_support, n_query, seconds`` and the
        metric columns (``transductive``: the learner used the unlabelled query set, see
        :attr:`medmeta.learners.base.Learner.transductive`; each episode's query set is passed
        to the predictor whole).
        ``df.attrs`` holds ``protocol`` (the settings) and ``skipped`` (what was left out, why).
    """
    if not isinstance(learners, Mapping) or not learners:
        raise ValueError("run_protocol: learners must be a non-empty mapping of method name -> Learner")
    for name, learner in learners.items():
        if not isinstance(learner, torch.nn.Module) or not hasattr(learner, "adapt"):
            raise TypeError(f"run_protocol: learner {name!r} is a {type(learner).__name__}, not a medmeta Learner")
    provider = SourceProvider(meta_dataset, split=config.split)
    keys = _task_list(provider, tasks)
    episode_dir = config.episode_dir
    if episode_dir is None and out_dir is not None:
        episode_dir = str(Path(out_dir) / "episodes")
    skipped: list[dict[str, Any]] = []
    plan = []
    for dataset_id, task_name in keys:
        source = provider.get(dataset_id, task_name)
        if source.description.task_target not in SUPPORTED_TARGETS:
            raise ValueError(
                f"run_protocol: task {dataset_id!r}/{task_name!r} has target "
                f"{source.description.task_target.value}, which few-shot classification protocols do not cover"
            )
        specs = protocol_episodes(source, config, episode_dir, skipped)
        if not specs:
            continue
        plan.append((source, specs))
    if skipped:
        warnings.warn(
            f"run_protocol ({config.name}): left out {len(skipped)} class/shot combination(s) without enough "
            f"images; see df.attrs['skipped'] and the report",
            stacklevel=2,
        )
    total = sum(len(specs) for _, specs in plan) * len(learners)
    bar = _progress(total, progress, config.name)
    rows: list[dict[str, Any]] = []
    partial = Path(out_dir) / PARTIAL_DIR if out_dir is not None else None
    stamps = {name: _learner_stamp(name, learner) for name, learner in learners.items()} if partial else {}
    try:
        for source, specs in plan:
            for name, learner in learners.items():
                if bar is not None:
                    bar.set_description(f"{config.name}: {name} on {specs[0].dataset_id}/{specs[0].task_name}")
                # Transductive learners use the unlabelled query set (the whole set in one call).
                transductive = bool(getattr(learner, "transductive", False))
                chunk = _chunk_path(partial, config, stamps[name], specs) if partial is not None else None
                done = _read_chunk(chunk, len(specs)) if chunk is not None else None
                if done is not None:  # finished by an earlier, interrupted run on this folder
                    rows.extend(done)
                    if bar is not None:
                        bar.update(len(done))
                    continue
                chunk_rows = [{"method": name, "transductive": transductive, **row}
                              for row in evaluate_episodes(learner, source, specs, config, device=device, progress_bar=bar)]
                if chunk is not None:
                    from medmeta.io import write_bytes_atomic

                    write_bytes_atomic(chunk, json.dumps(chunk_rows, default=_plain).encode("utf-8"))
                rows.extend(chunk_rows)
    finally:
        if bar is not None:
            bar.close()
    df = _tidy(rows, config)
    df.attrs["protocol"] = config.to_dict()
    df.attrs["skipped"] = skipped
    if out_dir is not None:
        from medmeta.evaluation.reports import write_report

        write_report(df, out_dir, config)
        if partial is not None:  # the report holds every row now
            shutil.rmtree(partial, ignore_errors=True)
    return df


PARTIAL_DIR = "partial"
"""Folder of ``out_dir`` holding each finished (task, method) chunk of an unfinished protocol run."""


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _learner_stamp(name: str, learner: Learner) -> str:
    """A hash of what makes a learner's results: its name, class, settings and weights (so a chunk
    left by a run of another learner, or of other weights, is never reused)."""
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{name}\x1f{type(learner).__module__}.{type(learner).__qualname__}".encode())
    settings = {k: v for k, v in vars(learner).items()
                if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None), tuple))}
    h.update(repr(sorted(settings.items())).encode())
    for key, tensor in learner.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                 else tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _chunk_path(folder: Path, config: ProtocolConfig, stamp: str, specs: Sequence[EpisodeSpec]) -> Path:
    h = hashlib.blake2b(digest_size=10)
    h.update(repr(sorted(config.to_dict().items())).encode())
    h.update(stamp.encode())
    for spec in specs:
        h.update(f"{spec.key}\x1f{spec.seed}\x1f".encode())
        h.update(np.asarray(spec.support_positions, dtype=np.int64).tobytes())
        h.update(np.asarray(spec.query_positions, dtype=np.int64).tobytes())
    first = specs[0]
    return folder / f"{_safe(first.dataset_id)}__{_safe(first.task_name)}__{h.hexdigest()}.json"


def _read_chunk(path: Path, expected: int) -> Optional[list[dict[str, Any]]]:
    """The rows of a finished chunk, or ``None`` when there is none (or it is not whole)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rows, list) or len(rows) != expected or not all(isinstance(r, dict) for r in rows):
        return None
    return rows


def _tidy(rows: list[dict[str, Any]], config: ProtocolConfig) -> pd.DataFrame:
    metric_cols: list[str] = []
    for m in config.metrics:
        metric_cols.append(m)
        if m == "auroc":
            metric_cols.append("auroc_defined")
    df = pd.DataFrame(rows, columns=[*RESULT_COLUMNS, *metric_cols])
    int_cols = ["shots", "instance", "n_way", "n_support", "n_query"]
    df[int_cols] = df[int_cols].astype(np.int64)
    df["transductive"] = df["transductive"].astype(bool)
    return df


def _progress(total: int, enabled: bool, name: str) -> Any:
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a core dependency; degrade to no bar
        return None
    # Redirected to a log file (Slurm, CI): update every 30 s instead of flooding the file.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=name, unit="episode", leave=False, mininterval=0.1 if interactive else 30.0)

"""Multiple-instance learning heads over bags of tile features, and a small training loop.

* :class:`ABMIL`: attention-based MIL pooling (Ilse, Tomczak and Welling, ICML 2018): instance
  embeddings ``h_k``, attention ``a_k = softmax_k(w^T (tanh(V h_k) * sigm(U h_k)))`` (the gated
  variant, eq. 9; ``gated=False`` gives eq. 8), bag embedding ``z = sum_k a_k h_k``, a linear
  classifier on ``z``.
* :class:`PoolMIL`: the embedding-level mean and max pooling baselines of the same paper.
* :class:`CLAMSB`: CLAM single-branch (Lu et al., Nature Biomedical Engineering 2021): gated
  attention pooling plus instance-level clustering: for a bag of class ``c`` the ``k`` most and
  ``k`` least attended instances are pseudo-labelled positive and negative for the instance
  classifier of class ``c`` (and, with ``subtyping=True``, the ``k`` most attended are negatives
  for every other class); total loss ``bag_weight * bag loss + (1 - bag_weight) * instance
  loss``. The instance loss is cross-entropy (the paper also uses a smooth SVM loss).

Heads output logits with the task encoding of :mod:`medmeta.tasks` (one column for binary
tasks) and take a single bag ``(N, D)``, a padded batch ``(B, N, D)`` or :class:`Bags`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.base import Learner, Predictor
from medmeta.learners.heads import check_labels, task_loss
from medmeta.modes import module_mode
from medmeta.registry import Registry
from medmeta.tasks import TaskDescription, TaskTarget

__all__ = [
    "Bags",
    "ABMIL",
    "PoolMIL",
    "CLAMSB",
    "MIL_HEADS",
    "create_mil_head",
    "list_mil_heads",
    "train_mil",
    "predict_mil",
    "MILLearner",
]


class Bags:
    """A batch of variable-size bags of instance features ``(N_i, D)``.

    Moves like a tensor (``.to(device)``) so it can stand in for the images of an
    :class:`~medmeta.tasks.Episode`.
    """

    def __init__(self, bags: Sequence[Any]) -> None:
        self.bags = [torch.as_tensor(b, dtype=torch.float32) for b in bags]
        dims = {b.shape[-1] for b in self.bags}
        for i, b in enumerate(self.bags):
            if b.ndim != 2 or b.shape[0] == 0:
                raise ValueError(f"Bags: bag {i} has shape {tuple(b.shape)}; expected a non-empty (N, D) array")
        if len(dims) > 1:
            raise ValueError(f"Bags: bags have different feature sizes {sorted(dims)}")

    def __len__(self) -> int:
        return len(self.bags)

    @overload
    def __getitem__(self, index: "int | np.integer") -> Tensor: ...

    @overload
    def __getitem__(self, index: "slice | Sequence[int] | np.ndarray | Tensor") -> "Bags": ...

    def __getitem__(self, index: Any) -> Union[Tensor, "Bags"]:
        if isinstance(index, (int, np.integer)):
            return self.bags[int(index)]
        if isinstance(index, slice):
            return Bags(self.bags[index])
        return Bags([self.bags[int(i)] for i in np.asarray(index).ravel()])

    @property
    def dim(self) -> int:
        return int(self.bags[0].shape[1]) if self.bags else 0

    @property
    def device(self) -> torch.device:
        return self.bags[0].device if self.bags else torch.device("cpu")

    @property
    def sizes(self) -> list[int]:
        return [int(b.shape[0]) for b in self.bags]

    def to(self, device: Any, non_blocking: bool = False) -> "Bags":
        return Bags([b.to(device, non_blocking=non_blocking) for b in self.bags])

    def padded(self) -> tuple[Tensor, Tensor]:
        """``(B, N_max, D)`` features and a ``(B, N_max)`` bool mask of real instances."""
        n = max(self.sizes)
        x = self.bags[0].new_zeros((len(self), n, self.dim))
        mask = torch.zeros((len(self), n), dtype=torch.bool, device=self.device)
        for i, b in enumerate(self.bags):
            x[i, : len(b)] = b
            mask[i, : len(b)] = True
        return x, mask

    def pooled(self, kind: str = "mean") -> Tensor:
        """One vector per bag ``(B, D)`` (for feature-based few-shot learners)."""
        if kind == "mean":
            return torch.stack([b.mean(0) for b in self.bags])
        if kind == "max":
            return torch.stack([b.amax(0) for b in self.bags])
        raise ValueError(f"Bags.pooled: kind must be 'mean' or 'max', got {kind!r}")


BagInput = Union[Tensor, Bags, Sequence[Tensor]]


def _as_padded(bags: BagInput) -> tuple[Tensor, Tensor]:
    if isinstance(bags, Tensor):
        if bags.ndim == 2:
            bags = bags[None]
        if bags.ndim != 3:
            raise ValueError(f"MIL head: expected a bag (N, D) or a batch (B, N, D), got {tuple(bags.shape)}")
        return bags, torch.ones(bags.shape[:2], dtype=torch.bool, device=bags.device)
    if not isinstance(bags, Bags):
        bags = Bags(list(bags))
    return bags.padded()


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)


class _MILHead(nn.Module):
    """Shared parts: input standardisation buffers (saved with the weights) and the loss."""

    num_outputs: int
    input_mean: Tensor  # buffers registered by _embed
    input_std: Tensor

    def _embed(self, in_features: int, hidden: int, dropout: float) -> nn.Module:
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))

    @torch.no_grad()
    def set_input_stats(self, bags: "Bags | Sequence[Tensor]") -> None:
        """Standardise instance features with the mean and std of ``bags`` (frozen features of a
        random or foreign backbone can sit on a tiny scale that plain SGD barely moves)."""
        bags = bags if isinstance(bags, Bags) else Bags(list(bags))
        x = torch.cat([b.to(self.input_mean.device) for b in bags.bags])
        self.input_mean.copy_(x.mean(0))
        self.input_std.copy_(x.std(0, unbiased=False).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.input_std))

    def _standardise(self, x: Tensor) -> Tensor:
        return (x - self.input_mean) / self.input_std

    def loss(self, bags: BagInput, labels: Tensor, target: "TaskTarget | str") -> Tensor:
        """The bag-level task loss (heads with auxiliary losses add them)."""
        return task_loss(self(bags), labels, TaskTarget.parse(target))


class ABMIL(_MILHead):
    """Attention-based deep MIL (Ilse et al. 2018), gated attention by default."""

    def __init__(
        self,
        in_features: int,
        num_outputs: int,
        hidden: int = 128,
        attention_dim: int = 64,
        gated: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_outputs = int(num_outputs)
        self.embed = self._embed(in_features, hidden, dropout)
        self.attention_v = nn.Linear(hidden, attention_dim)
        self.attention_u = nn.Linear(hidden, attention_dim) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, num_outputs)

    def attention_scores(self, h: Tensor) -> Tensor:
        """Unnormalised attention ``(B, N)`` of instance embeddings ``h`` ``(B, N, hidden)``."""
        a = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            a = a * torch.sigmoid(self.attention_u(h))
        return self.attention_w(a).squeeze(-1)

    def _pool(self, bags: BagInput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, mask = _as_padded(bags)
        h = self.embed(self._standardise(x))
        attn = _masked_softmax(self.attention_scores(h), mask)
        z = torch.einsum("bn,bnd->bd", attn, h)
        return z, h, attn, mask

    def forward(self, bags: BagInput, return_attention: bool = False) -> "Tensor | tuple[Tensor, Tensor]":
        z, _, attn, _ = self._pool(bags)
        logits = self.classifier(z)
        return (logits, attn) if return_attention else logits


class PoolMIL(_MILHead):
    """Embedding-level mean or max pooling MIL (the baselines of Ilse et al. 2018)."""

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 128, pool: str = "mean", dropout: float = 0.0) -> None:
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"PoolMIL: pool must be 'mean' or 'max', got {pool!r}")
        self.pool = pool
        self.num_outputs = int(num_outputs)
        self.embed = self._embed(in_features, hidden, dropout)
        self.classifier = nn.Linear(hidden, num_outputs)

    def forward(self, bags: BagInput) -> Tensor:
        x, mask = _as_padded(bags)
        h = self.embed(self._standardise(x))
        m = mask.unsqueeze(-1)
        if self.pool == "mean":
            z = (h * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            z = h.masked_fill(~m, float("-inf")).amax(1)
        return self.classifier(z)


class CLAMSB(ABMIL):
    """CLAM single-branch: gated attention MIL with instance-level clustering (Lu et al. 2021)."""

    def __init__(
        self,
        in_features: int,
        num_outputs: int,
        hidden: int = 128,
        attention_dim: int = 64,
        dropout: float = 0.0,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__(in_features, num_outputs, hidden, attention_dim, gated=True, dropout=dropout)
        self.num_classes = 2 if num_outputs == 1 else int(num_outputs)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(self.num_classes))
        self.k_sample = int(k_sample)
        self.bag_weight = float(bag_weight)
        self.subtyping = bool(subtyping)

    def instance_loss(self, h: Tensor, attn: Tensor, mask: Tensor, classes: Tensor) -> Tensor:
        """Clustering loss over the bags of a batch; ``classes`` (B,) int class of each bag."""
        terms = []
        for b in range(h.shape[0]):
            n = int(mask[b].sum())
            k = min(self.k_sample, n // 2)
            if k < 1:
                continue
            a, hb = attn[b, :n], h[b, :n]
            top = torch.topk(a, k).indices
            bottom = torch.topk(-a, k).indices
            c = int(classes[b])
            inst = torch.cat([hb[top], hb[bottom]])
            target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            terms.append(F.cross_entropy(self.instance_classifiers[c](inst), target))
            if self.subtyping:
                for other in range(self.num_classes):
                    if other != c:
                        zeros = torch.zeros(k, dtype=torch.long, device=h.device)
                        terms.append(F.cross_entropy(self.instance_classifiers[other](hb[top]), zeros))
        if not terms:
            return h.sum() * 0.0
        return torch.stack(terms).mean()

    def loss(self, bags: BagInput, labels: Tensor, target: "TaskTarget | str") -> Tensor:
        target = TaskTarget.parse(target)
        z, h, attn, mask = self._pool(bags)
        bag_loss = task_loss(self.classifier(z), labels, target)
        if target is TaskTarget.BINARY_CLASSIFICATION:
            classes = labels.reshape(-1).round().long()
        elif target.uses_sigmoid:
            raise ValueError("CLAMSB: instance clustering needs single-label (binary or multi-class) tasks")
        else:
            classes = labels.reshape(-1).long()
        return self.bag_weight * bag_loss + (1 - self.bag_weight) * self.instance_loss(h, attn, mask, classes)


#: name -> MIL head class or factory ``fn(in_features, outputs, **kwargs)``
MIL_HEADS: Registry[Callable[..., _MILHead]] = Registry("MIL head")
MIL_HEADS.register("abmil", ABMIL)
MIL_HEADS.register("mean", lambda i, o, **kw: PoolMIL(i, o, pool="mean", **kw))
MIL_HEADS.register("max", lambda i, o, **kw: PoolMIL(i, o, pool="max", **kw))
MIL_HEADS.register("clam_sb", CLAMSB)


def list_mil_heads() -> list[str]:
    """Registered MIL head names, sorted."""
    return MIL_HEADS.names()


def create_mil_head(name: str, in_features: int, task: "TaskDescription | int", **kwargs: Any) -> nn.Module:
    """A MIL head by name (``abmil``, ``mean``, ``max``, ``clam_sb``) sized for ``task``."""
    outputs = task.num_outputs if isinstance(task, TaskDescription) else int(task)
    head: nn.Module = MIL_HEADS.create(name, int(in_features), outputs, **kwargs)
    return head


class _BagItems:
    """``(bag, label)`` items of a :class:`Bags`; with ``max_instances`` each read samples that many
    instances of the bag, seeded by ``(seed, epoch, index)`` (the same draws however a run is resumed)."""

    def __init__(self, bags: Bags, labels: Tensor, max_instances: Optional[int], seed: int) -> None:
        self.bags, self.labels = bags, labels
        self.max_instances = None if max_instances is None else int(max_instances)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        bag = self.bags.bags[index]
        if self.max_instances is not None and len(bag) > self.max_instances:
            from medmeta.training.loop import episode_seed

            gen = torch.Generator().manual_seed(episode_seed(self.seed, "mil-instances", self.epoch, index))
            bag = bag[torch.randperm(len(bag), generator=gen)[: self.max_instances].to(bag.device)]
        return bag, self.labels[index]


def _collate_bags(items: list[tuple[Tensor, Tensor]]) -> tuple[Bags, Tensor]:
    return Bags([bag for bag, _ in items]), torch.stack([label for _, label in items])


def train_mil(
    model: nn.Module,
    bags: "Bags | Sequence[Tensor]",
    labels: Tensor,
    description: TaskDescription,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 1,
    max_instances: Optional[int] = None,
    seed: int = 0,
    device: "str | torch.device | None" = None,
    standardize: bool = True,
    run_dir: "str | Path | None" = None,
    resume: Optional[bool] = None,
    checkpoint_every: Optional[int] = None,
) -> list[float]:
    """Train ``model`` on labelled bags (Adam, shuffled each epoch, seeded); returns epoch losses.

    ``labels`` follow the episode encoding (binary ``(N, 1)`` float, multi-class ``(N,)`` int);
    ``max_instances`` samples that many instances of each bag per epoch (regularises, bounds
    time); ``standardize`` sets the head's input statistics from the training bags first.

    Training runs through :class:`~medmeta.training.loop.TrainingLoop`
    (:func:`~medmeta.training.fit.fit`): with ``run_dir`` it writes
    ``checkpoints/last.pt`` every ``checkpoint_every`` steps (default: every epoch) and
    ``metrics.csv`` (``train/loss`` of every step), and ``resume`` (None: when ``last.pt`` exists) continues an interrupted run
    exactly, returning the losses of every epoch. Without ``run_dir`` nothing is kept.
    """
    from medmeta.adapters.slides.training import BatchObjective
    from medmeta.training.fit import LoopSettings, fit

    bags = bags if isinstance(bags, Bags) else Bags(list(bags))
    if len(bags) != len(labels):
        raise ValueError(f"train_mil: {len(bags)} bags for {len(labels)} labels")
    if len(bags) == 0:
        raise ValueError("train_mil: no bags to train on")
    check_labels(labels, description, where="train_mil labels")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    set_input_stats = getattr(model, "set_input_stats", None)
    if standardize and callable(set_input_stats):
        set_input_stats(bags)
    bag_loss: Callable[..., Tensor] = getattr(model, "loss")  # a MIL head's loss(bags, labels, target)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    target = description.task_target

    def loss_fn(batch: tuple[Bags, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = batch[0].to(device), batch[1].to(device)
        return bag_loss(x if len(x) > 1 else x.bags[0], y, target), {}

    objective = BatchObjective(
        _BagItems(bags, labels, max_instances, seed), loss_fn, batch_size, seed=seed, collate_fn=_collate_bags
    )
    settings = {**objective.settings(), "trainer": "train_mil", "lr": float(lr),
                "weight_decay": float(weight_decay), "max_instances": max_instances, "standardize": bool(standardize)}
    per_epoch = objective.num_batches
    loop = LoopSettings.for_steps(
        int(epochs) * per_epoch, checkpoint_every=checkpoint_every or (per_epoch if run_dir is not None else None)
    )
    fit(model, objective, optimiser, loop, fingerprint=settings, device=device, run_dir=run_dir, resume=resume)
    model.eval()
    return objective.epoch_losses()


@torch.no_grad()
def predict_mil(model: nn.Module, bags: "Bags | Sequence[Tensor]", batch_size: int = 1) -> Tensor:
    """Logits ``(B, num_outputs)`` of each bag, in order."""
    bags = bags if isinstance(bags, Bags) else Bags(list(bags))
    device = next(model.parameters()).device
    with module_mode(model, False):
        out = [model(bags[i : i + batch_size].to(device)) for i in range(0, len(bags), batch_size)]
    return torch.cat(out).cpu()


class MILLearner(Learner):
    """A few-shot learner on bags: trains a fresh MIL head on the support slides of an episode.

    ``adapt(support_bags, support_labels, description)`` returns a predictor mapping query
    :class:`Bags` to logits, so slide-level episodes run like any other episode.
    """

    def __init__(
        self,
        head: str = "abmil",
        epochs: int = 30,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_instances: Optional[int] = None,
        seed: int = 0,
        **head_kwargs: Any,
    ) -> None:
        super().__init__()
        self.head, self.epochs, self.lr, self.weight_decay = head, epochs, lr, weight_decay
        self.max_instances, self.seed, self.head_kwargs = max_instances, seed, head_kwargs

    def adapt(self, support_images: Any, support_labels: Tensor, description: TaskDescription) -> Predictor:
        bags = support_images if isinstance(support_images, Bags) else Bags(list(support_images))
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(self.seed)
            model = create_mil_head(self.head, bags.dim, description, **self.head_kwargs).to(bags.device)
        train_mil(
            model, bags, support_labels, description, epochs=self.epochs, lr=self.lr,
            weight_decay=self.weight_decay, max_instances=self.max_instances, seed=self.seed,
        )

        def predict(query: Any) -> Tensor:
            q = query if isinstance(query, Bags) else Bags(list(query))
            return predict_mil(model, q).to(q.device)

        return predict

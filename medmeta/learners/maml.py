"""Model-agnostic meta-learning (Finn et al., ICML 2017) and its variants, with ``torch.func``.

* :class:`MAML`: second-order MAML; the meta-gradient flows through every inner SGD step.
* :class:`FOMAML`: first-order MAML (Finn et al. 2017): inner gradients are treated as
  constants, so the meta-gradient is the query gradient at the adapted parameters.
* :class:`ANIL`: "Almost No Inner Loop" (Raghu et al., ICLR 2020): only the head adapts;
  support features are computed once per task.
* :class:`MetaSGD`: Meta-SGD (Li et al. 2017): per-parameter inner learning rates, learned.
* :class:`ProtoMAML`: Proto-MAML (Triantafillou et al., ICLR 2020): the head starts from the
  prototype classifier of the support set (:func:`medmeta.learners.protonet.prototype_head`).

As in MedIMeta's mm-MAML every task gets a new head sized from the task (one output for
binary tasks, one per class otherwise), zero-initialised by default, so one meta-batch can mix
task kinds and ways. The inner loop (:func:`inner_loop`) runs the model with
``torch.func.functional_call``: parameters are passed as tensors, modules are never patched, and
the meta-gradient is plain autograd on the module's parameters (``meta_loss(episodes).backward()``
fills ``.grad``, which a distributed loop can all-reduce). Inner gradients come from
``torch.autograd.grad``; tasks of equal shape can be batched with ``torch.func.vmap``
(``vmap=True``), where ``torch.func.grad`` takes over.

Speed (``benchmarks/bench_maml.py``): train/eval flags are set once per call, not per forward
pass; with the zero head the first inner step adapts only the head (the backbone's gradient is
exactly zero there), so it needs no backward pass through the backbone, and its forward pass
doubles as the BatchNorm refresh; the backbone has not moved after that step, so the second step
reuses the same forward pass (one support pass fewer). The meta-gradients are those of the plain algorithm
(``tests/learners/test_learner_maml_fast_paths.py``). One visible difference: with Meta-SGD and
one inner step the backbone's learned rates multiply only that zero gradient, so they get no
``.grad`` (``None`` instead of zeros).

Training and evaluation have separate inner settings (MedIMeta: 4 steps in training and 32
at evaluation, inner SGD learning rate 0.1). :meth:`MAML.meta_loss` uses the training
settings; :meth:`MAML.adapt` (and :meth:`MAML.predict_batch`) the evaluation settings, without
building a graph.

BatchNorm (``bn_mode``):

* ``"transductive"`` (default, as in MAML and MedIMeta): every forward pass normalises with
  the statistics of its own batch (the support batch in the inner loop, the query batch for
  the predictions, so a query prediction depends on the other queries). Running statistics
  are neither read nor written inside the inner loop.
* ``"running"``: every forward pass, support and query, uses the running statistics, so query
  predictions are independent of each other.

With ``update_running_stats=True`` (default) each meta-training call first runs the support
images of every episode through the backbone in train mode without gradients, keeping the
running statistics current for ``"running"`` mode and for later frozen-feature use (ProtoNet,
linear probes) of a meta-trained backbone. Evaluation never changes the learner's state.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from medmeta.learners.base import EpisodeScope, Learner, Predictor, with_fixed_options
from medmeta.learners.checks import check_episodes, check_query, check_support, feature_dim
from medmeta.learners.heads import task_loss
from medmeta.learners.protonet import class_prototypes, prototype_head
from medmeta.modes import cpu_channels_last, in_functorch_transform, module_mode
from medmeta.tasks import Episode, TaskDescription

__all__ = ["MAML", "MAMLVariant", "FOMAML", "ANIL", "MetaSGD", "ProtoMAML", "AdaptedTask", "BN_MODES", "HEAD_INITS", "inner_loop"]

BN_MODES = ("transductive", "running")
HEAD_INITS = ("zero", "proto")

Params = dict[str, Tensor]


@dataclass
class AdaptedTask:
    """The result of an inner loop: every backbone parameter (adapted or not) and the head."""

    params: Params
    head: Params


def _batch_norm_decomposed(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` from primitive ops (running statistics are read, never updated)."""
    dims = [0, *range(2, input.ndim)]
    shape = [1, -1] + [1] * (input.ndim - 2)
    if training or running_mean is None or running_var is None:
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class _DecomposedBatchNorm(TorchFunctionMode):
    """Route ``F.batch_norm`` to :func:`_batch_norm_decomposed` inside the ``with`` block.

    Under ``vmap``, PyTorch's batching rule for the fused batch-norm backward gives wrong
    second derivatives w.r.t. the input in training mode when an affine weight is present
    (see pytorch/functorch#534); the decomposition is exact. Used only on the vmap path.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is F.batch_norm:
            return _batch_norm_decomposed(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _detach(d: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in d.items()}


def _lr_key(name: str) -> str:
    return name.replace(".", "/")


InnerRate = Union[float, Callable[[int, str], Union[float, Tensor]]]


def _as_inputs(d: Params, first_order: bool) -> Params:
    """Independent variables standing for ``d``'s tensors, as ``torch.func.grad`` sees its arguments.

    First order: new leaves (no graph behind them). Second order: an alias (a view) of each tensor
    in a graph, so the gradient is the partial derivative through this use only (the head can
    depend on the backbone parameters, e.g. a prototype head) and still has a graph to the
    tensor; other tensors become new leaves.
    """
    if first_order:
        return {n: t.detach().requires_grad_() for n, t in d.items()}
    return {n: t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for n, t in d.items()}


def _sgd_update(p: Tensor, g: Tensor, r: Union[float, Tensor]) -> Tensor:
    if isinstance(r, Tensor):
        return p - r * g
    return torch.add(p, g, alpha=-r)


def inner_loop(
    loss_fn: Callable[..., Tensor],
    params: Sequence[Params],
    steps: int,
    lr: InnerRate,
    first_order: bool = False,
    first_gradients: Optional[Callable[[], Sequence[Tensor]]] = None,
) -> tuple[Params, ...]:
    """``steps`` SGD steps on ``loss_fn(*params)``: the one MAML inner loop of medmeta.

    ``params`` holds one dict of tensors per argument of ``loss_fn`` (e.g. the adapted
    parameters and the head); every tensor in them is adapted, and ``loss_fn`` runs the model
    with them (``torch.func.functional_call``). ``lr`` is one rate, or ``lr(i, name)`` giving
    the rate of ``params[i][name]`` (a float, or a learned tensor as in Meta-SGD). By default the
    result is differentiable w.r.t. ``params`` through every step (second-order MAML); with
    ``first_order=True`` the inner gradients are constants (FOMAML, ANIL). Returns the adapted
    dicts in the order of ``params``.

    Outside ``torch.func`` transforms the gradients come from plain ``torch.autograd.grad``
    (each tensor replaced by an independent variable, see :func:`_as_inputs`; an unused tensor
    gets a zero gradient), which has less per-operation overhead than ``torch.func.grad``;
    inside ``vmap`` (tasks batched) ``torch.func.grad`` is used. Both give the same gradients.
    The gradients are computed even under ``torch.no_grad`` (evaluation); the updates follow
    the caller's grad mode. ``first_gradients``: the first step's gradients (in the order of
    ``params``' tensors) from work already done, e.g. a forward pass the caller made at the same
    parameters (:meth:`MAML._reused_gradients`); not under ``torch.func`` transforms. Each step's
    gradients and inputs are released before the next step, so a first-order loop holds one set
    of adapted parameters and one of gradients at a time.
    """
    if callable(lr):
        rate = lr
    else:
        value = float(lr)

        def rate(group: int, name: str) -> Union[float, Tensor]:
            return value

    current = tuple(params)
    if steps <= 0:
        return current
    if in_functorch_transform():
        if first_gradients is not None:
            raise ValueError("inner_loop: first_gradients cannot be used under torch.func transforms")
        grad_fn = grad(loss_fn, argnums=tuple(range(len(current))))
        for _ in range(steps):
            if first_order:
                grads = tuple(_detach(g) for g in grad_fn(*(_detach(p) for p in current)))
            else:
                grads = grad_fn(*current)
            current = tuple({n: p[n] - rate(i, n) * g[n] for n in p} for i, (p, g) in enumerate(zip(current, grads)))
        return current
    for step in range(steps):
        current = tuple(_sgd_step(current, _step_gradients(loss_fn, current, first_order, step, first_gradients), rate))
    return current


def _step_gradients(
    loss_fn: Callable[..., Tensor], params: tuple[Params, ...], first_order: bool, step: int,
    first_gradients: Optional[Callable[[], Sequence[Tensor]]],
) -> Sequence[Tensor]:
    """One inner step's gradients w.r.t. every tensor of ``params`` (flattened in order)."""
    if step == 0 and first_gradients is not None:
        return first_gradients()
    with torch.enable_grad():
        inputs = tuple(_as_inputs(p, first_order) for p in params)
        loss = loss_fn(*inputs)
        return torch.autograd.grad(
            loss, [t for d in inputs for t in d.values()], create_graph=not first_order, allow_unused=True,
            materialize_grads=True,
        )


def _sgd_step(params: tuple[Params, ...], grads: Sequence[Tensor], rate: Callable[[int, str], Union[float, Tensor]]) -> Iterator[Params]:
    """The updated dicts of ``params``, one SGD step with ``grads`` (flattened in their order)."""
    it = iter(grads)
    for i, p in enumerate(params):
        yield {n: _sgd_update(t, next(it), rate(i, n)) for n, t in p.items()}


class MAML(Learner):
    """MAML with a new head per task; see the module docstring for the variants.

    Args:
        backbone: feature extractor with ``num_features`` (e.g. :func:`medmeta.backbones.create_backbone`).
        inner_steps: SGD steps per task in meta-training (MedIMeta: 4).
        inner_lr: inner SGD learning rate (MedIMeta: 0.1); Meta-SGD's initial rate.
        eval_inner_steps: SGD steps per task when adapting for evaluation (MedIMeta: 32).
        eval_inner_lr: inner learning rate at evaluation (default ``inner_lr``; not allowed
            with learned rates, which are used as learned).
        first_order: drop second-order terms (FOMAML).
        head_only: adapt only the head in the inner loop (ANIL).
        learn_inner_lr: learn a rate per parameter element (Meta-SGD); the head, whose size
            varies per task, has one learned rate per input feature (shared by all outputs)
            and one for the bias.
        head_init: ``"zero"`` (MedIMeta) or ``"proto"`` (Proto-MAML; the gradient flows
            through the prototypes into the backbone).
        bn_mode: ``"transductive"`` or ``"running"`` (see module docstring).
        vmap: batch tasks of equal shapes (same target, way and tensor shapes) with
            ``torch.func.vmap``; others run in a loop. Pays for small backbones on a GPU
            (Conv-4 on an H200: 1.03-1.97x the loop) and loses on larger ones and on the CPU
            (ResNet-18: 0.56-1.03x), at 2-8x the memory (benchmarks/README.md, "On a GPU").
        update_running_stats: refresh BatchNorm running statistics from the support sets
            during meta-training (one extra no-grad forward pass per task).
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks (inner and outer loss).
    """

    training_kind = "episodic"

    def __init__(
        self,
        backbone: nn.Module,
        inner_steps: int = 4,
        inner_lr: float = 0.1,
        eval_inner_steps: int = 32,
        eval_inner_lr: Optional[float] = None,
        first_order: bool = False,
        head_only: bool = False,
        learn_inner_lr: bool = False,
        head_init: str = "zero",
        bn_mode: str = "transductive",
        vmap: bool = False,
        update_running_stats: bool = True,
        ordinal_loss: str = "ce",
    ) -> None:
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"{type(self).__name__}: head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"{type(self).__name__}: bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if inner_steps < 0 or eval_inner_steps < 0:
            raise ValueError(f"{type(self).__name__}: inner steps must be >= 0, got {inner_steps}, {eval_inner_steps}")
        if learn_inner_lr and eval_inner_lr is not None:
            raise ValueError(
                f"{type(self).__name__}: eval_inner_lr cannot be set with learn_inner_lr=True "
                f"(evaluation uses the learned rates)"
            )
        self.backbone = backbone
        self.num_features = feature_dim(backbone)
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.eval_inner_steps = int(eval_inner_steps)
        self.eval_inner_lr = self.inner_lr if eval_inner_lr is None else float(eval_inner_lr)
        self.first_order = bool(first_order)
        self.head_only = bool(head_only)
        self.learn_inner_lr = bool(learn_inner_lr)
        self.head_init = head_init
        self.bn_mode = bn_mode
        self.vmap = bool(vmap)
        self.update_running_stats = bool(update_running_stats)
        self.ordinal_loss = ordinal_loss
        # set for the duration of one call by _backbone_state
        self._state_active = False
        self._tracking: list[_BatchNorm] = []
        self._has_bn = False
        self._own: Params = {}
        if self.learn_inner_lr:
            ref = next(iter(backbone.parameters()), None)
            kw: dict[str, Any] = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
            self.inner_lrs = nn.ParameterDict(
                {_lr_key(n): nn.Parameter(torch.full_like(p.detach(), self.inner_lr)) for n, p in self._adapted_items()}
            )
            self.head_inner_lrs = nn.ParameterDict(
                {
                    "weight": nn.Parameter(torch.full((1, self.num_features), self.inner_lr, **kw)),
                    "bias": nn.Parameter(torch.full((1,), self.inner_lr, **kw)),
                }
            )

    # -- parameters -----------------------------------------------------------------------
    def _adapted_items(self) -> list[tuple[str, nn.Parameter]]:
        if self.head_only:
            return []
        return [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]

    def _lr(self, name: str, training: bool) -> Union[float, Tensor]:
        if self.learn_inner_lr:
            key = _lr_key(name)
            if key not in self.inner_lrs:
                raise KeyError(
                    f"{type(self).__name__}: no learned inner learning rate for backbone parameter {name!r} "
                    f"(parameters changed after construction?)"
                )
            return self.inner_lrs[key]
        return self.inner_lr if training else self.eval_inner_lr

    def _head_lr(self, name: str, training: bool) -> Union[float, Tensor]:
        if self.learn_inner_lr:
            return self.head_inner_lrs[name]
        return self.inner_lr if training else self.eval_inner_lr

    # -- backbone state, set once per call ----------------------------------------------------
    @contextmanager
    def _backbone_state(self) -> Iterator[None]:
        """Train/eval flags for the inner loop, set once per call (not per forward pass), restored after.

        ``"transductive"``: every module in train mode, and BatchNorm layers stop reading and
        writing running statistics (``track_running_stats`` off for the call), so each forward
        pass normalises with its own batch and leaves the buffers alone; ``"running"``: every
        module in eval mode. Nested calls reuse the outer state.
        """
        if self._state_active:
            yield
            return
        train = self.bn_mode == "transductive"
        modules = list(self.backbone.modules())
        saved = [m.training for m in modules]
        tracking = [m for m in modules if isinstance(m, _BatchNorm) and m.track_running_stats] if train else []
        self.backbone.train(train)
        for bn in tracking:
            bn.track_running_stats = False
        self._state_active, self._tracking = True, tracking
        self._has_bn = any(isinstance(m, _BatchNorm) for m in modules)
        self._own = dict(self.backbone.named_parameters())
        try:
            yield
        finally:
            self._state_active, self._tracking, self._own = False, [], {}
            for m, flag in zip(modules, saved):
                m.training = flag
            for bn in tracking:
                bn.track_running_stats = True

    def _meta_training_layout(self) -> ContextManager[None]:
        """Meta-training passes that backpropagate second order through the backbone (two or more
        inner steps, or a prototype head) keep CPU inputs in NCHW: Conv-4's channels-last
        double-backward kernels are slower (:func:`medmeta.modes.cpu_channels_last`)."""
        second_order = not self.first_order and not self.head_only and (self.inner_steps >= 2 or self.head_init == "proto")
        return cpu_channels_last(False) if second_order else nullcontext()

    @contextmanager
    def _tracking_on(self) -> Iterator[None]:
        """Inside :meth:`_backbone_state`: BatchNorm layers update their running statistics again."""
        for m in self._tracking:
            m.track_running_stats = True
        try:
            yield
        finally:
            for m in self._tracking:
                m.track_running_stats = False

    def _is_own(self, params: Mapping[str, Tensor]) -> bool:
        """``params`` are the backbone's own parameter tensors (so the module can be called as is)."""
        own = self._own
        return len(params) == len(own) and all(params.get(n) is p for n, p in own.items())

    def _forward(self, params: Mapping[str, Tensor], images: Tensor, update_stats: bool = False) -> Tensor:
        """Backbone features inside :meth:`_backbone_state` (``update_stats``: also refresh BatchNorm)."""
        if update_stats:
            with self._tracking_on():
                return self._forward(params, images)
        if self._is_own(params):
            out: Tensor = self.backbone(images)
            return out
        return functional_call(self.backbone, dict(params), (images,))

    def features(self, params: Params, images: Tensor) -> Tensor:
        """Backbone features ``(B, D)`` computed with ``params`` (all backbone parameters)."""
        with self._backbone_state():
            return self._forward(params, images)

    def _head_init(self, support_features: Optional[Tensor], labels: Tensor, description: TaskDescription, ref: Tensor) -> Params:
        if self.head_init == "proto":
            assert support_features is not None
            weight, bias = prototype_head(class_prototypes(support_features, labels, description))
            return {"weight": weight, "bias": bias}
        n_out = description.num_outputs
        return {
            "weight": torch.zeros(n_out, self.num_features, dtype=ref.dtype, device=ref.device),
            "bias": torch.zeros(n_out, dtype=ref.dtype, device=ref.device),
        }

    # -- the inner loop -------------------------------------------------------------------
    def _inner_loop(
        self, params: Params, support_images: Tensor, support_labels: Tensor, description: TaskDescription,
        steps: int, training: bool, refresh: bool = False,
    ) -> AdaptedTask:
        """SGD on the support loss; differentiable w.r.t. ``params`` unless first-order.

        Runs inside :meth:`_backbone_state`. ``refresh``: update the BatchNorm running
        statistics from the support set first (a train-mode forward pass with ``params``).

        Work that cannot change the result is skipped. With a zero-initialised head the first
        step's gradient w.r.t. the backbone is exactly zero (the support loss reaches the
        features only through the zero weight, and stays zero as a function of the backbone),
        so that step leaves the backbone as it is and adapts only the head, on the support
        features at the starting parameters: no backward pass through the backbone. In
        transductive mode that forward pass is also the refresh pass (same parameters, same
        images, train mode), so the running statistics need no pass of their own. With two or
        more steps the second step runs on that same forward pass (:meth:`_reused_gradients`).
        """
        first_order = self.first_order or not training
        adapt_names = [n for n, _ in self._adapted_items()]
        adapted = {n: params[n] for n in adapt_names}
        fixed = {n: p for n, p in params.items() if n not in adapted}
        ref = next(iter(params.values())) if params else support_images
        target = description.task_target
        ordinal_loss = self.ordinal_loss
        zero_start = self.head_init == "zero" and not self.head_only and steps > 0 and bool(adapted)
        support_first = self.head_only or self.head_init == "proto" or zero_start
        fold = refresh and support_first and self.bn_mode == "transductive" and self._is_own(params)
        if refresh and not fold:
            self._refresh_running_stats([support_images])
        # zero head and a second step: that step's support forward pass is the first one (the backbone
        # did not move), so keep its graph (to leaves standing for ``adapted`` where those are no
        # graph inputs, e.g. at evaluation) and reuse it; not under torch.func transforms
        reuse = zero_start and steps >= 2 and not in_functorch_transform()
        leaves: Params = {}
        if reuse and not all(t.requires_grad for t in adapted.values()):
            leaves = _as_inputs(adapted, True)
        support_features = None
        first_gradients: Optional[Callable[[], Sequence[Tensor]]] = None
        if support_first:
            # first order (and no prototype head): the head's inner loop treats the features as constants
            keep_graph = not first_order or self.head_init == "proto" or reuse
            with torch.enable_grad() if reuse else nullcontext() if keep_graph else torch.no_grad():
                support_features = self._forward({**params, **leaves}, support_images, update_stats=fold)
        head = self._head_init(support_features, support_labels, description, ref)

        def head_rate(group: int, name: str) -> Union[float, Tensor]:
            return self._head_lr(name, training)

        if self.head_only or zero_start:
            assert support_features is not None
            feats = support_features.detach() if first_order else support_features

            def head_loss(head_: Params) -> Tensor:
                return task_loss(F.linear(feats, head_["weight"], head_["bias"]), support_labels, target, ordinal_loss=ordinal_loss)

            (head,) = inner_loop(head_loss, (head,), steps if self.head_only else 1, head_rate, first_order)
            if self.head_only:
                return AdaptedTask(params=params, head=head)
            steps -= 1
            if reuse:
                first_gradients = partial(
                    self._reused_gradients, support_features, adapted, leaves, head, support_labels, target, first_order
                )

        def support_loss(adapted_: Params, head_: Params) -> Tensor:
            logits = F.linear(self._forward({**fixed, **adapted_}, support_images), head_["weight"], head_["bias"])
            return task_loss(logits, support_labels, target, ordinal_loss=ordinal_loss)

        def rate(group: int, name: str) -> Union[float, Tensor]:
            return self._lr(name, training) if group == 0 else self._head_lr(name, training)

        adapted, head = inner_loop(support_loss, (adapted, head), steps, rate, first_order, first_gradients)
        return AdaptedTask(params={**fixed, **adapted}, head=head)

    def _reused_gradients(
        self, features: Tensor, adapted: Params, leaves: Params, head: Params, labels: Tensor, target: Any,
        first_order: bool,
    ) -> list[Tensor]:
        """The second inner step's gradients of a zero-head task, from the first step's support ``features``.

        The backbone has not moved since ``features`` were computed (the first step adapts only
        the head), so this step's support loss is ``loss(features, head)``. Its partial
        derivatives, as :func:`inner_loop` takes them (the head an independent variable although
        it depends on ``features``), come in two stages: w.r.t. an alias of ``features`` and the
        head, then from the features into the backbone (``leaves`` stand for ``adapted`` where
        given). Same numbers as a new forward pass, one backbone forward pass less. Returned in
        the order of ``adapted``'s tensors, then ``head``'s.
        """
        with torch.enable_grad():
            alias = features.detach().requires_grad_() if first_order else features.view_as(features)
            head_in = _as_inputs(head, first_order)
            logits = F.linear(alias, head_in["weight"], head_in["bias"])
            loss = task_loss(logits, labels, target, ordinal_loss=self.ordinal_loss)
            g_feat, *g_head = torch.autograd.grad(loss, [alias, *head_in.values()], create_graph=not first_order)
            g_adapted = torch.autograd.grad(
                features, [leaves.get(n, t) for n, t in adapted.items()], g_feat,
                create_graph=not first_order, allow_unused=True, materialize_grads=True,
            )
        return [*g_adapted, *g_head]

    def forward_adapted(self, adapted: AdaptedTask, images: Tensor) -> Tensor:
        """Logits of ``images`` under adapted parameters and head."""
        with self._backbone_state():
            feats = self._forward(adapted.params, images)
        return F.linear(feats, adapted.head["weight"], adapted.head["bias"])

    def _task_logits(
        self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, description: TaskDescription, training: bool,
        refresh: bool = False,
    ) -> Tensor:
        steps = self.inner_steps if training else self.eval_inner_steps
        adapted = self._inner_loop(params, sx, sy, description, steps, training, refresh)
        return self.forward_adapted(adapted, qx)

    def adapt_parameters(
        self, support_images: Tensor, support_labels: Tensor, description: TaskDescription, training: bool = False
    ) -> AdaptedTask:
        """Run the inner loop on a support set and return the adapted parameters and head.

        ``training=True`` uses the meta-training settings and keeps the graph to the
        meta-parameters; otherwise the evaluation settings are used without a graph.
        """
        check_support(support_images, support_labels, description)
        with self._backbone_state():
            if training:
                params: Params = dict(self.backbone.named_parameters())
                return self._inner_loop(params, support_images, support_labels, description, self.inner_steps, True)
            params = _detach(dict(self.backbone.named_parameters()))
            with torch.no_grad():
                return self._inner_loop(params, support_images, support_labels, description, self.eval_inner_steps, False)

    # -- Learner API ----------------------------------------------------------------------
    def adapt(self, support_images: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        adapted = self.adapt_parameters(support_images, support_labels, description, training=False)

        def predict(query_images: Tensor) -> Tensor:
            check_query(query_images, support_images, description)
            with torch.no_grad():
                return self.forward_adapted(adapted, query_images)

        return predict

    @torch.no_grad()
    def _refresh_running_stats(self, images: Sequence[Tensor]) -> None:
        """One train-mode forward pass per support set, updating BatchNorm running statistics."""
        with self._backbone_state():
            if not self._has_bn:
                return
            with module_mode(self.backbone, True), self._tracking_on():
                for x in images:
                    self.backbone(x)

    def query_logits(self, episodes: Sequence[Episode], training: bool = True) -> list[Tensor]:
        """Query logits of every episode after its inner loop.

        ``training=True``: meta-training settings, differentiable w.r.t. the meta-parameters
        (and BatchNorm running statistics refreshed from each support set when enabled, task by
        task as in :meth:`meta_backward`); ``False``: evaluation settings under ``torch.no_grad``.
        """
        check_episodes(episodes)
        with self._backbone_state(), self._meta_training_layout() if training else nullcontext():
            refresh = training and self.update_running_stats
            if refresh and self.vmap:
                self._refresh_running_stats([ep.support_images for ep in episodes])
            params: Params = dict(self.backbone.named_parameters())
            if not training:
                params = _detach(params)
            with nullcontext() if training else torch.no_grad():
                if not self.vmap:  # task by task, each refreshing the statistics as meta_backward does
                    return [
                        self._task_logits(
                            params, ep.support_images, ep.support_labels, ep.query_images, ep.description, training, refresh
                        )
                        for ep in episodes
                    ]
                return self._vmapped_logits(params, episodes, training)

    def _vmapped_logits(self, params: Params, episodes: Sequence[Episode], training: bool) -> list[Tensor]:
        groups: dict[tuple, list[int]] = {}
        for i, ep in enumerate(episodes):
            d = ep.description
            key = (
                d.task_target, d.num_classes, d.num_outputs,
                tuple(ep.support_images.shape), ep.support_images.dtype,
                tuple(ep.support_labels.shape), ep.support_labels.dtype,
                tuple(ep.query_images.shape),
            )
            groups.setdefault(key, []).append(i)
        out: list[Optional[Tensor]] = [None] * len(episodes)
        for members in groups.values():
            first = episodes[members[0]]
            if len(members) == 1:
                out[members[0]] = self._task_logits(
                    params, first.support_images, first.support_labels, first.query_images, first.description, training
                )
                continue
            description = first.description

            def one_task(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
                return self._task_logits(params, sx, sy, qx, description, training)

            sx = torch.stack([episodes[i].support_images for i in members])
            sy = torch.stack([episodes[i].support_labels for i in members])
            qx = torch.stack([episodes[i].query_images for i in members])
            with _DecomposedBatchNorm():
                logits = vmap(one_task, randomness="different")(sx, sy, qx)
            for j, i in enumerate(members):
                out[i] = logits[j]
        return out  # type: ignore[return-value]

    def predict_batch(self, episodes: Sequence[Episode]) -> list[Tensor]:
        """Evaluation-mode query logits of several episodes (vmapped when ``vmap=True``)."""
        return self.query_logits(episodes, training=False)

    def episode_losses(self, episodes: Sequence[Episode]) -> Tensor:
        """Query loss of every episode after its inner loop, ``(E,)``, differentiable.

        A data-parallel loop scales these by ``1 / global meta-batch size`` and sums them.
        """
        logits = self.query_logits(episodes, training=True)
        return torch.stack(
            [
                task_loss(lg, ep.query_labels, ep.description.task_target, ordinal_loss=self.ordinal_loss)
                for lg, ep in zip(logits, episodes)
            ]
        )

    def meta_loss(self, episodes: Sequence[Episode]) -> Tensor:
        """Mean query loss over the meta-batch after each task's inner loop (the outer loss)."""
        return self.episode_losses(episodes).mean()

    def meta_backward(
        self, episodes: Sequence[Episode], scale: Optional[float] = None, episode_scope: Optional[EpisodeScope] = None
    ) -> Tensor:
        """Accumulate the meta-gradient of a meta-batch; return the mean query loss (detached).

        The training loop hands this the whole per-rank meta-batch. The gradients equal
        ``meta_loss(episodes).backward()`` (with ``scale = 1 / len(episodes)``, the default; a
        data-parallel loop passes ``1 / global meta-batch size``).

        * ``vmap=True``: tasks of equal shapes are batched with ``torch.func.vmap`` and share one
          graph, backpropagated together (``episode_scope`` is not used: the tasks run as one).
        * otherwise task by task, each inside ``episode_scope(episode)``: the task's support set
          refreshes the BatchNorm running statistics (``update_running_stats``; in transductive
          mode within the inner loop's first forward pass, see :meth:`_inner_loop`), its graph (with
          second-order MAML, every inner step's) is backpropagated and freed, so peak memory is
          that of one task instead of the whole meta-batch.
        """
        scale = 1.0 / len(episodes) if scale is None else float(scale)
        if self.vmap:
            losses = self.episode_losses(episodes)
            (losses.sum() * scale).backward()
            return losses.detach().mean()
        check_episodes(episodes)
        total: Optional[Tensor] = None
        with self._backbone_state(), self._meta_training_layout():
            params: Params = dict(self.backbone.named_parameters())
            for ep in episodes:
                with episode_scope(ep) if episode_scope is not None else nullcontext():
                    logits = self._task_logits(
                        params, ep.support_images, ep.support_labels, ep.query_images, ep.description, True,
                        refresh=self.update_running_stats,
                    )
                    loss = task_loss(logits, ep.query_labels, ep.description.task_target, ordinal_loss=self.ordinal_loss)
                    (loss * scale).backward()
                total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return total / len(episodes)

    def extra_repr(self) -> str:
        return (
            f"inner_steps={self.inner_steps}, inner_lr={self.inner_lr}, eval_inner_steps={self.eval_inner_steps}, "
            f"eval_inner_lr={self.eval_inner_lr}, first_order={self.first_order}, head_only={self.head_only}, "
            f"learn_inner_lr={self.learn_inner_lr}, head_init={self.head_init!r}, bn_mode={self.bn_mode!r}, "
            f"vmap={self.vmap}"
        )


class MAMLVariant(MAML):
    """A MAML variant: MAML's arguments with some settings fixed (``fixed_options``; the config
    schema leaves those out, and passing a different value is an error)."""

    fixed_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: nn.Module, **kwargs: Any) -> None:
        super().__init__(backbone, **with_fixed_options(type(self), kwargs, instead="MAML"))


class FOMAML(MAMLVariant):
    """First-order MAML (Finn et al. 2017): no second derivatives in the meta-gradient.

    Takes MAML's arguments; ``first_order`` is fixed to True.
    """

    fixed_options = {"first_order": True}


class ANIL(MAMLVariant):
    """ANIL (Raghu et al., ICLR 2020, "Rapid Learning or Feature Reuse?"): only the head adapts.

    Takes MAML's arguments; ``head_only`` is fixed to True. The backbone is meta-learned
    through the outer loop only, and support features are computed once per task.
    """

    fixed_options = {"head_only": True}


class MetaSGD(MAMLVariant):
    """Meta-SGD (Li et al. 2017): learned per-parameter inner learning rates.

    Takes MAML's arguments; ``learn_inner_lr`` is fixed to True (rates start at ``inner_lr``).
    """

    fixed_options = {"learn_inner_lr": True}


class ProtoMAML(MAMLVariant):
    """Proto-MAML (Triantafillou et al., ICLR 2020, Meta-Dataset): prototype head initialisation.

    Takes MAML's arguments; ``head_init`` is fixed to ``"proto"``. For binary and multi-label
    tasks the head starts from positive and negative prototypes per label.
    """

    fixed_options = {"head_init": "proto"}

"""Shared plumbing of the transductive frozen-feature learners (TIM, PT-MAP, LaplacianShot, BD-CSPN).

A transductive learner uses the unlabelled query set when it predicts: its predictor must get
the *whole* query set in one call (protocols and the challenge interface never split it), and
its results are marked ``transductive`` in protocol tables and reports
(:attr:`medmeta.learners.base.Learner.transductive`).

Each method solves a multi-class problem on features, ``solve(support, labels, query, C) ->
(Nq, C)`` scores whose softmax is its class posterior. :func:`transductive_logits` maps every
task kind onto that, the way :class:`~medmeta.learners.protonet.ProtoNet` does:

* multi-class and ordinal tasks: one ``C``-class problem (ordinal classes as plain classes);
* binary and multi-label tasks: per label a two-class problem, negatives (class 0) against
  positives (class 1), solved with the same query set; the label's logit is the log-odds
  ``score_pos - score_neg``, so its sigmoid is the method's two-class posterior.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor

from medmeta.errors import ConfigError
from medmeta.learners.base import Predictor
from medmeta.learners.checks import check_query_features, check_support_features
from medmeta.learners.frozen import FrozenFeatureLearner
from medmeta.tasks import TaskDescription

__all__ = ["TransductiveFeatureLearner", "Solver", "transductive_logits", "one_hot", "check_positive"]

Solver = Callable[[Tensor, Tensor, Tensor, int], Tensor]
"""``solve(support_features (Ns, D), labels (Ns,) int64 in 0..C-1, query_features (Nq, D), C) -> (Nq, C)``."""


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``(N, C)`` 0/1 matrix of integer labels."""
    return (labels.reshape(-1, 1) == torch.arange(num_classes, device=labels.device)).to(dtype)


def transductive_logits(
    solve: Solver, support: Tensor, labels: Tensor, query: Tensor, description: TaskDescription
) -> Tensor:
    """Query logits ``(Nq, num_outputs)`` of a multi-class solver for any task kind (module doc)."""
    if not description.task_target.uses_sigmoid:
        return solve(support, labels.reshape(-1).long(), query, description.num_classes)
    columns = []
    for k in range(labels.shape[1]):
        scores = solve(support, labels[:, k].long(), query, 2)
        columns.append(scores[:, 1] - scores[:, 0])
    return torch.stack(columns, dim=1)


def check_positive(method: str, **values: float) -> None:
    """A :class:`~medmeta.errors.ConfigError` naming the method and argument unless every value is > 0."""
    for name, value in values.items():
        if not float(value) > 0:
            raise ConfigError(f"{method}: {name} must be positive, got {value!r}")


class TransductiveFeatureLearner(FrozenFeatureLearner):
    """A frozen-backbone learner whose predictor uses the whole query set.

    Subclasses implement :meth:`solve` on (pre-processed) features; :meth:`adapt_features`
    checks the inputs and applies it to every task kind with :func:`transductive_logits`.
    """

    transductive: ClassVar[bool] = True
    num_features: int

    def solve(self, support: Tensor, labels: Tensor, query: Tensor, num_classes: int) -> Tensor:
        """Scores ``(Nq, C)`` of a multi-class problem (softmax = the method's posterior)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement solve()")

    def adapt_features(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> Predictor:
        check_support_features(support_features, support_labels, description, self.num_features)
        support = support_features.detach()
        labels = support_labels.detach()

        def predict(query_features: Tensor) -> Tensor:
            check_query_features(query_features, self.num_features, description)
            if query_features.shape[0] == 0:
                return query_features.new_zeros((0, description.num_outputs))
            return transductive_logits(self.solve, support, labels, query_features.detach(), description)

        return predict

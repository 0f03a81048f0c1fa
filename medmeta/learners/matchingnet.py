"""Matching networks (Vinyals et al., NeurIPS 2016, "Matching Networks for One Shot Learning").

A query's class distribution is an attention-weighted sum of the support labels,
``p(y | x) = sum_i a(x, x_i) y_i`` with ``a`` a softmax over the support set of the similarity
between the (embedded) query and the L2-normalised (embedded) support examples; the logits are
``log(p + 1e-6)``. As in the original implementation (and easyfsl) the query is not normalised
(``normalize_query=False``), which keeps the attention sharp; ``normalize_query=True`` gives the
paper's plain cosine similarity, then divided by ``temperature``.

Full-context embeddings (``fce=True``, the paper's FCE): support features are re-encoded by a
bidirectional LSTM read over the support set (``g(x_i) = f'(x_i) + h_fwd + h_bwd``) and every
query by an attention LSTM that takes as many read steps over the encoded support set as it has
examples (as in the original code and easyfsl). The bidirectional LSTM reads the support set as a
sequence, so with FCE predictions depend on the support order; without it they are invariant to
it. FCE adds two LSTMs of the feature size that must be meta-trained; the default is without.

Binary and multi-label tasks: since the attention sums to one over the whole support set, the
probability that a query is positive for label ``k`` is the attention mass on the support
examples positive for ``k`` and ``1 -`` that on the negatives; the logit is the log-odds
``log(p_pos + eps) - log(p_neg + eps)``. Ordinal tasks are treated as multi-class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.learners.metric import EpisodeHead, MetricLearner
from medmeta.learners.protonet import prototype_membership
from medmeta.tasks import TaskDescription

__all__ = ["MatchingNet", "matching_logits"]

EPS = 1e-6


def matching_logits(attention: Tensor, positive: Tensor, negative: "Tensor | None" = None) -> Tensor:
    """Logits from attention ``(Q, N)`` over the support set and 0/1 membership ``(N, C)``.

    Softmax tasks: ``log(a @ Y + eps)``; sigmoid tasks (``negative`` given): the log-odds
    ``log(a @ Y+ + eps) - log(a @ Y- + eps)``.
    """
    logits = torch.log(attention @ positive + EPS)
    if negative is not None:
        logits = logits - torch.log(attention @ negative + EPS)
    return logits


class MatchingNet(MetricLearner):
    """Matching network on a backbone's pooled features.

    Args:
        backbone: module mapping images to ``(B, D)`` features, with ``num_features``.
        fce: full-context embeddings (bidirectional LSTM over the support set, attention LSTM
            for queries); changes predictions with the support order (see module docstring).
        normalize_query: L2-normalise the query embedding too (plain cosine similarity).
        temperature: the attention logits are divided by it.
        ordinal_loss: ``"ce"`` or ``"soft"`` for ordinal tasks.

    Trained episodically (query cross-entropy of the log-probabilities, or binary
    cross-entropy of the log-odds for sigmoid tasks); frozen backbone at test time.
    """

    def __init__(
        self,
        backbone: nn.Module,
        fce: bool = False,
        normalize_query: bool = False,
        temperature: float = 1.0,
        ordinal_loss: str = "ce",
    ) -> None:
        super().__init__(backbone, ordinal_loss)
        if not temperature > 0:
            raise ValueError(f"MatchingNet: temperature must be positive, got {temperature}")
        self.fce = bool(fce)
        self.normalize_query = bool(normalize_query)
        self.temperature = float(temperature)
        if self.fce:
            d = self.num_features
            self.support_encoder = nn.LSTM(d, d, num_layers=1, batch_first=True, bidirectional=True)
            self.query_encoder = nn.LSTMCell(2 * d, d)
            ref = next(iter(backbone.parameters()), None)
            if ref is not None:
                self.support_encoder.to(device=ref.device, dtype=ref.dtype)
                self.query_encoder.to(device=ref.device, dtype=ref.dtype)

    def encode_support(self, support_features: Tensor) -> Tensor:
        """FCE support embedding ``f + h_fwd + h_bwd`` (identity without FCE)."""
        if not self.fce:
            return support_features
        d = self.num_features
        hidden = self.support_encoder(support_features.unsqueeze(0))[0].squeeze(0)
        return support_features + hidden[:, :d] + hidden[:, d:]

    def encode_query(self, query_features: Tensor, support_embedding: Tensor) -> Tensor:
        """FCE query embedding: ``len(support)`` attention-LSTM read steps (identity without FCE)."""
        if not self.fce:
            return query_features
        hidden, cell = query_features, torch.zeros_like(query_features)
        for _ in range(len(support_embedding)):
            attention = torch.softmax(hidden @ support_embedding.transpose(0, 1), dim=1)
            read = attention @ support_embedding
            hidden, cell = self.query_encoder(torch.cat([query_features, read], dim=1), (hidden, cell))
            hidden = hidden + query_features
        return hidden

    def episode_head(self, support_features: Tensor, support_labels: Tensor, description: TaskDescription) -> EpisodeHead:
        support = self.encode_support(support_features)
        keys = F.normalize(support, dim=1)
        positive, negative = prototype_membership(support_labels, description, support_features.dtype)

        def head(query_features: Tensor) -> Tensor:
            query = self.encode_query(query_features, support)
            if self.normalize_query:
                query = F.normalize(query, dim=1)
            attention = torch.softmax(query @ keys.transpose(0, 1) / self.temperature, dim=1)
            return matching_logits(attention, positive, negative)

        return head

    def extra_repr(self) -> str:
        return f"fce={self.fce}, normalize_query={self.normalize_query}, temperature={self.temperature}"

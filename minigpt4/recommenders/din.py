"""DIN (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018): the history
is pooled with attention weights computed against the target item (unnormalised, as in the paper),
then an MLP scores [user, pooled history, target, pooled x target]."""

from __future__ import annotations

import torch
from torch import nn

from minigpt4.config import DINConfig
from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders.base import CollaborativeModel, embedding


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with PReLU (and dropout) between them; the last layer is linear."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers += [nn.PReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class DIN(CollaborativeModel):
    """Target-aware attention pooling over the history, optional user id embedding, MLP head."""

    def __init__(self, config: DINConfig, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        self.max_history = config.max_history
        dim = config.embedding_size
        self.item_embedding = embedding(n_items, dim, config.init_std)
        self.user_embedding = embedding(n_users, dim, config.init_std) if config.use_user_embedding else None
        self.attention = mlp([4 * dim, *config.attention_hidden, 1])
        head_in = (4 if config.use_user_embedding else 3) * dim
        self.head = mlp([head_in, *config.mlp_hidden, 1], config.dropout)

    def _pool(self, batch: RatingBatch, target: torch.Tensor) -> torch.Tensor:
        """Sum of history embeddings weighted by their attention to ``target``; padding weighs 0."""
        keys = self.item_embedding(batch.his)
        query = target.unsqueeze(1).expand_as(keys)
        weights = self.attention(torch.cat([query, keys, query - keys, query * keys], -1)).squeeze(-1)
        weights = weights.masked_fill(batch.his == 0, 0.0)
        return (weights.unsqueeze(-1) * keys).sum(1)

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The target-aware interest vector (plus the user id embedding when used)."""
        pooled = self._pool(batch, self.item_embedding(batch.iid))
        return pooled if self.user_embedding is None else pooled + self.user_embedding(batch.uid)

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The item's embedding row."""
        return self.item_embedding(items)

    def score(self, batch: RatingBatch) -> torch.Tensor:
        """MLP logit over [user?, pooled history, target, pooled x target]."""
        target = self.item_embedding(batch.iid)
        pooled = self._pool(batch, target)
        parts = [pooled, target, pooled * target]
        if self.user_embedding is not None:
            parts.insert(0, self.user_embedding(batch.uid))
        return self.head(torch.cat(parts, -1)).squeeze(-1)

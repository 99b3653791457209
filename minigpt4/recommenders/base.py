"""The interface every collaborative model implements, so trainers, evaluators and the LLM side never
special-case a model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.data.tensors import RatingBatch


class CollaborativeModel(nn.Module):
    """A recommender over dense user ids 1..n_users and item ids 1..n_items (0 is padding)."""

    max_history = 0  # how many recent history items ``user_embeddings`` reads (0: none)

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The user side of each row, [B, d] (for sequence models, computed from the history)."""
        raise NotImplementedError

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """Embeddings of item ids, [..., d]."""
        raise NotImplementedError

    def score(self, batch: RatingBatch) -> torch.Tensor:
        """Logits that each row's user likes its item, [B]."""
        return (self.user_embeddings(batch) * self.item_embeddings(batch.iid)).sum(-1)

    def forward(self, batch: RatingBatch) -> torch.Tensor:
        """The training loss of a batch: binary cross-entropy on the pair logits."""
        return F.binary_cross_entropy_with_logits(self.score(batch), batch.label)


def embedding(count: int, dim: int, init_std: float) -> nn.Embedding:
    """An id embedding with a zero padding row 0 and normal initialisation."""
    table = nn.Embedding(count + 1, dim, padding_idx=0)
    nn.init.normal_(table.weight, std=init_std)
    with torch.no_grad():
        table.weight[0].zero_()
    return table

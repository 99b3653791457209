"""Matrix factorisation (Koren et al., "Matrix Factorization Techniques for Recommender Systems", 2009),
as CoLLM's MF baseline: the logit is the dot product of user and item embeddings."""

from __future__ import annotations

import torch

from minigpt4.config import MFConfig
from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders.base import CollaborativeModel, embedding


class MatrixFactorization(CollaborativeModel):
    """User and item embedding tables; score = <u, i>."""

    def __init__(self, config: MFConfig, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        self.user_embedding = embedding(n_users, config.embedding_size, config.init_std)
        self.item_embedding = embedding(n_items, config.embedding_size, config.init_std)

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The user's embedding row."""
        return self.user_embedding(batch.uid)

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The item's embedding row."""
        return self.item_embedding(items)

    def ranking_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The id tables without their padding rows."""
        return self.user_embedding.weight[1:], self.item_embedding.weight[1:]

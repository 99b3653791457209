"""A collaborative model added from outside the library: matrix factorisation with user and item biases
(Koren, Bell and Volinsky, "Matrix Factorization Techniques for Recommender Systems", 2009, eq. 3).

One file and one registration; importing this module makes ``model.arch: biased_mf`` valid in configs,
checkpoints and the rating trainer (``diffrec pretrain``), and usable as CoRA's collaborative model.
See docs/extending.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from minigpt4.config.base import Section
from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders import register_recommender
from minigpt4.recommenders.base import CollaborativeModel, embedding


class BiasedMFConfig(Section):
    """The ``model`` section of a run config: ``arch`` names the model, the other keys are its settings."""

    arch: Literal["biased_mf"] = "biased_mf"
    embedding_size: int = Field(64, gt=0)
    init_std: float = Field(0.1, gt=0)


class BiasedMF(CollaborativeModel):
    """score = <u, i> + b_u + b_i + b (logits of "likes it")."""

    def __init__(self, config: BiasedMFConfig, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        self.user_embedding = embedding(n_users, config.embedding_size, config.init_std)
        self.item_embedding = embedding(n_items, config.embedding_size, config.init_std)
        self.user_bias = nn.Embedding(n_users + 1, 1, padding_idx=0)
        self.item_bias = nn.Embedding(n_items + 1, 1, padding_idx=0)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The user's row: what the LLM side (CoRA, CoLLM) reads as the user."""
        return self.user_embedding(batch.uid)

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The item's row."""
        return self.item_embedding(items)

    def score(self, batch: RatingBatch) -> torch.Tensor:
        """The dot product plus the three biases."""
        dot = (self.user_embeddings(batch) * self.item_embeddings(batch.iid)).sum(-1)
        return dot + self.user_bias(batch.uid).squeeze(-1) + self.item_bias(batch.iid).squeeze(-1) + self.bias


register_recommender(BiasedMFConfig, BiasedMF, shapes={"ratings"})

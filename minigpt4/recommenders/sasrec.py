"""SASRec (Kang and McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018), used as a
click-through model as in CoLLM: self-attention over the user's recent positive items gives the user
representation at the last position; score = <user representation, target item embedding>."""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt4.config import SASRecConfig
from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders.base import CollaborativeModel, embedding


class SASRec(CollaborativeModel):
    """Pre-norm Transformer blocks over item plus position embeddings of the history."""

    def __init__(self, config: SASRecConfig, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        dim = config.embedding_size
        self.item_embedding = embedding(n_items, dim, config.init_std)
        self.position_embedding = nn.Parameter(torch.randn(config.max_history, dim) * config.init_std)
        self.dropout = nn.Dropout(config.dropout)
        block = nn.TransformerEncoderLayer(
            dim, config.num_heads, dim_feedforward=dim, dropout=config.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, config.num_blocks, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(dim)
        self.scale = math.sqrt(dim)

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The encoder's output at the most recent history position."""
        his = batch.his
        hidden = self.item_embedding(his) * self.scale + self.position_embedding[-his.shape[1] :]
        padding = his == 0
        # The last position stays visible so a user with no history still gets a (position-only) state.
        padding[:, -1] = False
        hidden = self.encoder(self.dropout(hidden), src_key_padding_mask=padding)
        return self.final_norm(hidden[:, -1])

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The item's embedding row."""
        return self.item_embedding(items)

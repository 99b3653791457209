"""SASRec (Kang and McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): causal self-attention
over the user's recent positive items gives the user representation at the last position. As a
click-through model (CoLLM's use) the score is <user representation, target item embedding> under binary
cross-entropy; as a next-item model (leave-one-out) the same representation scores the whole catalogue
under cross-entropy, the padding id excluded."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import SASRecConfig
from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders.base import CollaborativeModel, embedding


class SelfAttentionBlock(nn.Module):
    """Pre-norm causal self-attention and feed-forward, each with a residual connection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding_size {dim} is not divisible by num_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.attention_norm, self.feed_forward_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``mask`` [B, L, L] says which keys each query sees; ``last_only`` computes just the last query."""
        batch, length, dim = hidden.shape
        q, k, v = self.qkv(self.attention_norm(hidden)).chunk(3, dim=-1)
        if last_only:  # only the last position feeds the score, so the final block skips the others
            q, hidden, mask = q[:, -1:], hidden[:, -1:], mask[:, -1:]

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, t.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(
            split_heads(q), split_heads(k), split_heads(v), attn_mask=mask.unsqueeze(1), dropout_p=dropout
        )
        hidden = hidden + F.dropout(self.out(attended.transpose(1, 2).reshape(batch, -1, dim)), dropout, self.training)
        return hidden + F.dropout(self.feed_forward(self.feed_forward_norm(hidden)), dropout, self.training)


class SASRec(CollaborativeModel):
    """Stacked causal self-attention blocks over item plus position embeddings of the history."""

    padding_invariant = True  # padded keys are masked and positions count from the most recent item

    def __init__(self, config: SASRecConfig, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        self.max_history = config.max_history
        dim = config.embedding_size
        self.item_embedding = embedding(n_items, dim, config.init_std)
        self.position_embedding = nn.Parameter(torch.randn(config.max_history, dim) * config.init_std)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(dim, config.num_heads, config.dropout) for _ in range(config.num_blocks)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)
        self.scale = math.sqrt(dim)

    def encode_history(self, his: torch.Tensor) -> torch.Tensor:
        """The last block's output at the most recent position of left-padded histories [B, L], [B, d]."""
        length = his.shape[1]
        hidden = self.dropout(self.item_embedding(his) * self.scale + self.position_embedding[-length:])
        position = torch.arange(length, device=his.device)
        causal = position[None, :] <= position[:, None]
        # A query sees earlier real items and always itself, so padded rows never attend to nothing.
        mask = causal & ((his != 0).unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=his.device))
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, mask, last_only=index == len(self.blocks) - 1)
        return self.final_norm(hidden[:, -1])

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The encoded history of each row."""
        return self.encode_history(batch.his)

    def next_item_scores(self, history: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Inner products of the encoded history with every item embedding, the padding id at -inf."""
        scores = self.encode_history(history) @ self.item_embedding.weight.T
        scores[:, 0] = -torch.inf
        return scores

    def next_item_loss(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the target over the catalogue."""
        return F.cross_entropy(self.next_item_scores(history), target)

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The item's embedding row."""
        return self.item_embedding(items)

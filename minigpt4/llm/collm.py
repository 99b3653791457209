"""CoLLM: collaborative embeddings mapped by an MLP into token embeddings at ``<UserID>``/``<TargetItemID>``."""

from __future__ import annotations

import torch
from torch import nn

from minigpt4.config import CoLLMConfig


class CoLLMProjector(nn.Module):
    """One two-layer MLP per side, from the collaborative embedding size to the LLM's token embedding size."""

    def __init__(self, user_dim: int, item_dim: int, token_dim: int, config: CoLLMConfig) -> None:
        super().__init__()
        self.user = nn.Sequential(nn.Linear(user_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, token_dim))
        self.item = nn.Sequential(nn.Linear(item_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, token_dim))

    def place(
        self,
        embeds: torch.Tensor,
        user: torch.Tensor,
        item: torch.Tensor,
        user_slot: torch.Tensor,
        item_slot: torch.Tensor,
    ) -> torch.Tensor:
        """``embeds`` [B, L, D] with the projected user and item written at their slot positions."""
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        embeds = embeds.clone()
        embeds[rows, user_slot] = self.user(user).to(embeds.dtype)
        embeds[rows, item_slot] = self.item(item).to(embeds.dtype)
        return embeds

"""CoLLM: collaborative embeddings mapped by an MLP into token embeddings at ``<UserID>``/``<TargetItemID>``.

``recipe: ours``: one GELU MLP per side, trained with the LoRA. ``recipe: published`` (CoLLM's two stages):
one ReLU MLP shared by users and items, trained on top of a frozen stage-1 TALLRec LoRA (the recommender loads
it)."""

from __future__ import annotations

import torch
from torch import nn

from minigpt4.config import CoLLMConfig
from minigpt4.errors import DiffRecError


class CoLLMProjector(nn.Module):
    """Two-layer MLPs from the collaborative embedding size to the LLM's token embedding size: one per side, or
    (published recipe) one shared."""

    def __init__(self, user_dim: int, item_dim: int, token_dim: int, config: CoLLMConfig) -> None:
        super().__init__()
        if config.recipe == "published":
            if user_dim != item_dim:
                raise DiffRecError(
                    f"model.collm.recipe published shares one projector: user ({user_dim}) and item ({item_dim}) embeddings must have one size"
                )
            self.shared = nn.Sequential(
                nn.Linear(user_dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, token_dim)
            )
            return
        self.user = nn.Sequential(nn.Linear(user_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, token_dim))
        self.item = nn.Sequential(nn.Linear(item_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, token_dim))

    def project(self, user: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The user's and the item's token embeddings."""
        if hasattr(self, "shared"):
            return self.shared(user), self.shared(item)
        return self.user(user), self.item(item)

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
        user_tokens, item_tokens = self.project(user, item)
        embeds[rows, user_slot] = user_tokens.to(embeds.dtype)
        embeds[rows, item_slot] = item_tokens.to(embeds.dtype)
        return embeds

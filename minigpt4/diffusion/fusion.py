"""Adaptive fusion of a user's preference vector with the instruction's SD3 text embeddings.

The output is exactly what ``StableDiffusion3Pipeline`` and ``SD3Transformer2DModel`` take:
``prompt_embeds`` [B, L + K, joint_dim] (the instruction's tokens followed by K preference tokens)
and ``pooled_prompt_embeds`` [B, pooled_dim] (the instruction's pooled embedding plus a preference
shift). A per-sample gate alpha = sigmoid(MLP(preference, pooled text)) scales both additions, so
alpha = 0 gives every user the same, text-only conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FusedConditioning:
    """The pipeline's conditioning for a batch, and the gate that mixed the preference in."""

    prompt_embeds: torch.Tensor  # [B, L + K, joint_dim]
    pooled_prompt_embeds: torch.Tensor  # [B, pooled_dim]
    alpha: torch.Tensor  # [B]


class AdaptiveFusion(nn.Module):
    """K preference tokens plus a pooled shift from the user's preference, mixed in by a per-sample gate."""

    def __init__(
        self, preference_dim: int, joint_dim: int, pooled_dim: int, tokens: int = 4, hidden: int = 256
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.joint_dim = joint_dim
        # Identity until ``standardize_with`` sets them; saved with the weights.
        self.register_buffer("preference_mean", torch.zeros(preference_dim))
        self.register_buffer("preference_std", torch.ones(preference_dim))
        self.preference = nn.Sequential(nn.LayerNorm(preference_dim), nn.Linear(preference_dim, hidden), nn.SiLU())
        self.to_tokens = nn.Linear(hidden, tokens * joint_dim)
        self.to_pooled = nn.Linear(hidden, pooled_dim)
        # The pooled text embedding is normalised before the gate: real CLIP pooled outputs are large.
        self.gate = nn.Sequential(nn.Linear(hidden + pooled_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.gate_text_norm = nn.LayerNorm(pooled_dim)
        # Small additions at first, so training starts near the text-only conditioning.
        for layer in (self.to_tokens, self.to_pooled):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def standardize_with(self, preferences: torch.Tensor) -> None:
        """Centre and scale every preference dimension by these (training) preferences' mean and std."""
        self.preference_mean.copy_(preferences.mean(0))
        self.preference_std.copy_(preferences.std(0).clamp_min(1e-6))

    def forward(
        self,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        preference: torch.Tensor,
        alpha_override: float | None = None,
    ) -> FusedConditioning:
        """Fuse [B, L, joint_dim] and [B, pooled_dim] text embeddings with [B, preference_dim] preferences."""
        dtype = prompt_embeds.dtype
        preference = (preference.to(self.preference_mean.dtype) - self.preference_mean) / self.preference_std
        hidden = self.preference(preference.to(self.to_tokens.weight.dtype))
        if alpha_override is None:
            text = self.gate_text_norm(pooled_prompt_embeds.to(hidden.dtype))
            alpha = torch.sigmoid(self.gate(torch.cat([hidden, text], dim=-1))).squeeze(-1)
        else:
            alpha = torch.full((len(preference),), float(alpha_override), device=hidden.device, dtype=hidden.dtype)
        tokens = self.to_tokens(hidden).view(len(hidden), self.tokens, self.joint_dim) * alpha[:, None, None]
        pooled_shift = self.to_pooled(hidden) * alpha[:, None]
        return FusedConditioning(
            prompt_embeds=torch.cat([prompt_embeds, tokens.to(dtype)], dim=1),
            pooled_prompt_embeds=pooled_prompt_embeds + pooled_shift.to(dtype),
            alpha=alpha,
        )

"""DiffuRec (Li, Sun and Li, "DiffuRec: A Diffusion Model for Sequential Recommendation", TOIS 2023).

The next item is a distribution, not a point: training diffuses the target item's embedding to a random
step t of a truncated-linear schedule (32 steps), and an approximator (4 pre-LN transformer blocks over
the history's item embeddings, each shifted by lambda x x_t with lambda ~ N(0.001, 0.001) per entry, plus
a time embedding) predicts the clean embedding x0; the loss is cross-entropy of <x0, item table> against
the target. Inference runs the reverse chain from Gaussian noise and ranks items by inner product with the
final x0. ``reverse_steps`` below the training steps take evenly spaced steps of the same schedule (the
DDPM respacing), so accuracy can be traded for latency.

Fixed by default; ``faithful: true`` reproduces the published code:
- Attention mask: the published code builds its mask from the query side, so real positions attend to the
  padding slots (whose embedding is trained) and a history's output depends on how much padding it has.
  Fixed: padded keys are masked; a real position's output never depends on padding.
- Padding id: the published code scores id 0 like an item, in the loss and in the ranking. Fixed: it is
  excluded from both, so it is never recommended.
- Positional embeddings: the published code has them commented out; ``position_embeddings: true`` adds
  learned positions (in either mode).
- Item table initialisation: N(0, 1) as published unless ``init_std`` is set (either mode). With N(0, 1)
  rows the logits start with a standard deviation of sqrt(embedding_size), and the first epochs only
  bring the loss down to the uniform level (ln of the catalogue size); N(0, 0.02) starts there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import DiffuRecConfig
from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders.base import CollaborativeModel

USER_SEED = (
    0  # the reverse chain behind ``user_embeddings`` starts from this seed, so a history always maps to one vector
)


def truncated_linear_betas(steps: int) -> np.ndarray:
    """DiffuSeq's "trunc_lin" schedule: Ho et al.'s linear betas rescaled to ``steps`` and shifted up by 0.01."""
    scale = 1000 / steps
    start, end = scale * 1e-4 + 0.01, scale * 0.02 + 0.01
    if end > 1:
        end = scale * 1e-3 + 0.01
    return np.linspace(start, end, steps, dtype=np.float64)


def respaced_timesteps(steps: int, count: int) -> np.ndarray:
    """``count`` evenly spaced steps of 0..steps-1, both ends included (the published ``space_timesteps``)."""
    if count == 1:
        return np.array([0])
    return np.round(np.arange(count) * (steps - 1) / (count - 1)).astype(np.int64)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly fractional) steps, [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class ApproximatorBlock(nn.Module):
    """Pre-LN multi-head self-attention (no causal mask) and a GELU feed-forward, residual around each,
    dropout on the block output, initialised as published (Xavier-normal output and feed-forward weights)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding_size {dim} is not divisible by num_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.attention_norm, self.feed_forward_norm = nn.LayerNorm(dim, eps=1e-12), nn.LayerNorm(dim, eps=1e-12)
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        for linear in (self.out, self.up, self.down):
            nn.init.xavier_normal_(linear.weight)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias`` [B, 1, L, L] is added to the attention logits: 0 where a query may look, -1e9 where not."""
        batch, length, dim = hidden.shape
        normed = self.attention_norm(hidden)
        q, k, v = (
            layer(normed).view(batch, length, self.heads, dim // self.heads).transpose(1, 2)
            for layer in (self.query, self.key, self.value)
        )
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        hidden = hidden + F.dropout(
            self.out(attended.transpose(1, 2).reshape(batch, length, dim)), dropout, self.training
        )
        feed_forward = self.down(
            F.dropout(F.gelu(self.up(self.feed_forward_norm(hidden)), approximate="tanh"), dropout, self.training)
        )
        return F.dropout(hidden + F.dropout(feed_forward, dropout, self.training), dropout, self.training)


class Approximator(nn.Module):
    """f(history, x_t, t) -> x0: the history's states shifted by lambda x (x_t + time embedding), through the
    blocks; the output at the most recent position is the predicted clean target embedding."""

    def __init__(self, config: DiffuRecConfig) -> None:
        super().__init__()
        dim = config.embedding_size
        self.lambda_uncertainty = config.lambda_uncertainty
        self.time_embedding = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.blocks = nn.ModuleList(
            ApproximatorBlock(dim, config.num_heads, config.dropout) for _ in range(config.num_blocks)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(
        self,
        states: torch.Tensor,
        bias: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predicted x0 [B, d] from history states [B, L, d], noisy targets [B, d] and (rescaled) steps [B]."""
        x_t = x_t + self.time_embedding(timestep_embedding(t, states.shape[-1]))
        noise = torch.randn(states.shape, generator=generator, device=states.device, dtype=states.dtype)
        uncertainty = self.lambda_uncertainty * (
            1 + noise
        )  # lambda ~ N(mean, std) with mean = std = lambda_uncertainty
        hidden = states + uncertainty * x_t[:, None]
        for block in self.blocks:
            hidden = block(hidden, bias)
        return self.norm(self.dropout(hidden))[:, -1]


class DiffuRec(CollaborativeModel):
    """Item table (tied input and output), history encoder, approximator and the Gaussian schedule."""

    def __init__(self, config: DiffuRecConfig, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        self.config = config
        self.max_history = config.max_history
        dim = config.embedding_size
        self.item_embedding = nn.Embedding(n_items + 1, dim)  # N(0, 1) as published; row 0 is the padding slot
        if (
            config.init_std is not None
        ):  # N(0, 1) rows start with logits of std sqrt(dim): the first epochs only shrink them
            nn.init.normal_(self.item_embedding.weight, std=config.init_std)
        self.position_embedding = nn.Embedding(config.max_history, dim) if config.position_embeddings else None
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.history_norm = nn.LayerNorm(dim, eps=1e-12)
        self.approximator = Approximator(config)
        betas = truncated_linear_betas(config.diffusion_steps)
        self.register_buffer(
            "alphas_cumprod", torch.as_tensor(np.cumprod(1 - betas)), persistent=False
        )  # float64, as published

    @property
    def padding_invariant(self) -> bool:
        """Fixed mode masks padded keys (positions count from the most recent item); faithful mode leaks padding."""
        return not self.config.faithful

    def encode(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """History states [B, L, d] (embedding dropout, then LayerNorm, as published) and the attention bias [B, 1, L, L]."""
        states = self.embedding_dropout(self.item_embedding(history))
        if self.position_embedding is not None:
            states = states + self.position_embedding.weight[-history.shape[1] :]
        real = history != 0
        # Published: row i of the mask is real[i] (queries); fixed: column j is real[j] (keys).
        allowed = (
            real[:, :, None].expand(-1, -1, history.shape[1])
            if self.config.faithful
            else real[:, None, :].expand(-1, history.shape[1], -1)
        )
        bias = torch.zeros(allowed.shape, dtype=states.dtype, device=history.device).masked_fill(~allowed, -1e9)
        return self.history_norm(states), bias[:, None]

    def _model_steps(self, t: torch.Tensor) -> torch.Tensor:
        """The step values the time embedding sees."""
        return t.float() * (1000.0 / self.config.diffusion_steps) if self.config.rescale_timesteps else t.float()

    def _item_logits(self, x0: torch.Tensor) -> torch.Tensor:
        """Inner products with every item id; the padding id at -inf unless faithful."""
        logits = x0 @ self.item_embedding.weight.T
        if not self.config.faithful:
            logits[:, 0] = -torch.inf
        return logits

    def next_item_loss(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the x0 predicted from the target diffused to a uniform random step."""
        states, bias = self.encode(history)
        x_start = self.item_embedding(target)
        t = torch.randint(0, self.config.diffusion_steps, (len(target),), device=target.device)
        alpha_bar = self.alphas_cumprod[t].float()[:, None]
        x_t = alpha_bar.sqrt() * x_start + (1 - alpha_bar).sqrt() * torch.randn_like(x_start)
        x0 = self.approximator(states, bias, x_t, self._model_steps(t))
        return F.cross_entropy(self._item_logits(x0), target)

    @torch.no_grad()
    def reverse_chain(
        self, history: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x0 [B, d] after ``steps`` (default ``reverse_steps``) reverse steps from Gaussian noise; ``generator``
        makes it reproducible."""
        steps = steps or self.config.reverse_steps
        if not 1 <= steps <= self.config.diffusion_steps:
            raise ValueError(f"reverse steps must be 1..{self.config.diffusion_steps}, got {steps}")
        states, bias = self.encode(history)
        timesteps = respaced_timesteps(self.config.diffusion_steps, steps)
        alpha_bar = self.alphas_cumprod[torch.as_tensor(timesteps, device=history.device)]
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        betas = 1 - alpha_bar / alpha_bar_prev
        # Posterior q(x_prev | x_t, x0) of the (respaced) chain; the sampling variance is beta, as published.
        coef_x0 = betas * alpha_bar_prev.sqrt() / (1 - alpha_bar)
        coef_xt = (1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar)
        x = torch.randn(len(history), states.shape[-1], generator=generator, device=history.device)
        for index in reversed(range(steps)):
            t = torch.full((len(history),), int(timesteps[index]), device=history.device)
            x0 = self.approximator(states, bias, x, self._model_steps(t), generator)
            x = (coef_x0[index] * x0 + coef_xt[index] * x).float()
            if index > 0:
                x = x + betas[index].sqrt().float() * torch.randn(x.shape, generator=generator, device=x.device)
        return x

    def next_item_scores(
        self, history: torch.Tensor, generator: torch.Generator | None = None, steps: int | None = None
    ) -> torch.Tensor:
        """Inner products of the reverse chain's x0 (``steps`` reverse steps, default ``reverse_steps``) with every item embedding."""
        return self._item_logits(self.reverse_chain(history, steps, generator))

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The reverse chain's x0 for the row's history, from a fixed seed (so the same history always gives
        the same vector): the user side when DiffuRec sits behind the LLM."""
        generator = torch.Generator(device=batch.his.device).manual_seed(USER_SEED)
        return self.reverse_chain(batch.his[:, -self.max_history :], generator=generator)

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """Rows of the tied item table."""
        return self.item_embedding(items)

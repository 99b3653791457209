"""CoRA: collaborative embeddings turned into per-sample LoRA weights inside any Hugging Face causal LM.

A small generator (learned queries cross-attending to the concat(user, item) embedding) writes one
low-rank matrix A [rank, hidden] per sample, shared by every target linear; each target (q, k, v, o
projections of every layer) has its own learned B [rank, out], zero at the start so training begins
from the base model. The update ``x A_s^T B * alpha / rank`` is added by a forward hook on each target
module: no model code is copied, peft's LoRA modules keep their names (so adapters save as usual),
and because the current A stays on the module until the next ``set_weights``, the hooks still find it
when gradient checkpointing re-runs the forward inside ``backward()``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt4.config import CoRAConfig
from minigpt4.errors import DiffRecError


class LoRAGenerator(nn.Module):
    """concat(user, item) -> A [B, rank, hidden]: ``queries`` learned queries, each writing rank/queries rows."""

    def __init__(self, input_dim: int, hidden_size: int, config: CoRAConfig) -> None:
        super().__init__()
        self.rank, self.hidden_size, self.queries = config.rank, hidden_size, config.queries
        # The input vector becomes `queries` memory tokens for the learned queries to attend to.
        self.memory = nn.Sequential(nn.Linear(input_dim, config.queries * config.width), nn.GELU())
        self.query = nn.Parameter(torch.randn(config.queries, config.width) * 0.02)
        self.attention = nn.MultiheadAttention(config.width, config.heads, batch_first=True)
        self.norm = nn.LayerNorm(config.width)
        self.rows = nn.Linear(config.width, (config.rank // config.queries) * hidden_size)

    def forward(self, collab: torch.Tensor) -> torch.Tensor:
        """A for each sample, scaled like LoRA's initial A (entries ~ 1/sqrt(hidden))."""
        batch = collab.shape[0]
        memory = self.memory(collab).view(batch, self.queries, -1)
        attended, _ = self.attention(self.query.expand(batch, -1, -1), memory, memory, need_weights=False)
        rows = self.rows(self.norm(attended))  # [B, queries, rank/queries * hidden]
        return rows.view(batch, self.rank, self.hidden_size) / math.sqrt(self.hidden_size)


def target_linears(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Modules whose attribute name is one of ``names`` (peft's LoRA layers when the model is peft-wrapped)."""
    found = {path: module for path, module in model.named_modules() if path.rsplit(".", 1)[-1] in names}
    missing = set(names) - {path.rsplit(".", 1)[-1] for path in found}
    if missing:
        raise DiffRecError(
            f"model.cora.target_modules: no module named {', '.join(sorted(missing))} in {type(model).__name__}"
        )
    return found


def _features(module: nn.Module, attribute: str) -> int:
    """in_features / out_features of a linear, looking through a peft wrapper's base_layer."""
    base = getattr(module, "base_layer", module)
    if not hasattr(base, attribute):
        raise DiffRecError(f"CoRA target {type(module).__name__} has no {attribute}: only linear layers can be targets")
    return getattr(base, attribute)


class CoRA(nn.Module):
    """The generator plus one B per target linear, attached to ``model`` by forward hooks."""

    def __init__(self, model: nn.Module, input_dim: int, config: CoRAConfig) -> None:
        super().__init__()
        targets = target_linears(model, config.target_modules)
        hidden = {_features(module, "in_features") for module in targets.values()}
        if len(hidden) != 1:
            raise DiffRecError(f"CoRA shares one A across targets, so they need one input size; got {sorted(hidden)}")
        self.generator = LoRAGenerator(input_dim, hidden.pop(), config)
        self.scaling = config.alpha / config.rank
        self.lora_b = nn.ParameterDict(
            {
                path.replace(".", "__"): nn.Parameter(torch.zeros(config.rank, _features(module, "out_features")))
                for path, module in targets.items()
            }
        )
        self.lora_a: torch.Tensor | None = None
        self._handles = [
            module.register_forward_hook(self._hook(path.replace(".", "__"))) for path, module in targets.items()
        ]

    def set_weights(self, collab: torch.Tensor) -> torch.Tensor:
        """Generate A from concat(user, item) [B, input_dim] for the following forward (and its recomputation)."""
        self.lora_a = self.generator(collab)
        return self.lora_a

    def remove(self) -> None:
        """Detach the hooks: the model computes as without CoRA."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, key: str):
        """The forward hook adding x A_s^T B * scaling to one target's output."""

        def add_update(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            lora_a = self.lora_a
            if lora_a is None:
                raise DiffRecError("CoRA weights are not set: call set_weights(collab embeddings) before the forward")
            x = args[0]
            if x.shape[0] != lora_a.shape[0]:
                raise DiffRecError(
                    f"CoRA weights were generated for {lora_a.shape[0]} samples, the forward has {x.shape[0]}"
                )
            low = torch.matmul(x, lora_a.transpose(1, 2).to(x.dtype))  # [B, L, rank]
            return output + torch.matmul(low, self.lora_b[key].to(x.dtype)) * self.scaling

        return add_update

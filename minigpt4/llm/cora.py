"""CoRA: collaborative embeddings turned into per-sample LoRA weights inside any Hugging Face causal LM.

A generator (learned queries attending to the concat(user, item) embedding) writes one low-rank matrix
A [rank, hidden] per sample, shared by every target linear; each target (q, k, v, o projections of every
layer) has its own learned B [rank, out], zero at the start so training begins from the base model. The
update ``dropout(x) A_s^T B * alpha / rank`` is added by a forward hook on each target module: no model
code is copied, peft's LoRA modules keep their names (so adapters save as usual), and because the current
A stays on the module until the next ``set_weights``, the hooks still find it when gradient checkpointing
re-runs the forward inside ``backward()``.

Two generators (``model.cora.generator``): ``ours`` (``LoRAGenerator``: one cross-attention layer, each
query writing rank / queries rows of A, scaled like LoRA's initial A) and ``published`` (``QFormerGenerator``,
the CoRA paper's ``PerceptualWeightsGenerator``: a BERT-style Q-former of 8 post-norm layers, self-attention
among the queries, cross-attention to the embedding and a feed-forward block each, width = the embedding
size; the mean over queries of a linear map is A, L2-normalised per sample).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


class QFormerGenerator(nn.Module):
    """concat(user, item) -> A [B, rank, hidden] as the published CoRA: a Q-former over one memory token, the
    queries' mean mapped to rank x hidden and L2-normalised per sample (every A has unit Frobenius norm)."""

    def __init__(self, input_dim: int, hidden_size: int, config: CoRAConfig) -> None:
        super().__init__()
        self.rank, self.hidden_size = config.rank, hidden_size
        self.query = nn.Parameter(torch.randn(1, config.queries, input_dim) * 0.02)
        self.embed_norm = nn.LayerNorm(input_dim, eps=1e-12)  # BERT's embedding LayerNorm and dropout on the queries
        self.embed_dropout = nn.Dropout(0.1)
        layer = nn.TransformerDecoderLayer(
            input_dim, config.qformer_heads, config.ffn, dropout=0.1, activation="gelu", layer_norm_eps=1e-12,
            batch_first=True,
        )  # fmt: skip
        self.layers = nn.TransformerDecoder(layer, config.layers)
        self.final = nn.Linear(input_dim, hidden_size * config.rank)

    def forward(self, collab: torch.Tensor) -> torch.Tensor:
        """A for each sample, unit norm."""
        queries = self.embed_dropout(self.embed_norm(self.query.expand(collab.shape[0], -1, -1)))
        attended = self.layers(queries, collab.unsqueeze(1))
        flat = F.normalize(self.final(attended).mean(dim=1), p=2, dim=-1)  # [B, hidden * rank]
        return flat.view(-1, self.hidden_size, self.rank).transpose(1, 2)


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

    def __init__(self, model: nn.Module, user_dim: int, item_dim: int, config: CoRAConfig) -> None:
        super().__init__()
        targets = target_linears(model, config.target_modules)
        hidden = {_features(module, "in_features") for module in targets.values()}
        if len(hidden) != 1:
            raise DiffRecError(f"CoRA shares one A across targets, so they need one input size; got {sorted(hidden)}")
        make = QFormerGenerator if config.generator == "published" else LoRAGenerator
        self.generator = make(user_dim + item_dim, hidden.pop(), config)
        self.scaling = config.alpha / config.rank
        self.dropout = nn.Dropout(config.update_dropout)
        self.fp32 = config.update_in_fp32
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

    def set_weights(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Generate A from the user's and item's embeddings [B, d] for the following forward (and its
        recomputation)."""
        self.lora_a = self.generator(torch.cat([user, item], dim=-1))
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
                raise DiffRecError("CoRA weights are not set: call set_weights(user, item) before the forward")
            x = args[0]
            if x.shape[0] != lora_a.shape[0]:
                raise DiffRecError(
                    f"CoRA weights were generated for {lora_a.shape[0]} samples, the forward has {x.shape[0]}"
                )
            x = self.dropout(x)
            if self.fp32:  # the published update: fp32 weights and maths whatever the autocast
                with torch.autocast(x.device.type, enabled=False):
                    low = torch.matmul(x.float(), lora_a.float().transpose(1, 2))
                    update = torch.matmul(low, self.lora_b[key].float()) * self.scaling
                return output + update.to(output.dtype)
            low = torch.matmul(x, lora_a.transpose(1, 2).to(x.dtype))  # [B, L, rank]
            return output + torch.matmul(low, self.lora_b[key].to(x.dtype)) * self.scaling

        return add_update

"""MDMNS ("Modal-aware Diffusion-enhanced with Multi-level Negative Sampling for Multimodal-based
Recommendation"; code: HuXianshengNXU/MDMNS-main), built on DiffMM's per-modality denoisers and
regenerated graphs (``minigpt4.recommenders.diffmm``) with three additions:

- Modal-aware guided diffusion: a modality's denoiser reads its noisy row after a guidance GCN over the
  batch's user-item graph, whose item nodes carry the other modalities' projected features (their mean;
  a single-modality dataset guides with its own features).
- Multi-tower fusion: one tower per modality (its view propagated over the training graph) plus a fused
  tower (the weighted modality views' items propagated once more). BPR trains each single-modality tower;
  the ranking score sums every tower's inner product.
- Multi-level negatives: with ``contrast: main`` each single tower's item table is contrasted (InfoNCE
  over all pairs) with copies of itself under Gaussian noise of increasing scale, and the fused tower with
  every single tower over all users and all items; ``contrast: modalities`` keeps DiffMM's loss. A user
  with no training item gets no BPR gradient, so under ``main`` this InfoNCE alone places it, apart from
  every other user: on a split in time with many such users (ML-100K) their rankings are near random.

Differences from the published code, default vs ``faithful: true``:
- Guidance modules: the published loss builds a new randomly initialised GCN (and a random linear "guide"
  head) at every call, so nothing in the guidance is ever trained, and the denoiser reads the random GCN's
  output instead of the row. By default each modality has one guidance GCN trained with its denoiser, its
  scores are added to the row (a residual), and the reverse chain that regenerates the graph is guided the
  same way (the published chain reads the bare row, unlike its training). ``faithful`` draws fresh random
  modules each call and guides training only. The guide head's MSE reaches no trained parameter (its
  input is detached and the head is discarded), so it changes only the logged loss and is not computed.
- Guidance user nodes: published, a fresh random embedding per batch position (not per user); by default
  none (users start at zero and gather their items' guide features through the graph).
- Guidance degrees: noisy rows can sum below zero; the published code clamps the degree at 1e-8 (a huge
  1/sqrt), the default at 1 (the self-loop's weight).
- Noise levels: published ``int(steps / 10)``, ``int(steps / 8)``, ``int(steps / 4)``, ``int(steps / 2)``: with
  5 steps two of the four levels add no noise; by default the fractions times ``steps``, untruncated.
- In both modes the guidance never builds the dense (B + I)^2 adjacency (its bipartite blocks give the same
  numbers in B x I memory), the all-pairs InfoNCE runs in chunks, and regeneration and the evaluation graph
  follow DiffMM's default/faithful split.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import MDMNSConfig
from minigpt4.recommenders.diffmm import DiffMM
from minigpt4.recommenders.graph import all_pairs_info_nce, bpr_loss, sparse_mm


def guidance_scores(
    rows: torch.Tensor, users: torch.Tensor, items: torch.Tensor, layer: nn.Linear, min_degree: float
) -> torch.Tensor:
    """One GCN layer over the bipartite graph of ``rows`` (plus self-loops, symmetric-normalised) with user and
    item node features, then user . item scores, [B, n_items]."""
    user_scale = (1 + rows.sum(1)).clamp(min=min_degree).rsqrt()[:, None]
    item_scale = (1 + rows.sum(0)).clamp(min=min_degree).rsqrt()[:, None]
    user_support = user_scale * (rows @ (item_scale * items)) + user_scale.square() * users
    item_support = item_scale * (rows.T @ (user_scale * users)) + item_scale.square() * items
    return layer(user_support) @ layer(item_support).T


class GuidanceGCN(nn.Module):
    """The trained guidance of one modality: guide features to the hidden size, then one GCN layer."""

    def __init__(self, feature_size: int, hidden: int) -> None:
        super().__init__()
        self.features = nn.Linear(feature_size, hidden)
        self.layer = nn.Linear(hidden, hidden)

    def forward(self, rows: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Guidance scores for a batch of rows, [B, n_items]."""
        users = rows.new_zeros(len(rows), self.layer.in_features)
        return guidance_scores(rows, users, self.features(guide), self.layer, min_degree=1.0)


class MDMNS(DiffMM):
    """DiffMM's model with guidance GCNs next to the denoisers and the tower/negative losses."""

    def build(self, config: MDMNSConfig, features: dict[str, torch.Tensor]) -> None:
        """DiffMM's modules, then a guidance GCN per modality."""
        super().build(config, features)
        self.guides = nn.ModuleDict(
            {m: GuidanceGCN(config.embedding_size, config.guide_hidden_size) for m in self.modalities}
        )

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """The guidance GCNs train with the denoisers (one optimizer, one phase)."""
        guides = set(self.guides.parameters())
        groups = super().optimizer_groups()
        # lists in module order, never a set's: optimizer states are matched to parameters by position when resumed
        return {
            "model": [p for p in groups["model"] if p not in guides],
            self.denoiser_group: groups[self.denoiser_group] + list(self.guides.parameters()),
        }

    def guide_features(self, modality: str) -> torch.Tensor:
        """The mean of the other modalities' projected item features (the modality's own when alone), detached."""
        others = [m for m in self.modalities if m != modality] or [modality]
        return torch.stack([self.modal_items(m) for m in others]).mean(0).detach()

    def denoise(self, modality: str, x: torch.Tensor, t: torch.Tensor, training: bool) -> torch.Tensor:
        """The x0 prediction from the guided row (see the module docstring for faithful mode)."""
        denoiser = self.denoisers[modality]
        if not self.config.faithful:
            return denoiser(x + self.guides[modality](x, self.guide_features(modality)), t, dropout=training)
        if not training:
            return denoiser(x, t, dropout=False)
        guide = self.guide_features(modality)
        hidden = self.config.guide_hidden_size
        users = torch.randn(len(x), hidden, device=x.device)  # nn.Embedding's N(0, 1) init, per batch position
        items = nn.Linear(guide.shape[1], hidden, device=x.device)(guide)
        return denoiser(
            guidance_scores(x, users, items, nn.Linear(hidden, hidden, device=x.device), min_degree=1e-8),
            t,
            dropout=True,
        )

    def towers(self) -> list[torch.Tensor]:
        """Node tables of the fused tower, then one per modality (in ``self.modalities`` order)."""
        graph = self.main_graph()
        views = [self.modality_view(m, graph) for m in self.modalities]
        weights = torch.softmax(self.modal_weight, 0)
        fused_items = F.normalize(sum(weight * view for weight, view in zip(weights, views))[self.n_users :])
        fused = sparse_mm(graph, torch.cat([self.user_table, fused_items]))
        fused = fused + sparse_mm(graph, torch.cat([fused[: self.n_users], self.item_table]))
        fused = fused + self.config.ris_adj_lambda * sparse_mm(graph, torch.cat([self.user_table, self.item_table]))
        return [self._propagate(graph, view) + self.config.ris_lambda * F.normalize(view) for view in [fused, *views]]

    def ranking_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every tower side by side: the inner product of the concatenations is the sum of the towers' scores."""
        users, items = zip(*(self._split(tower) for tower in self.towers()))
        return torch.cat(users, dim=1), torch.cat(items, dim=1)

    def noise_levels(self) -> list[float]:
        """Standard deviations of the noised negatives."""
        levels = [fraction * self.config.steps for fraction in self.config.negative_levels]
        return [float(int(level)) for level in levels] if self.config.faithful else levels

    def pair_loss(
        self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, l2_reg: float
    ) -> dict[str, torch.Tensor]:
        """BPR on every single-modality tower + L2 on the id tables + the contrastive losses."""
        config = self.config
        fused, *singles = [self._split(tower) for tower in self.towers()]
        bpr = sum(bpr_loss(u[users], i[positives], i[negatives]) for u, i in singles)
        reg = l2_reg * (self.user_table.square().sum() + self.item_table.square().sum())
        if config.contrast == "main":
            nce = partial(all_pairs_info_nce, temperature=config.temperature, chunk=config.info_nce_chunk)
            contrast = sum(nce(fused[0], u) + nce(fused[1], i) for u, i in singles)
            for _, items in singles:
                for level in self.noise_levels():
                    contrast = contrast + nce(items, (items + level * torch.randn_like(items)).detach())
            contrast = config.ssl_reg * contrast
        else:
            contrast = self.contrastive_loss(users, positives, torch.cat([fused[0], fused[1]]))
        return {"loss": bpr + reg + contrast, "bpr": bpr, "reg": reg, "contrast": contrast}

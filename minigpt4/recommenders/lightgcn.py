"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation", SIGIR 2020): embeddings averaged over K rounds of symmetric-normalised propagation on
the user-item graph of training positives (or of all training interactions, ``graph: interactions``);
score = <u, i>."""

from __future__ import annotations

import torch

from minigpt4.config import LightGCNConfig
from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders.base import CollaborativeModel, embedding
from minigpt4.recommenders.graph import sparse_mm


class LightGCN(CollaborativeModel):
    """Propagates user and item embeddings over the training graph (kept as a buffer, so checkpoints
    are self-contained)."""

    def __init__(self, config: LightGCNConfig, n_users: int, n_items: int, graph_edges: torch.Tensor) -> None:
        super().__init__(n_users, n_items)
        self.n_layers = config.n_layers
        self.user_embedding = embedding(n_users, config.embedding_size, config.init_std)
        self.item_embedding = embedding(n_items, config.embedding_size, config.init_std)
        self.register_buffer("graph_edges", graph_edges.long().contiguous())
        self._adjacency_cache: torch.Tensor | None = None

    def _adjacency(self) -> torch.Tensor:
        """D^-1/2 A D^-1/2 of the bipartite graph; users are nodes 0..n_users, items follow."""
        users, items = self.graph_edges
        items = items + self.n_users + 1
        rows = torch.cat([users, items])
        cols = torch.cat([items, users])
        size = self.n_users + self.n_items + 2
        degree = torch.zeros(size, device=rows.device).index_add_(0, rows, torch.ones_like(rows, dtype=torch.float))
        inv_sqrt = degree.clamp(min=1).pow(-0.5)
        values = inv_sqrt[rows] * inv_sqrt[cols]
        adjacency = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (size, size), check_invariants=False)
        return adjacency.coalesce()

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final user and item tables: the mean of the layer-0..K embeddings."""
        layer = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        total = layer
        if self.n_layers:
            # The graph is fixed, so its normalised adjacency is built once per device.
            if self._adjacency_cache is None or self._adjacency_cache.device != layer.device:
                self._adjacency_cache = self._adjacency()
            adjacency = self._adjacency_cache
            for _ in range(self.n_layers):
                layer = sparse_mm(adjacency, layer)
                total = total + layer
        final = total / (self.n_layers + 1)
        return final[: self.n_users + 1], final[self.n_users + 1 :]

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The user's propagated embedding."""
        return self.propagate()[0][batch.uid]

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The item's propagated embedding."""
        return self.propagate()[1][items]

    def score(self, batch: RatingBatch) -> torch.Tensor:
        """<u, i> with one propagation for the whole batch."""
        users, items = self.propagate()
        return (users[batch.uid] * items[batch.iid]).sum(-1)

    def ranking_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The propagated tables without their padding rows."""
        users, items = self.propagate()
        return users[1:], items[1:]

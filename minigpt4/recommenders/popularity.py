"""Most-popular: every user gets the catalogue ranked by training interaction counts, the floor any
personalised full-ranking model has to clear."""

from __future__ import annotations

import torch

from minigpt4.config import PopularityConfig
from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders.base import CollaborativeModel


class MostPopular(CollaborativeModel):
    """Scores are item counts over the training edges; nothing is trained. As embeddings, every user is
    [1] and every item is [its count], so the inner product is the popularity score."""

    def __init__(self, config: PopularityConfig, n_users: int, n_items: int, graph_edges: torch.Tensor) -> None:
        super().__init__(n_users, n_items)
        self.register_buffer("graph_edges", graph_edges.long().contiguous())
        self.register_buffer("counts", torch.bincount(self.graph_edges[1], minlength=n_items + 1).float()[:, None])

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """[1] for every user."""
        return torch.ones(len(batch.uid), 1, device=self.counts.device)

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The item's training count."""
        return self.counts[items]

    def ranking_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ones for the users, counts for the items."""
        return torch.ones(self.n_users, 1, device=self.counts.device), self.counts[1:]

    def next_item_scores(self, history: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The item counts for every history (the padding id counts 0)."""
        return self.counts[:, 0].expand(len(history), -1)

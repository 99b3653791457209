"""The interface every collaborative model implements, so trainers, evaluators and the LLM side never
special-case a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.data.tensors import RatingBatch
from minigpt4.recommenders.graph import bpr_loss


@dataclass
class EpochContext:
    """What a model's once-per-epoch phase may use (see ``CollaborativeModel.prepare_epoch``)."""

    train: sp.csr_matrix  # users x items training interactions, 0-based
    batch_size: int
    generator: torch.Generator
    optimizers: dict[str, torch.optim.Optimizer]
    device: torch.device
    bf16: bool = False  # run.mixed_precision=bf16: training losses under bf16 autocast

    def autocast(self) -> torch.autocast:
        """The autocast context every training loss of the epoch is computed in (a no-op without bf16)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


class CollaborativeModel(nn.Module):
    """A recommender over dense user ids 1..n_users and item ids 1..n_items (0 is padding)."""

    max_history = 0  # how many recent history items ``user_embeddings`` reads (0: none)
    padding_invariant = (
        False  # True: left padding never changes an output, so batches may be trimmed to their longest history
    )

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The user side of each row, [B, d] (for sequence models, computed from the history)."""
        raise NotImplementedError

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """Embeddings of item ids, [..., d]."""
        raise NotImplementedError

    def score(self, batch: RatingBatch) -> torch.Tensor:
        """Logits that each row's user likes its item, [B]."""
        return (self.user_embeddings(batch) * self.item_embeddings(batch.iid)).sum(-1)

    def forward(self, batch: RatingBatch) -> torch.Tensor:
        """The training loss of a batch: binary cross-entropy on the pair logits."""
        return F.binary_cross_entropy_with_logits(self.score(batch), batch.label)

    # Full-ranking training on implicit feedback. Users and items here are 0-based rows and columns of
    # the interaction matrices (row i is id i + 1).

    def ranking_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item representations whose inner products rank the catalogue, [n_users, d], [n_items, d]."""
        raise NotImplementedError(f"{type(self).__name__} does not rank the full catalogue")

    def ranker(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function from 0-based users to scores of every item, [B, n_items] (the tables computed once)."""
        users, items = self.ranking_tables()
        return lambda batch: users[batch] @ items.T

    def pair_loss(
        self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, l2_reg: float
    ) -> dict[str, torch.Tensor]:
        """BPR on (user, positive, negative) rows plus ``l2_reg`` x the squared norm of the rows' own id
        embeddings per row (LightGCN's regulariser); ``loss`` is the total. Needs ``user_embedding`` and
        ``item_embedding`` id tables; other models override it."""
        user_table, item_table = self.ranking_tables()
        bpr = bpr_loss(user_table[users], item_table[positives], item_table[negatives])
        own = [self.user_embedding(users + 1), self.item_embedding(positives + 1), self.item_embedding(negatives + 1)]
        reg = l2_reg * sum(rows.square().sum() for rows in own) / (2 * len(users))
        return {"loss": bpr + reg, "bpr": bpr, "reg": reg}

    def prepare_epoch(self, context: EpochContext) -> dict[str, float]:
        """Work done once per epoch before the BPR steps (DiffMM: train the denoisers and regenerate the
        modality graphs); returns mean losses to log."""
        return {}

    # Next-item prediction on sequences (``datasets.shape: sequence``): histories are left-padded item ids,
    # most recent last, and scores cover every item id with column 0 the padding id.

    def next_item_scores(self, history: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scores of every item id as the item after each history, [B, n_items + 1]; ``generator`` drives any sampling."""
        raise NotImplementedError(f"{type(self).__name__} does not predict next items")

    def next_item_loss(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training loss of predicting ``target`` [B] after ``history`` [B, L]."""
        raise NotImplementedError(f"{type(self).__name__} does not train on next items")

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups that get their own Adam optimizer; ``model`` is the one the BPR steps update."""
        return {"model": [parameter for parameter in self.parameters() if parameter.requires_grad]}


def embedding(count: int, dim: int, init_std: float) -> nn.Embedding:
    """An id embedding with a zero padding row 0 and normal initialisation."""
    table = nn.Embedding(count + 1, dim, padding_idx=0)
    nn.init.normal_(table.weight, std=init_std)
    with torch.no_grad():
        table.weight[0].zero_()
    return table

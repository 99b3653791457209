"""Users the collaborative model never trained on, given as the items they liked.

Id-based models (MF, LightGCN: ``max_history == 0``) keep one trained vector per user, so a new user gets
one by fold-in: the maximum a posteriori user vector under the model's own logit (the inner product with
the frozen item table) for "liked" on each given item, with a Gaussian prior fitted to the trained user
vectors. The prior stands in for the negatives a like-list lacks: with no likes the answer is the average
user, and each like moves the vector towards what it explains. History models (SASRec, DIN) read the
liked items as the history and need no vector.

``GuestUser`` wraps a model so that user id 0 (the padding id, which no real user has) stands for the
folded-in user wherever the model is read: the LLM's CoRA/CoLLM inputs, the image fusion's preference and
the catalogue scores.
"""

from __future__ import annotations

import torch

from minigpt4.data.tensors import RatingBatch
from minigpt4.errors import DiffRecError
from minigpt4.recommenders.base import CollaborativeModel

GUEST_UID = 0
NEWTON_STEPS = 25
PRIOR_JITTER = 1e-4  # added to the prior covariance's diagonal, so a degenerate user table still inverts


def reads_history(model: CollaborativeModel) -> bool:
    """True when the model's user side is computed from the history (no per-user vector to fold in)."""
    return model.max_history > 0


def fold_in_user(model: CollaborativeModel, liked: list[int]) -> torch.Tensor:
    """The MAP user vector [d] of an id-based model for a user who liked ``liked`` (item ids, 1-based)."""
    users, items = (table.detach().float() for table in model.ranking_tables())  # detached: no graph is built
    ids = torch.as_tensor(liked, dtype=torch.long, device=items.device)
    if ids.numel() and (ids.min() < 1 or ids.max() > model.n_items):
        raise DiffRecError(f"liked item ids must lie in 1..{model.n_items}")
    mean = users.mean(0)
    covariance = torch.cov(users.T) + PRIOR_JITTER * torch.eye(users.shape[1], device=users.device)
    precision = torch.linalg.inv(covariance)
    features = items[ids - 1]
    vector = mean.clone()
    # Newton's method on the concave log-posterior: sum log sigmoid(<u, v_i>) - (u - mean)^T P (u - mean) / 2.
    for _ in range(NEWTON_STEPS):
        p = torch.sigmoid(features @ vector)
        gradient = features.T @ (1 - p) - precision @ (vector - mean)
        hessian = -(features.T * (p * (1 - p))) @ features - precision
        vector = vector - torch.linalg.solve(hessian, gradient)
    return vector


class GuestUser(CollaborativeModel):
    """A collaborative model in which user id 0 reads ``vector`` (a folded-in user); every other id, and
    every history model, reads the wrapped model unchanged."""

    def __init__(self, model: CollaborativeModel) -> None:
        super().__init__(model.n_users, model.n_items)
        self.model = model
        self.max_history = model.max_history
        self.padding_invariant = model.padding_invariant
        self.vector: torch.Tensor | None = None

    def _guest_rows(self, batch: RatingBatch) -> torch.Tensor | None:
        """A [B, 1] mask of the guest's rows, or None when no vector is set."""
        if self.vector is None:
            return None
        return (batch.uid == GUEST_UID).unsqueeze(-1)

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The wrapped model's user side, with the guest vector in the guest's rows."""
        users = self.model.user_embeddings(batch)
        guest = self._guest_rows(batch)
        return users if guest is None else torch.where(guest, self.vector.to(users), users)

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The wrapped model's item embeddings."""
        return self.model.item_embeddings(items)

    def score(self, batch: RatingBatch) -> torch.Tensor:
        """The wrapped model's logits; the guest's rows are <vector, item>."""
        scores = self.model.score(batch)
        guest = self._guest_rows(batch)
        if guest is None:
            return scores
        own = self.model.item_embeddings(batch.iid) @ self.vector.to(scores.device)
        return torch.where(guest.squeeze(-1), own.to(scores), scores)

    def ranking_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapped model's tables."""
        return self.model.ranking_tables()

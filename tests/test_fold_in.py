"""Fold-in of a new user: the MAP vector checked against a general-purpose optimiser of the same posterior."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from minigpt4.errors import DiffRecError
from minigpt4.recommenders.base import CollaborativeModel
from minigpt4.recommenders.fold_in import PRIOR_JITTER, fold_in_user, reads_history


class Tables(CollaborativeModel):
    """A model that is only its two ranking tables (what fold-in reads)."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, max_history: int = 0) -> None:
        super().__init__(len(users), len(items))
        self.users, self.items = users, items
        self.max_history = max_history

    def ranking_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.users, self.items


def tables(seed: int, dim: int = 3) -> Tables:
    generator = torch.Generator().manual_seed(seed)
    # users with a non-zero mean and unequal spreads, so the prior's mean and every covariance entry matter
    mixing = torch.randn(dim, dim, generator=generator)
    users = torch.randn(40, dim, generator=generator) @ mixing + torch.tensor([0.5, -1.0, 2.0][:dim])
    return Tables(users.double(), torch.randn(12, dim, generator=generator).double())


def map_by_scipy(model: Tables, liked: list[int]) -> np.ndarray:
    """argmax of sum log sigmoid(<u, v_i>) - (u - mean)^T P (u - mean) / 2, by BFGS from the origin."""
    users, items = model.users.numpy(), model.items.numpy()
    mean = users.mean(0)
    precision = np.linalg.inv(np.cov(users.T) + PRIOR_JITTER * np.eye(users.shape[1]))
    features = items[np.asarray(liked, dtype=int) - 1]

    def negative(u: np.ndarray) -> float:
        return float(np.logaddexp(0, -(features @ u)).sum() + (u - mean) @ precision @ (u - mean) / 2)

    return minimize(negative, np.zeros_like(mean), method="BFGS", options={"gtol": 1e-10}).x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("liked", [[3], [1, 5, 9], [2, 2, 4, 6, 7, 8, 10, 11, 12]])
def test_fold_in_is_the_posterior_maximum(seed, liked):
    model = tables(seed)
    folded = fold_in_user(model, liked)
    assert folded.dtype == torch.float32  # computed in fp32 whatever the tables' dtype
    np.testing.assert_allclose(folded.numpy(), map_by_scipy(model, liked), atol=2e-4)


def test_without_likes_the_new_user_is_the_average_user():
    model = tables(3)
    np.testing.assert_allclose(fold_in_user(model, []).numpy(), model.users.mean(0).numpy(), rtol=1e-6)


def test_each_like_moves_the_vector_towards_that_item():
    model = tables(4)
    base = fold_in_user(model, [])
    for item in range(1, 13):
        moved = fold_in_user(model, [item])
        assert moved @ model.items[item - 1].float() > base @ model.items[item - 1].float()


def test_a_degenerate_user_table_still_folds_in():
    """Every trained user the same vector: the covariance is zero and the jitter makes it invertible."""
    model = Tables(torch.ones(5, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    folded = fold_in_user(model, [1])
    assert torch.isfinite(folded).all() and folded[0] > 1.0 and folded[1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("liked", [[0], [13], [1, 14], [-2]])
def test_ids_outside_the_catalogue_are_refused(liked):
    with pytest.raises(DiffRecError, match=r"liked item ids must lie in 1\.\.12"):
        fold_in_user(tables(0), liked)


def test_history_models_need_no_vector():
    assert not reads_history(tables(0))
    assert reads_history(Tables(torch.zeros(2, 2), torch.zeros(3, 2), max_history=1))

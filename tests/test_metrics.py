"""AUC, UAUC and GAUC against scikit-learn computed user by user."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from minigpt4.evaluation.metrics import auc, ctr_metrics, gauc, uauc


def loop_reference(users, labels, scores):
    """CoLLM's definition written the slow way: per-user sklearn AUC over users with both classes."""
    aucs, sizes = [], []
    for user in np.unique(users):
        keep = users == user
        if 0 < labels[keep].sum() < keep.sum():
            aucs.append(roc_auc_score(labels[keep], scores[keep]))
            sizes.append(keep.sum())
    return float(np.mean(aucs)), float(np.average(aucs, weights=sizes))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_against_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 50, size=2000)
    labels = rng.integers(0, 2, size=2000)
    scores = labels * 0.3 + rng.normal(size=2000)
    if tied:
        scores = np.round(scores, 1)  # many ties: each counts one half
    expected_uauc, expected_gauc = loop_reference(users, labels, scores)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert uauc(users, labels, scores) == pytest.approx(expected_uauc, abs=1e-12)
    assert gauc(users, labels, scores) == pytest.approx(expected_gauc, abs=1e-12)
    both = sum(0 < labels[users == user].sum() < (users == user).sum() for user in np.unique(users))
    assert ctr_metrics(users, labels, scores) == pytest.approx(
        {"auc": roc_auc_score(labels, scores), "uauc": expected_uauc, "gauc": expected_gauc, "n": 2000,
         "users_with_both_classes": both}, abs=1e-12
    )  # fmt: skip
    assert expected_uauc != pytest.approx(expected_gauc, abs=1e-6)  # so the two cannot stand in for each other


def test_users_with_one_class_are_left_out_and_missing_is_nan():
    users = np.array([1, 1, 2, 2, 3])
    labels = np.array([1, 0, 1, 1, 0])
    scores = np.array([0.9, 0.1, 0.5, 0.4, 0.3])
    metrics = ctr_metrics(users, labels, scores)
    assert metrics["uauc"] == 1.0 and metrics["users_with_both_classes"] == 1
    assert math.isnan(auc(np.ones(3), np.arange(3)))
    assert math.isnan(uauc(np.array([1, 2]), np.array([1, 0]), np.array([0.2, 0.3])))

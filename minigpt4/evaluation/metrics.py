"""AUC, CoLLM's UAUC and GAUC, vectorised over users.

UAUC is the unweighted mean of per-user AUC over users with both classes (CoLLM); GAUC weights each
such user's AUC by the user's number of samples. Ties count one half, as in scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (scikit-learn's); NaN when the set is empty or has only one class."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return math.nan
    return float(roc_auc_score(labels, scores))


def per_user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """AUC and sample count of every user with both classes, from within-user average ranks."""
    frame = pd.DataFrame({"user": users, "label": np.asarray(labels, dtype=np.int64), "score": scores})
    frame["rank"] = frame.groupby("user")["score"].rank(method="average")
    grouped = frame.groupby("user")
    n = grouped["label"].size()
    pos = grouped["label"].sum()
    pos_rank_sum = frame["rank"].where(frame["label"] == 1, 0.0).groupby(frame["user"]).sum()
    neg = n - pos
    both = (pos > 0) & (neg > 0)
    user_auc = (pos_rank_sum[both] - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    return pd.DataFrame({"auc": user_auc, "n": n[both]})


def _mean_auc(table: pd.DataFrame, weighted: bool) -> float:
    """Mean of per-user AUCs, unweighted (UAUC) or by sample count (GAUC); NaN without users."""
    if not len(table):
        return math.nan
    return float(np.average(table["auc"], weights=table["n"] if weighted else None))


def uauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """CoLLM's UAUC: unweighted mean of per-user AUC over users with both classes."""
    return _mean_auc(per_user_auc(users, labels, scores), weighted=False)


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-user AUC weighted by each user's sample count."""
    return _mean_auc(per_user_auc(users, labels, scores), weighted=True)


def ctr_metrics(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC, UAUC and GAUC of one evaluation set, plus its size."""
    table = per_user_auc(users, labels, scores)
    return {
        "auc": auc(labels, scores),
        "uauc": _mean_auc(table, weighted=False),
        "gauc": _mean_auc(table, weighted=True),
        "n": int(len(labels)),
        "users_with_both_classes": int(len(table)),
    }

"""Full-ranking evaluation for implicit feedback: every item scored for each evaluated user, the user's
training items masked, then Recall, NDCG and Precision at K.

Recall@K divides the hits in the top K by the user's number of target items; NDCG@K's ideal DCG places
min(target count, K) hits first; Precision@K divides the hits by K. Means are over the users with at
least one target item. Users go through in batches and every step is a tensor operation (no per-user
loop), so a whole catalogue ranks in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from minigpt4.recommenders.graph import dense_rows

DEFAULT_KS = (10, 20, 50)


def full_ranking_metrics(
    score_users: Callable[[torch.Tensor], torch.Tensor],
    train: sp.csr_matrix,
    target: sp.csr_matrix,
    ks: tuple[int, ...] = DEFAULT_KS,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    groups: dict[str, np.ndarray] | None = None,
) -> dict:
    """Mean Recall/NDCG/Precision@K over the users with targets; ``score_users(user ids) -> [B, n_items]`` scores.
    ``groups`` (a name -> boolean mask over all users) adds the same means per group under ``by_group``."""
    device = torch.device(device)
    users = np.flatnonzero(np.diff(target.indptr) > 0)
    names = [f"{name}@{k}" for k in ks for name in ("recall", "ndcg", "precision")]
    if len(users) == 0:  # nothing to rank against: every figure is missing, not zero
        return {name: float("nan") for name in names} | {"users": 0}
    max_k = max(ks)
    discount = 1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64, device=device))
    ideal = torch.cumsum(discount, 0)  # ideal DCG with n hits at the top: ideal[n - 1]
    per_user = {name: np.empty(len(users)) for name in names}
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        with torch.no_grad():  # a block, not a decorator: mutation testing skips decorated functions
            scores = score_users(torch.as_tensor(batch, device=device)).to(device=device, dtype=torch.float32)
        scores = scores.masked_fill(dense_rows(train, batch, device).bool(), -torch.inf)
        top = scores.topk(max_k, dim=1).indices
        hits = dense_rows(target, batch, device).bool().gather(1, top).double()  # [B, max_k]
        counts = torch.as_tensor(np.diff(target.indptr)[batch], dtype=torch.float64, device=device)
        rows = slice(start, start + len(batch))
        for k in ks:
            found = hits[:, :k].sum(1)
            dcg = (hits[:, :k] * discount[:k]).sum(1)
            per_user[f"recall@{k}"][rows] = (found / counts).cpu().numpy()
            per_user[f"precision@{k}"][rows] = (found / k).cpu().numpy()
            per_user[f"ndcg@{k}"][rows] = (dcg / ideal[(counts.clamp(max=k) - 1).long()]).cpu().numpy()
    metrics = {name: float(values.mean()) for name, values in per_user.items()} | {"users": int(len(users))}
    if groups:
        members = {group: mask[users] for group, mask in groups.items()}
        metrics["by_group"] = {
            group: {name: float(values[member].mean()) if member.any() else float("nan") for name, values in per_user.items()} | {"users": int(member.sum())}
            for group, member in members.items()
        }  # fmt: skip
    return metrics


def leave_one_out_metrics(
    score_histories: Callable[[torch.Tensor], torch.Tensor],
    histories: np.ndarray,
    targets: np.ndarray,
    seen: sp.csr_matrix | None,
    ks: tuple[int, ...] = (5, 10, 20),
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    score_padding: bool = False,
    per_batch_mean: bool = False,
    trim_padding: bool = False,
) -> dict[str, float]:
    """HR@K and NDCG@K (x100) of one target item per row, ranked over the whole catalogue.

    ``score_histories(left-padded histories [B, L]) -> [B, n_items + 1]`` scores every item id, column 0
    being the padding id. ``seen`` (rows x item ids) masks each row's history items (None: no masking),
    ``score_padding`` lets the padding id compete, and ``per_batch_mean`` averages per-batch means as
    DiffuRec's code does (its last, smaller batch then weighs as much as a full one). ``trim_padding``
    drops the columns that are padding in every row of a batch (for models whose outputs padding never
    changes). Ties rank the lower item id first."""
    device = torch.device(device)
    max_k = max(ks)
    sums = {f"{name}@{k}": 0.0 for k in ks for name in ("hr", "ndcg")}
    discount = 1.0 / torch.log2(torch.arange(max_k, device=device, dtype=torch.float64) + 2)
    batches = 0
    for start in range(0, len(targets), batch_size):
        rows = np.arange(start, min(start + batch_size, len(targets)))
        batch = histories[rows]
        if trim_padding:
            batch = batch[:, int(np.argmax(batch.any(0))) :]  # argmax: the first column holding an item
        with torch.no_grad():
            scores = score_histories(torch.as_tensor(batch, device=device)).to(device=device, dtype=torch.float32)
        if seen is not None:
            scores = scores.masked_fill(dense_rows(seen, rows, device).bool(), -torch.inf)
        if not score_padding:
            scores = scores.masked_fill(torch.arange(scores.shape[1], device=device) == 0, -torch.inf)
        # A stable sort breaks ties by the lower item id, so tied scores (most-popular's counts) rank reproducibly.
        top = scores.sort(dim=1, descending=True, stable=True).indices[:, :max_k]
        hit = top == torch.as_tensor(targets[rows], device=device)[:, None]  # [B, max_k], at most one True per row
        gain = hit.double() * discount
        weight = 1.0 / len(rows) if per_batch_mean else 1.0
        for k in ks:
            sums[f"hr@{k}"] += hit[:, :k].sum().item() * weight
            sums[f"ndcg@{k}"] += gain[:, :k].sum().item() * weight
        batches += 1
    total = batches if per_batch_mean else len(targets)
    if total == 0:  # nothing to rank: every figure is missing, not zero
        return {name: float("nan") for name in sums} | {"users": 0}
    return {name: 100.0 * value / total for name, value in sums.items()} | {"users": int(len(targets))}

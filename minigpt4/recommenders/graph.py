"""Tensor building blocks the full-ranking recommenders share: normalised bipartite adjacencies, edge
dropout, BPR, InfoNCE (chunked where the all-pairs matrix would not fit), vectorised negative sampling
and top-k graph regeneration. Ids here are 0-based rows and columns of the interaction matrices; in a
bipartite adjacency the users come first, the items after them."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def normalized_adjacency(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int, self_loops: bool = True) -> torch.Tensor:
    """D^-1/2 (A [+ I]) D^-1/2 of the symmetric user-item graph, a coalesced sparse [U+I, U+I] tensor.

    Repeated (user, item) pairs count once, as ``(mat != 0)`` does in the DiffMM family's code."""
    size = n_users + n_items
    pairs = torch.unique(users.long() * n_items + items.long())
    users, items = pairs // n_items, pairs % n_items + n_users
    rows, cols = torch.cat([users, items]), torch.cat([items, users])
    if self_loops:
        diagonal = torch.arange(size, device=rows.device)
        rows, cols = torch.cat([rows, diagonal]), torch.cat([cols, diagonal])
    degree = torch.zeros(size, device=rows.device).index_add_(0, rows, torch.ones(len(rows), device=rows.device))
    inv_sqrt = degree.pow(-0.5).nan_to_num(posinf=0.0)
    values = inv_sqrt[rows] * inv_sqrt[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (size, size), check_invariants=False).coalesce()


def drop_edges(adjacency: torch.Tensor, keep_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each stored entry with probability ``keep_rate`` and rescale the kept ones by 1 / keep_rate."""
    if keep_rate >= 1.0:
        return adjacency
    values, indices = adjacency.values(), adjacency.indices()
    keep = torch.rand(len(values), generator=generator, device=values.device) < keep_rate
    return torch.sparse_coo_tensor(indices[:, keep], values[keep] / keep_rate, adjacency.shape, check_invariants=False).coalesce()


def bpr_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: -log sigmoid(<u, p> - <u, n>), averaged over rows."""
    return -F.logsigmoid((users * positives).sum(-1) - (users * negatives).sum(-1)).mean()


def info_nce(view1: torch.Tensor, view2: torch.Tensor, nodes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrast ``nodes`` across two views of all nodes: positives are the same node in the other view,
    the denominator runs over every node of view 2 (DiffMM's ``contrastLoss``, computed as a logsumexp)."""
    # Row i's positive is column nodes[i], so this is a cross-entropy over the columns; the temperature
    # scales the B x d anchors rather than the B x N logits.
    anchors = F.normalize(view1[nodes], dim=-1) / temperature
    return F.cross_entropy(anchors @ F.normalize(view2, dim=-1).T, nodes)


def _chunk_nce(anchors: torch.Tensor, others: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of one block of anchor rows against every row of ``others``, summed."""
    return F.cross_entropy(anchors @ others.T / temperature, labels, reduction="sum")


def all_pairs_info_nce(view1: torch.Tensor, view2: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """InfoNCE of every row of ``view1`` against every row of ``view2`` (row i's positive is row i), in blocks
    of ``chunk`` rows, each recomputed in backward, so the N x N similarity never lives in memory at once."""
    anchors, others = F.normalize(view1, dim=-1), F.normalize(view2, dim=-1)
    total = anchors.new_zeros(())
    for start in range(0, len(anchors), chunk):
        block = anchors[start : start + chunk]
        labels = torch.arange(start, start + len(block), device=anchors.device)
        if torch.is_grad_enabled() and (block.requires_grad or others.requires_grad):
            total = total + checkpoint(_chunk_nce, block, others, labels, temperature, use_reentrant=False)
        else:
            total = total + _chunk_nce(block, others, labels, temperature)
    return total / len(anchors)


def sample_negatives(train: sp.csr_matrix, users: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """One uniformly drawn item per row of ``users`` that the user has not interacted with in ``train``.

    All rows are drawn at once; rows that hit a training item are redrawn together until none do (the same
    distribution as the per-pair rejection loop of the published code, without the Python loop)."""
    n_items = train.shape[1]
    coo = train.tocoo()
    keys = np.sort(coo.row.astype(np.int64) * n_items + coo.col)
    full = np.flatnonzero(np.diff(train.indptr)[users] >= n_items)
    if len(full):
        raise ValueError(f"user row {users[full[0]]} has interacted with every item: no negative exists")
    negatives = torch.randint(n_items, (len(users),), generator=generator).numpy().astype(np.int64)  # an owned, writable copy
    redraw = np.arange(len(users))
    while len(redraw):
        candidate = users[redraw].astype(np.int64) * n_items + negatives[redraw]
        position = np.minimum(np.searchsorted(keys, candidate), len(keys) - 1)
        redraw = redraw[keys[position] == candidate] if len(keys) else redraw[:0]
        negatives[redraw] = torch.randint(n_items, (len(redraw),), generator=generator).numpy()
    return negatives


def top_k_edges(scores: torch.Tensor, users: torch.Tensor, k: int, seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(user, item) edges to each row's ``k`` highest-scoring items, leaving out ``seen`` (a bool [B, items] mask)."""
    if seen is not None:
        scores = scores.masked_fill(seen, -torch.inf)
    items = scores.topk(k, dim=1).indices
    return users[:, None].expand_as(items).reshape(-1), items.reshape(-1)


def dense_rows(matrix: sp.csr_matrix, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows of a sparse user x item matrix as a dense float tensor (1.0 where there is an interaction)."""
    block = matrix[rows].tocoo()
    dense = torch.zeros(len(rows), matrix.shape[1], device=device)
    dense[torch.as_tensor(block.row, device=device), torch.as_tensor(block.col, device=device)] = 1.0
    return dense

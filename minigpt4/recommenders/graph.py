"""Tensor building blocks the full-ranking recommenders share: normalised bipartite adjacencies, edge
dropout, BPR, InfoNCE (chunked where the all-pairs matrix would not fit), vectorised negative sampling
and top-k graph regeneration. Ids here are 0-based rows and columns of the interaction matrices; in a
bipartite adjacency the users come first, the items after them."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn


def normalized_adjacency(
    users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int, self_loops: bool = True
) -> torch.Tensor:
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


def sparse_mm(graph: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``graph @ dense`` in fp32 even under autocast: CPU autocast would run the sparse product in bf16, which
    its backward cannot take (and propagation is cheap next to the dense losses that autocast speeds up)."""
    with torch.autocast(dense.device.type, enabled=False):
        return torch.sparse.mm(graph, dense.float())


def drop_edges(adjacency: torch.Tensor, keep_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each stored entry with probability ``keep_rate`` and rescale the kept ones by 1 / keep_rate."""
    if keep_rate >= 1.0:
        return adjacency
    values, indices = adjacency.values(), adjacency.indices()
    keep = torch.rand(len(values), generator=generator, device=values.device) < keep_rate
    return torch.sparse_coo_tensor(
        indices[:, keep], values[keep] / keep_rate, adjacency.shape, check_invariants=False
    ).coalesce()


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


class _AllPairsInfoNCE(torch.autograd.Function):
    """Mean cross-entropy of each anchor row against every row of ``others`` (row i's positive is row i).

    The gradient is formed in the forward pass, one block of anchor rows at a time: with P the softmax of a
    block's similarities, d/d anchors = (P - I) others / t and d/d others = (P - I)^T anchors / t. That takes
    three block products where recomputing the block in backward (activation checkpointing) takes four, and
    two instead of three when ``others`` needs no gradient; only the N x d gradients are kept."""

    @staticmethod
    def forward(ctx, anchors: torch.Tensor, others: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        want_anchors, want_others = ctx.needs_input_grad[:2]
        grad_anchors = torch.zeros_like(anchors, dtype=torch.float32) if want_anchors else None
        grad_others = torch.zeros_like(others, dtype=torch.float32) if want_others else None
        total = anchors.new_zeros((), dtype=torch.float32)
        for start in range(0, len(anchors), chunk):
            block = anchors[start : start + chunk]
            rows = torch.arange(len(block), device=anchors.device)
            logits = (block @ others.T).float().div_(temperature)  # under autocast the product runs in bf16
            log_norm = torch.logsumexp(logits, dim=1)
            total = total + (log_norm - logits[rows, rows + start]).sum()
            if want_anchors or want_others:
                residual = logits.sub_(log_norm[:, None]).exp_()  # P - I, formed in the logits' memory
                residual[rows, rows + start] -= 1.0
                if want_anchors:
                    grad_anchors[start : start + chunk] = residual @ others.float()
                if want_others:
                    grad_others += residual.T @ block.float()
        scale = 1.0 / (len(anchors) * temperature)
        ctx.grads = tuple(
            None if grad is None else (grad * scale).to(view.dtype)
            for grad, view in ((grad_anchors, anchors), (grad_others, others))
        )
        return total / len(anchors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = tuple(None if grad is None else grad * grad_output for grad in ctx.grads)
        return (*grads, None, None)


def all_pairs_info_nce(view1: torch.Tensor, view2: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """InfoNCE of every row of ``view1`` against every row of ``view2`` (row i's positive is row i), in blocks
    of ``chunk`` rows, so the N x N similarity never lives in memory at once (see ``_AllPairsInfoNCE``)."""
    return _AllPairsInfoNCE.apply(F.normalize(view1, dim=-1), F.normalize(view2, dim=-1), temperature, chunk)


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
    negatives = (
        torch.randint(n_items, (len(users),), generator=generator).numpy().astype(np.int64)
    )  # an owned, writable copy
    redraw = np.arange(len(users))
    while len(redraw):
        candidate = users[redraw].astype(np.int64) * n_items + negatives[redraw]
        position = np.minimum(np.searchsorted(keys, candidate), len(keys) - 1)
        redraw = redraw[keys[position] == candidate] if len(keys) else redraw[:0]
        negatives[redraw] = torch.randint(n_items, (len(redraw),), generator=generator).numpy()
    return negatives


def top_k_edges(
    scores: torch.Tensor, users: torch.Tensor, k: int, seen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(user, item) edges to each row's ``k`` highest-scoring items, leaving out ``seen`` (a bool [B, items] mask)
    and any item scored -inf (a row with fewer candidates gets fewer edges)."""
    if seen is not None:
        scores = scores.masked_fill(seen, -torch.inf)
    top = scores.topk(k, dim=1)
    keep = torch.isfinite(top.values).reshape(-1)
    return users.repeat_interleave(k)[keep], top.indices.reshape(-1)[keep]


def dense_rows(matrix: sp.csr_matrix, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows of a sparse user x item matrix as a dense float tensor (1.0 where there is an interaction)."""
    block = matrix[rows].tocoo()
    dense = torch.zeros(len(rows), matrix.shape[1], device=device)
    dense[torch.as_tensor(block.row, device=device), torch.as_tensor(block.col, device=device)] = 1.0
    return dense


class StoredGraphs(nn.Module):
    """A module that keeps generated sparse graphs as ``<name>_indices`` / ``<name>_values`` buffers, so a
    checkpoint scores exactly as the model did when it was saved; loading resizes them to the saved edge counts."""

    def store_graph(self, name: str, adjacency: torch.Tensor) -> None:
        """Keep a coalesced sparse graph under ``name``."""
        self.register_buffer(f"{name}_indices", adjacency.indices().contiguous())
        self.register_buffer(f"{name}_values", adjacency.values().contiguous())

    def stored_graph(self, name: str, size: int) -> torch.Tensor:
        """The graph kept under ``name`` as a sparse [size, size] tensor."""
        indices, values = getattr(self, f"{name}_indices"), getattr(self, f"{name}_values")
        return torch.sparse_coo_tensor(indices, values, (size, size), is_coalesced=True, check_invariants=False)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Resize the graph buffers to the checkpoint's edge counts, then load."""
        for key in state_dict:
            if (key.endswith("_indices") or key.endswith("_values")) and key in self._buffers:
                self.register_buffer(key, torch.empty_like(state_dict[key], device=self._buffers[key].device))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def knn_graph(features: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Symmetric-normalised item-item graph of each item's ``k`` most cosine-similar items (itself included),
    weighted by the similarity (LATTICE/FREEDOM's ``build_knn_normalized_graph``), computed in row blocks."""
    normalized = F.normalize(features.float(), dim=-1)
    rows, cols, values = [], [], []
    for start in range(0, len(normalized), chunk):
        similarity = normalized[start : start + chunk] @ normalized.T
        top = similarity.topk(k, dim=1)
        rows.append(torch.arange(start, start + len(similarity)).repeat_interleave(k))
        cols.append(top.indices.reshape(-1))
        values.append(top.values.reshape(-1))
    rows, cols, values = torch.cat(rows), torch.cat(cols), torch.cat(values)
    degree = torch.zeros(len(normalized)).index_add_(0, rows, values)
    inv_sqrt = degree.pow(-0.5).nan_to_num(posinf=0.0)
    weights = inv_sqrt[rows] * values * inv_sqrt[cols]
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), weights, (len(normalized),) * 2, check_invariants=False
    ).coalesce()

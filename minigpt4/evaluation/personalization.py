"""Is a generated image (or reply) personal? Measures over embeddings that can tell.

Similarity to the user's own history alone rewards a generic image that resembles everything, and
rewards copying one history image most. So every figure here is relative or guarded:

- *personal similarity* (DiFashion's Personal Sim): 100 x max(cos, 0) between the output and each of
  its user's held-out liked items, averaged over those items;
- *margin*: that similarity minus its mean over the other users' liked items (the same output scored
  as if it were for someone else); 0 means not personalized;
- *identification*: among the true user and K - 1 seeded random others, is the true user's
  similarity the highest (Acc@1, chance 1/K), with a permutation p-value that reassigns outputs to
  users at random;
- *copy guard*: the largest similarity to any single history item, reported beside the rest.

Run it on every arm (the fused model, alpha forced to 0, a shuffled user's preference) with the same
seeds: only the fused arm should move away from chance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from minigpt4.errors import DiffRecError


def clip_scores(outputs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """[N, I]: 100 x max(cos, 0) between every output and every item."""
    return 100 * (F.normalize(outputs.float(), dim=-1) @ F.normalize(items.float(), dim=-1).T).clamp(min=0)


def user_similarity(
    scores: torch.Tensor, liked: Sequence[Sequence[int]], exclude: Sequence[int] | None = None
) -> np.ndarray:
    """[N, U]: from ``clip_scores`` [N, I], each output's mean score over each user's liked items, leaving
    out item ``exclude[n]`` for output n (NaN where that leaves a user nothing)."""
    membership = torch.zeros(len(liked), scores.shape[1], dtype=torch.float64)
    for user, rows in enumerate(liked):
        membership[user, list(rows)] = 1.0
    scores = scores.double()
    sums, counts = scores @ membership.T, membership.sum(dim=1).expand(len(scores), -1).clone()
    if exclude is not None:
        rows = torch.arange(len(scores))
        left_out = torch.as_tensor(list(exclude))
        sums -= scores[rows, left_out][:, None] * membership[:, left_out].T
        counts -= membership[:, left_out].T
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).numpy()


def draw_distractors(owner: np.ndarray, users: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[N, k - 1]: for each output, k - 1 distinct users drawn at random among those other than its owner."""
    keys = rng.random((len(owner), users))
    keys[np.arange(len(owner)), owner] = np.inf  # never the owner
    return np.argpartition(keys, k - 2, axis=1)[:, : k - 1]


def identification_accuracy(similarity: np.ndarray, owner: np.ndarray, distractors: np.ndarray) -> float:
    """Share of outputs whose owner scores strictly above every one of its distractor users (ties and an
    owner without a score miss; a distractor without one cannot win)."""
    rows = np.arange(len(owner))
    best_other = np.nan_to_num(similarity[rows[:, None], distractors], nan=-np.inf).max(axis=1)
    return float((np.nan_to_num(similarity[rows, owner], nan=-np.inf) > best_other).mean())


def personalization_metrics(
    outputs: torch.Tensor,
    owner: Sequence[int],
    items: torch.Tensor,
    liked: Sequence[Sequence[int]],
    history: Sequence[Sequence[int]] | None = None,
    exclude: Sequence[int] | None = None,
    k: int = 10,
    permutations: int = 1000,
    seed: int = 0,
) -> dict:
    """Personal similarity, margin, identification Acc@1 among ``k`` users with its permutation p-value,
    and (with ``history``) the copy guard, for outputs [N, D] each made for user ``owner[n]``.

    ``liked[u]`` are user u's held-out liked rows of ``items`` [I, D]; ``history[u]`` the rows the
    generator saw; ``exclude[n]`` an item row that never counts for output n (the item it was asked to
    draw: resembling it says nothing about the user). Users without liked items cannot be scored: the
    caller leaves them out.
    """
    owner = np.asarray(owner, dtype=np.int64)
    users = len(liked)
    if users < k:
        raise DiffRecError(
            f"identification among {k} users needs at least {k} users with held-out liked items, got {users}"
        )
    empty = [user for user, rows in enumerate(liked) if len(rows) == 0]
    if empty:
        raise DiffRecError(f"user {empty[0]} has no held-out liked item to score against")
    scores = clip_scores(outputs, items)
    similarity = user_similarity(scores, liked, exclude)
    rows = np.arange(len(owner))
    own = similarity[rows, owner]
    masked = similarity.copy()
    masked[rows, owner] = np.nan
    with np.errstate(invalid="ignore"):
        others = np.nanmean(masked, axis=1)
    scored = ~np.isnan(own) & ~np.isnan(others)
    rng = np.random.default_rng(seed)
    accuracy = identification_accuracy(similarity, owner, draw_distractors(owner, users, k, rng))
    # Under the null an output says nothing about its user: reassign outputs to users at random.
    null = []
    for _ in range(permutations):
        shuffled = rng.permutation(owner)
        null.append(identification_accuracy(similarity, shuffled, draw_distractors(shuffled, users, k, rng)))
    metrics = {
        "outputs": len(owner),
        "users": users,
        "scored_outputs": int(scored.sum()),  # an owner left with no liked item after ``exclude`` has no similarity
        "personal_similarity": float(own[scored].mean()) if scored.any() else None,
        "margin": float((own - others)[scored].mean()) if scored.any() else None,
        "identification_acc1": accuracy,
        "identification_chance": 1 / k,
        "identification_p_value": (1 + sum(value >= accuracy for value in null)) / (1 + permutations),
    }
    if history is not None:
        nearest = [
            float(scores[row, list(history[user])].max()) for row, user in enumerate(owner) if len(history[user])
        ]
        metrics["copy_guard"] = {"mean": float(np.mean(nearest)), "max": float(np.max(nearest))} if nearest else None
    return metrics


def index_items(
    liked: Sequence[Sequence[int]], history: Sequence[Sequence[int]]
) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """The item ids that ``liked`` and ``history`` (per user) name, each once, and both as rows of that list:
    what ``personalization_metrics`` takes once the items are embedded in that order."""
    items = sorted({int(iid) for values in (*liked, *history) for iid in values})
    row = {iid: index for index, iid in enumerate(items)}
    return (
        items,
        [[row[int(iid)] for iid in values] for values in liked],
        [[row[int(iid)] for iid in values] for values in history],
    )


def shuffled_donors(users: np.ndarray, seed: int) -> np.ndarray:
    """For each pair, a seeded other pair whose user differs (a shuffled-user control arm); itself only when every
    pair has the same user."""
    rng = np.random.default_rng(seed)
    donors = rng.permutation(len(users))
    for position in np.flatnonzero(users[donors] == users):
        candidates = np.flatnonzero(users != users[position])
        if len(candidates):
            donors[position] = rng.choice(candidates)
    return donors

"""How much GenRec-V1's flip denoiser listens to its input, before and after training, and what its
generated graph holds. Prints one JSON line per figure.

For a trained checkpoint and a freshly initialised denoiser of the same shape (the comparison in the same
run), on the first ``--users`` training rows at step 0:
- ``logit_std_over_users``: the spread of each item's logit across users, averaged over items (0 when the
  output ignores the row),
- ``logit_std_over_items``: the spread across items within a row, averaged over users (the scale to compare with),
- ``p_training_items`` / ``p_other_items``: the mean predicted probability on the users' training items and on the rest,
and, for the checkpoint, the generated graph it stores: how many users have an edge, how many distinct items the edges reach and
the share of those users linked to the most common one.

    python bench/genrec_denoiser.py runs/genrec_tiktok/latest/checkpoints/best --data dataset/diffmm-tiktok
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit  # noqa: E402  (bench/measure.py)

from minigpt4.data.implicit import load_implicit_dataset  # noqa: E402
from minigpt4.recommenders import load_recommender  # noqa: E402
from minigpt4.recommenders.genrec import FlipDenoiser, GenRec  # noqa: E402
from minigpt4.recommenders.graph import dense_rows  # noqa: E402


@torch.no_grad()
def input_dependence(denoiser: FlipDenoiser, rows: torch.Tensor) -> dict[str, float]:
    """Spread of the step-0 logits across users and across items, and the mean probability on held vs other items."""
    denoiser.eval()
    logits = denoiser(rows, torch.zeros(len(rows), dtype=torch.long)).float()
    probs = torch.sigmoid(logits)
    return {
        "logit_std_over_users": logits.std(0).mean().item(),
        "logit_std_over_items": logits.std(1).mean().item(),
        "p_training_items": ((probs * rows).sum() / rows.sum()).item(),
        "p_other_items": ((probs * (1 - rows)).sum() / (1 - rows).sum()).item(),
    }


def generated_graph_reach(model: GenRec) -> dict[str, float]:
    """Distinct items among the stored generated graph's user -> item edges, and the most common item's share of users."""
    indices = model.generated_indices
    user_to_item = indices[:, (indices[0] < model.n_users) & (indices[1] >= model.n_users)]
    items = user_to_item[1] - model.n_users
    counts = torch.bincount(items, minlength=model.n_items)
    users = user_to_item[0].unique().numel()
    return {
        "users_with_edges": users,
        "generated_edges": items.numel(),
        "distinct_items": int((counts > 0).sum()),
        "top_item_user_share": counts.max().item() / max(users, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoints", nargs="+", type=Path, help="GenRec checkpoint folders (model.safetensors + config.json)"
    )
    parser.add_argument("--data", type=Path, required=True, help="the dataset root the checkpoints were trained on")
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_implicit_dataset(args.data)
    rows = dense_rows(data.matrices["train"], np.arange(min(args.users, data.n_users)))
    for folder in args.checkpoints:
        model = load_recommender(folder, n_users=data.n_users, n_items=data.n_items)
        if not isinstance(model, GenRec):
            raise SystemExit(f"{folder}: not a genrec checkpoint")
        config = model.config
        torch.manual_seed(args.seed)
        fresh = FlipDenoiser(
            data.n_items,
            config.denoiser_width,
            config.denoiser_heads,
            config.denoiser_layers,
            config.denoiser_dropout,
            config.time_embedding_size,
        )
        label = {"checkpoint": str(folder), "faithful": config.faithful}
        emit(
            "float32",
            figure="genrec denoiser, freshly initialised",
            **label,
            users=len(rows),
            **input_dependence(fresh, rows),
        )
        emit(
            "float32",
            figure="genrec denoiser, trained",
            **label,
            users=len(rows),
            **input_dependence(model.denoiser, rows),
        )
        emit("float32", figure="genrec generated graph", **label, **generated_graph_reach(model))


if __name__ == "__main__":
    main()

"""The full-ranking models on DiffMM's TikTok: seconds per training epoch of each model, our vectorised
negative sampling and graph regeneration against the published per-pair Python loops (same inputs), and
our all-pairs InfoNCE (gradient formed in the forward pass) against block recomputation in backward.

The loops are the DiffMM family's: ``negSampling`` draws one item per training pair and retries while the
pair is in a DOK matrix; regeneration appends one (user, item, 1.0) triple per top-k entry from Python and
builds the normalised adjacency with SciPy. Prints one JSON line per figure.

    python bench/graph_diffusion.py                       # every model, full epochs
    python bench/graph_diffusion.py --models mdmns --bpr-steps 5   # BPR phase timed on 5 steps, extrapolated
    python bench/graph_diffusion.py --models mdmns --bpr-steps 5 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit  # noqa: E402  (bench/measure.py)

from minigpt4.config import load_config  # noqa: E402
from minigpt4.data.implicit import import_diffmm_folder, load_implicit_dataset, save_implicit_dataset  # noqa: E402
from minigpt4.recommenders import build_recommender  # noqa: E402
from minigpt4.recommenders.base import EpochContext  # noqa: E402
from minigpt4.recommenders.graph import all_pairs_info_nce, normalized_adjacency, sample_negatives  # noqa: E402
from minigpt4.training.implicit import _edges  # noqa: E402

MODELS = ["mostpop", "mf", "lightgcn", "diffmm", "mdmns", "genrec"]


def loop_negatives(train: sp.csr_matrix, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The published negative sampling: one retry loop per training pair against a DOK matrix."""
    dok = train.todok()
    negatives = np.zeros(len(users), dtype=np.int64)
    for index, user in enumerate(users):
        while True:
            item = rng.integers(train.shape[1])
            if (user, item) not in dok:
                break
        negatives[index] = item
    return negatives


def loop_regeneration(user_ids: torch.Tensor, indices: torch.Tensor, n_users: int, n_items: int) -> sp.coo_matrix:
    """The published regeneration from top-k indices: Python appends per (user, item), then SciPy's normalised adjacency."""
    users, items, edges = [], [], []
    for row in range(indices.shape[0]):
        for col in range(indices[row].shape[0]):
            users.append(int(user_ids[row].numpy()))
            items.append(int(indices[row][col].numpy()))
            edges.append(1.0)
    matrix = sp.coo_matrix((edges, (users, items)), shape=(n_users, n_items), dtype=np.float32)
    matrix = sp.vstack(
        [
            sp.hstack([sp.csr_matrix((n_users, n_users)), matrix]),
            sp.hstack([matrix.T, sp.csr_matrix((n_items, n_items))]),
        ]
    )
    matrix = ((matrix != 0) * 1.0 + sp.eye(matrix.shape[0])) * 1.0
    degree = np.asarray(matrix.sum(axis=-1)).ravel()
    inv_sqrt = np.power(degree, -0.5)
    inv_sqrt[np.isinf(inv_sqrt)] = 0.0
    return matrix.dot(sp.diags(inv_sqrt)).transpose().dot(sp.diags(inv_sqrt)).tocoo()


def timed(function, *args, repeats: int = 1):
    """(seconds, result): the fastest of ``repeats`` calls (the first call pays one-time warm-up costs)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def block_cross_entropy(
    block: torch.Tensor, others: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy of a block of anchor rows against every row of ``others``, summed."""
    return F.cross_entropy(block @ others.T / temperature, labels, reduction="sum")


def recomputed_info_nce(view1: torch.Tensor, view2: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """The straightforward chunked InfoNCE: each block's cross-entropy under activation checkpointing."""
    anchors, others = F.normalize(view1, dim=-1), F.normalize(view2, dim=-1)
    total = anchors.new_zeros(())
    for start in range(0, len(anchors), chunk):
        block = anchors[start : start + chunk]
        labels = torch.arange(start, start + len(block))
        total = total + checkpoint(block_cross_entropy, block, others, labels, temperature, use_reentrant=False)
    return total / len(anchors)


def info_nce_seconds(rows: int, dim: int, others_grad: bool, bf16: bool) -> dict:
    """Forward + backward of both InfoNCE versions at MDMNS's TikTok shapes; the fastest of two calls each."""
    torch.manual_seed(0)
    anchors, others = torch.randn(rows, dim, requires_grad=True), torch.randn(rows, dim, requires_grad=others_grad)
    figures, grads = {}, {}

    def step(function) -> torch.Tensor:
        anchors.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = function(anchors, others, 0.5, 4096)
        loss.backward()
        return anchors.grad

    for name, function in (("recomputed", recomputed_info_nce), ("ours", all_pairs_info_nce)):
        figures[name], grads[name] = timed(step, function, repeats=2)
    scale = grads["recomputed"].abs().max().item()
    return {
        "rows": rows,
        "dim": dim,
        "others_trained": others_grad,
        "bf16": bf16,
        "recomputed_seconds": round(figures["recomputed"], 3),
        "ours_seconds": round(figures["ours"], 3),
        "speedup": round(figures["recomputed"] / figures["ours"], 2),
        "max_grad_difference_relative": float(
            f"{(grads['ours'] - grads['recomputed']).abs().max().item() / scale:.2g}"
        ),
    }


def epoch_seconds(arch: str, dataset, bpr_steps: int | None, bf16: bool) -> dict:
    """Seconds of one training epoch (the model's own phase + BPR steps) with its TikTok config."""
    config = load_config(ROOT / "train_configs" / f"{arch}_tiktok.yaml")
    torch.manual_seed(config.run.seed)
    features = {name: torch.as_tensor(values, dtype=torch.float32) for name, values in dataset.features.items()}
    model = build_recommender(config.model, dataset.n_users, dataset.n_items, _edges(dataset), features)
    optimizers = {
        name: torch.optim.Adam(params, lr=config.run.lr) for name, params in model.optimizer_groups().items() if params
    }
    if not optimizers:
        return {
            "model": arch,
            "mixed_precision": "bf16" if bf16 else "no",
            "seconds_per_epoch": 0.0,
            "note": "nothing to train",
        }
    train = dataset.matrices["train"]
    context = EpochContext(
        train, config.run.batch_size, torch.Generator().manual_seed(0), optimizers, torch.device("cpu")
    )
    model.train()
    phase, _ = timed(model.prepare_epoch, context)
    coo = train.tocoo()
    users, items = coo.row.astype(np.int64), coo.col.astype(np.int64)
    negatives = sample_negatives(train, users, context.generator)
    steps = -(-len(users) // config.run.batch_size)
    run_steps = min(steps, bpr_steps or steps)
    start = time.perf_counter()
    for step in range(run_steps):
        rows = slice(step * config.run.batch_size, (step + 1) * config.run.batch_size)
        with torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=bf16
        ):  # as the trainer does under run.mixed_precision=bf16
            loss = model.pair_loss(
                *(torch.as_tensor(column[rows]) for column in (users, items, negatives)), config.run.l2_reg
            )["loss"]
        optimizers["model"].zero_grad()
        loss.backward()
        optimizers["model"].step()
    bpr = (time.perf_counter() - start) * steps / run_steps
    return {
        "model": arch,
        "mixed_precision": "bf16" if bf16 else "no",
        "seconds_per_epoch": round(phase + bpr, 2),
        "model_phase_seconds": round(phase, 2),
        "bpr_seconds": round(bpr, 2),
        "bpr_steps_timed": run_steps,
        "bpr_steps": steps,
        "estimated": run_steps < steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "dataset" / "diffmm-tiktok")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--bpr-steps", type=int, default=None, help="time this many BPR steps and extrapolate to the epoch"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "bf16"],
        default="no",
        help="the BPR-phase losses under bf16 autocast, as run.mixed_precision",
    )
    args = parser.parse_args()
    if not (args.data / "implicit" / "meta.json").is_file():
        save_implicit_dataset(args.data, *import_diffmm_folder(ROOT.parent / "shared" / "data" / "diffmm-tiktok"))
    dataset = load_implicit_dataset(args.data)
    train = dataset.matrices["train"]
    coo = train.tocoo()
    users = coo.row.astype(np.int64)

    loop_time, _ = timed(loop_negatives, train, users, np.random.default_rng(0), repeats=3)
    ours_time, ours = timed(sample_negatives, train, users, torch.Generator().manual_seed(0), repeats=3)
    assert not np.asarray(train[users, ours]).any()
    emit(
        "int64 ids",
        figure="negative_sampling",
        pairs=len(users),
        loop_seconds=round(loop_time, 3),
        vectorised_seconds=round(ours_time, 4),
        speedup=round(loop_time / ours_time, 1),
    )

    torch.manual_seed(0)  # the same top-5 items per user for both (the top-k itself is one torch call in both)
    user_ids = torch.arange(dataset.n_users)
    indices = torch.rand(dataset.n_users, dataset.n_items).topk(5, dim=1).indices
    loop_time, reference = timed(loop_regeneration, user_ids, indices, dataset.n_users, dataset.n_items, repeats=3)

    def vectorised() -> torch.Tensor:
        u, i = user_ids.repeat_interleave(5), indices.reshape(-1)
        return normalized_adjacency(u, i, dataset.n_users, dataset.n_items)

    ours_time, adjacency = timed(vectorised, repeats=3)
    rows, cols = adjacency.indices().numpy()
    ours = sp.coo_matrix((adjacency.values().numpy(), (rows, cols)), shape=reference.shape)
    same = abs(ours - reference).max() < 1e-6
    emit(
        "float32",
        figure="graph_regeneration",
        users=dataset.n_users,
        k=5,
        loop_seconds=round(loop_time, 3),
        vectorised_seconds=round(ours_time, 4),
        speedup=round(loop_time / ours_time, 1),
        same_graph=bool(same),
    )

    # MDMNS on TikTok: 512-d, users (both views trained) and items against their noised, detached copies
    for rows, others_grad in ((dataset.n_users, True), (dataset.n_items, False)):
        for bf16 in (False, True):
            emit(
                "bf16 autocast" if bf16 else "float32",
                figure="all_pairs_info_nce",
                **info_nce_seconds(rows, 512, others_grad, bf16),
            )

    for arch in filter(None, args.models.split(",")):
        emit(
            "bf16 autocast" if args.mixed_precision == "bf16" else "float32",
            figure="seconds_per_epoch",
            data=str(args.data.name),
            **epoch_seconds(arch, dataset, args.bpr_steps, args.mixed_precision == "bf16"),
        )


if __name__ == "__main__":
    main()

"""Full-ranking training on the implicit shape (``datasets.shape: implicit``): most-popular, MF and LightGCN
with BPR, DiffMM, MDMNS and GenRec-V1, one loop for all of them.

Each epoch runs the model's own phase first (``prepare_epoch``: DiffMM's denoisers and graph
regeneration), then BPR steps over every training pair with one freshly sampled negative each. After each
evaluated epoch both validation and test are ranked, so one run yields both protocols: the default selects
the epoch by validation ``run.select_metric`` and reports test there; ``run.paper_parity`` selects by the
test metric itself (the published code's protocol) and is labelled so in every output. Early stopping
and the kept checkpoint follow the run's protocol. ``run.mixed_precision: bf16`` computes every training loss
(the denoisers' and ``pair_loss``) under bf16 autocast, sparse propagation in fp32; graph regeneration, the
weights, the optimizer and evaluation stay fp32. ``checkpoints/last`` and ``run.resume_from`` work as for
the leave-one-out trainer (``minigpt4.training.sequential``): a resumed run continues exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minigpt4.config import Config
from minigpt4.data.implicit import ImplicitDataset, load_implicit_dataset
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.ranking import full_ranking_metrics
from minigpt4.io import json_safe
from minigpt4.recommenders import build_recommender, save_recommender
from minigpt4.recommenders.base import CollaborativeModel, EpochContext
from minigpt4.recommenders.graph import sample_negatives
from minigpt4.training.run_folder import (
    find_epoch_state,
    logger,
    restore_epoch_state,
    save_epoch_state,
    start_ranking_run,
    write_metrics,
)

PAPER_PARITY = "paper_parity: epoch selected by test {metric}, validation ignored (the published code's protocol)"
VALIDATION = "validation: epoch selected by valid {metric}, test reported at that epoch"


def protocol_label(config: Config) -> str:
    """The selection protocol in words, as every report names it."""
    return (PAPER_PARITY if config.run.paper_parity else VALIDATION).format(metric=config.run.select_metric)


def _edges(dataset: ImplicitDataset) -> torch.Tensor:
    """The training pairs as 1-based (uid, iid) edges, [2, E]."""
    coo = dataset.matrices["train"].tocoo()
    return torch.as_tensor(np.stack([coo.row, coo.col]).astype(np.int64) + 1)


@torch.no_grad()
def evaluate_ranking(
    model: CollaborativeModel, dataset: ImplicitDataset, split: str, ks: list[int], device: torch.device
) -> dict:
    """Recall/NDCG/Precision@K on ``split``, the user's training items masked; where some evaluated users have no
    training items (a split in time), the same figures for those (``cold``) and the rest (``warm``) under ``by_group``."""
    was_training = model.training
    model.eval()
    train, target = dataset.matrices["train"], dataset.matrices[split]
    warm = np.diff(train.indptr) > 0
    groups = {"warm": warm, "cold": ~warm} if (~warm & (np.diff(target.indptr) > 0)).any() else None
    metrics = full_ranking_metrics(model.ranker(), train, target, tuple(ks), device=device, groups=groups)
    model.train(was_training)
    return metrics


def pretrain_implicit(config: Config) -> dict:
    """Train (or, with ``run.evaluate``, only evaluate) a full-ranking model; returns the metrics."""
    dataset = load_implicit_dataset(config.datasets.path, config.datasets.modalities)
    resume = None  # a bad resume folder fails before the run folder exists
    if config.run.resume_from is not None and not config.run.evaluate:
        resume = find_epoch_state(config, protocol_label(config), dataset.n_users, dataset.n_items)
    model, run_dir, device, hardware = start_ranking_run(
        config, dataset.n_users, dataset.n_items, "full-ranking training"
    )
    logger.info(
        "run folder %s on %s; %d users, %d items, %d training pairs, modalities %s",
        run_dir,
        device,
        dataset.n_users,
        dataset.n_items,
        dataset.matrices["train"].nnz,
        list(dataset.features) or "none",
    )
    if model is not None:
        model = model.to(device)
        metrics = {
            "checkpoint": str(config.run.ckpt),
            **{
                split: evaluate_ranking(model, dataset, split, config.run.ranking_ks, device)
                for split in ("valid", "test")
            },
        }
    else:
        metrics = _train(config, dataset, device, run_dir, resume)
    metrics = json_safe(
        {
            "run_dir": str(run_dir),
            "model": config.model.arch,
            "dataset": config.datasets.name,
            "protocol": protocol_label(config),
            **metrics,
            "hardware": hardware,
        }
    )
    write_metrics(run_dir, metrics)
    return metrics


def _train(
    config: Config,
    dataset: ImplicitDataset,
    device: torch.device,
    run_dir: Path,
    resume: tuple[Path, CollaborativeModel] | None,
) -> dict:
    """The epoch loop (from ``resume``'s folder and model if given); returns both protocols' selections, the
    curve and timings."""
    run = config.run
    if resume is not None:
        model = resume[1]
    else:
        features = {name: torch.as_tensor(values, dtype=torch.float32) for name, values in dataset.features.items()}
        model = build_recommender(config.model, dataset.n_users, dataset.n_items, _edges(dataset), features)
    model = model.to(device)
    groups = {name: params for name, params in model.optimizer_groups().items() if params}
    optimizers = {
        name: torch.optim.Adam(params, lr=run.lr, weight_decay=run.weight_decay) for name, params in groups.items()
    }
    train = dataset.matrices["train"]
    coo = train.tocoo()
    pair_users, pair_items = coo.row.astype(np.int64), coo.col.astype(np.int64)
    generator = torch.Generator().manual_seed(run.seed)
    context = EpochContext(train, run.batch_size, generator, optimizers, device, bf16=run.mixed_precision == "bf16")
    metric = run.select_metric
    checkpoints = run_dir / "checkpoints"
    best_dir = checkpoints / "best"
    # by_valid / by_test: the epoch each protocol selects so far, with its figures (None before the first evaluation)
    progress = {
        "epoch": 0,
        "by_valid": None,
        "by_test": None,
        "stale": 0,
        "curve": [],
        "epoch_seconds": [],
        "protocol": protocol_label(config),
    }
    if resume is not None:
        progress = restore_epoch_state(resume[0], optimizers, {}, generator, device, best_dir)
        logger.info("resumed from %s after epoch %d", resume[0], progress["epoch"])
    epochs = (
        range(progress["epoch"] + 1, run.max_epochs + 1) if optimizers else range(0)
    )  # nothing to train: evaluate once
    bar = tqdm(epochs, desc=f"pretrain {config.model.arch}", disable=not optimizers)
    for epoch in bar:
        start, stop = time.perf_counter(), False
        model.train()
        losses = model.prepare_epoch(context)
        if "model" in optimizers:
            losses |= _bpr_epoch(model, optimizers["model"], pair_users, pair_items, context, run.l2_reg)
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        if bad:
            raise DiffRecError(
                f"{bad[0]} became {losses[bad[0]]} at epoch {epoch}; training stopped, the selected checkpoint so far is kept at {best_dir if best_dir.exists() else '(none yet)'}"
            )
        progress["epoch_seconds"].append(time.perf_counter() - start)
        progress["epoch"] = epoch
        if epoch % run.eval_every == 0 or epoch == run.max_epochs:
            valid = evaluate_ranking(model, dataset, "valid", run.ranking_ks, device)
            test = evaluate_ranking(model, dataset, "test", run.ranking_ks, device)
            curve_point = {
                "epoch": epoch,
                "seconds": round(sum(progress["epoch_seconds"]), 3),
                **{k: round(v, 6) for k, v in losses.items()},
                f"valid_{metric}": valid[metric],
                f"test_{metric}": test[metric],
            }
            progress["curve"].append(curve_point)
            logger.info("epoch %d (%.1f s): %s", epoch, progress["epoch_seconds"][-1], json_safe(curve_point))
            by_valid, by_test = progress["by_valid"], progress["by_test"]
            improved_valid = by_valid is None or valid[metric] > by_valid["valid"][metric]
            improved_test = by_test is None or test[metric] > by_test["test"][metric]
            if improved_valid:
                progress["by_valid"] = {"epoch": epoch, "valid": valid, "test": test}
            if improved_test:
                progress["by_test"] = {"epoch": epoch, "test": test}
            bar.set_postfix({f"valid_{metric}": f"{valid[metric]:.4f}", f"test_{metric}": f"{test[metric]:.4f}"})
            if improved_test if run.paper_parity else improved_valid:
                progress["stale"] = 0
                save_recommender(model, config.model, best_dir, {"epoch": epoch, "protocol": progress["protocol"]})
            else:
                progress["stale"] += 1
                stop = progress["stale"] >= run.patience
        save_epoch_state(checkpoints / "last", model, config, optimizers, {}, generator, progress)
        if stop:
            logger.info(
                "early stop at epoch %d: %s has not improved for %d evaluations",
                epoch,
                "test" if run.paper_parity else "valid",
                progress["stale"],
            )
            break
    if not optimizers:
        save_recommender(model, config.model, best_dir, {"epoch": 0, "protocol": progress["protocol"]})
        progress["by_valid"] = {
            "epoch": 0,
            **{split: evaluate_ranking(model, dataset, split, run.ranking_ks, device) for split in ("valid", "test")},
        }
        progress["by_test"] = {"epoch": 0, "test": progress["by_valid"]["test"]}
    epoch_seconds = progress["epoch_seconds"]
    return {
        "selected": progress["by_test"] if run.paper_parity else progress["by_valid"],
        "valid_selection": progress["by_valid"],
        "paper_parity_selection": progress["by_test"],
        "epochs_run": progress["epoch"],
        "mixed_precision": run.mixed_precision,
        "seconds_per_epoch": round(float(np.mean(epoch_seconds)), 3) if epoch_seconds else None,
        "train_seconds": round(sum(epoch_seconds), 3),
        "checkpoint": str(best_dir),
        "curve": progress["curve"],
    }


def _bpr_epoch(
    model: CollaborativeModel,
    optimizer: torch.optim.Optimizer,
    users: np.ndarray,
    items: np.ndarray,
    context: EpochContext,
    l2_reg: float,
) -> dict[str, float]:
    """One pass of BPR steps over every training pair, each with a fresh negative (the losses in the context's
    autocast); mean losses."""
    negatives = sample_negatives(context.train, users, context.generator)
    order = torch.randperm(len(users), generator=context.generator).numpy()
    sums: dict[str, float] = {}
    steps = 0
    for start in range(0, len(order), context.batch_size):
        rows = order[start : start + context.batch_size]
        batch = [torch.as_tensor(column[rows], device=context.device) for column in (users, items, negatives)]
        with context.autocast():
            losses = model.pair_loss(*batch, l2_reg)
        if not torch.isfinite(losses["loss"]):  # the caller stops and names the checkpoint it keeps
            return {name: value.item() for name, value in losses.items()}
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.item()
        steps += 1
    return {name: total / steps for name, total in sums.items()}

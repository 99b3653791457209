"""Next-item training and leave-one-out evaluation on the sequence shape (``datasets.shape: sequence``):
most-popular, SASRec and DiffuRec, one loop for all of them.

Training samples are every prefix of each user's training sequence with the item after it as the target
(DiffuRec's training set), reshuffled each epoch and cut into left-padded windows of the model's
``max_history`` items one batch at a time. For models whose outputs padding cannot change, each batch is
trimmed to its longest history, and ``run.group_by_length`` batches similar lengths together so the
trimming pays (on Beauty, where most histories are short, it removes about 80% of the transformer work).
``run.mixed_precision: bf16`` computes the training loss under bf16 autocast (weights, optimizer and
evaluation stay fp32, so bf16 rounding cannot create ties in the ranking). Every ``run.eval_every`` epochs
the validation targets are ranked (history: the training sequence); the epoch with the best validation ``run.select_metric`` is
kept, and the test targets (history: training sequence plus the validation item) are ranked once with
those weights. Evaluation masks the user's history items and never scores the padding id;
``run.paper_parity`` evaluates as DiffuRec's code did instead (no masking, the padding id scored, means of
per-batch means, the epoch kept when any validation figure improves) and is labelled so in every output.

After every epoch ``checkpoints/last`` holds what a later run needs to continue exactly where this one stopped
(weights, Adam and learning-rate state, both random streams, the curve and the selection so far);
``run.resume_from`` names such a folder (``latest``: the newest under ``run.output_dir``) and ``run.max_epochs``
is then the total, so a schedule longer than one sitting is trained in pieces with the same result.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from minigpt4.config import Config, RunConfig
from minigpt4.data.sequences import SequenceDataset, left_padded, load_sequence_dataset
from minigpt4.errors import DiffRecError, require_file
from minigpt4.evaluation.ranking import leave_one_out_metrics
from minigpt4.io import json_safe
from minigpt4.recommenders import build_recommender, save_recommender
from minigpt4.recommenders.base import CollaborativeModel
from minigpt4.training.run_folder import (
    find_epoch_state,
    logger,
    restore_epoch_state,
    save_epoch_state,
    start_ranking_run,
    write_metrics,
)

PAPER_PARITY = ("paper_parity: DiffuRec's evaluation (history items not masked, padding id scored, mean of per-batch means over "
                "batches of {batch}; the epoch kept when any validation figure improves)")  # fmt: skip
DEFAULT = "leave-one-out: history items masked, padding id excluded, epoch selected by valid {metric}, test ranked once at that epoch"


def protocol_label(config: Config) -> str:
    """The evaluation protocol in words, as every report names it."""
    if config.run.paper_parity:
        return PAPER_PARITY.format(batch=config.run.eval_batch_size)
    label = DEFAULT.format(metric=config.run.select_metric)
    return label if config.run.mask_history else label.replace("history items masked", "history items not masked")


def _history_edges(dataset: SequenceDataset) -> torch.Tensor:
    """Every (uid, item) occurrence in the training sequences, [2, E] (most-popular counts them)."""
    users = np.repeat(dataset.uid, dataset.ends - dataset.starts)
    return torch.as_tensor(np.stack([users, dataset.items]))


@torch.no_grad()
def evaluate_sequences(
    model: CollaborativeModel, dataset: SequenceDataset, split: str, config: Config, device: torch.device
) -> dict[str, float]:
    """HR/NDCG@K (x100) of ``split``'s targets under the run's protocol; sampling models draw from a generator
    seeded by ``run.seed``, so the same weights always give the same figures."""
    run = config.run
    histories, targets, seen = dataset.evaluation_inputs(split, model.max_history or 1)
    parity = run.paper_parity
    if (
        model.padding_invariant and not parity
    ):  # users of similar history length share batches, trimmed to their longest
        order = np.argsort((histories != 0).sum(1), kind="stable")
        histories, targets, seen = histories[order], targets[order], seen[order]
    generator = torch.Generator(device=device).manual_seed(run.seed)
    was_training = model.training
    model.eval()
    metrics = leave_one_out_metrics(
        lambda batch: model.next_item_scores(batch, generator), histories, targets, None if parity or not run.mask_history else seen,
        tuple(run.ranking_ks), run.eval_batch_size, device, score_padding=parity, per_batch_mean=parity, trim_padding=model.padding_invariant,
    )  # fmt: skip
    model.train(was_training)
    return metrics


def pretrain_sequential(config: Config) -> dict:
    """Train (or, with ``run.evaluate``, only evaluate) a next-item model; returns the metrics."""
    dataset = load_sequence_dataset(config.datasets.path)
    # A bad resume folder fails before the run folder exists.
    resume = None
    if config.run.resume_from is not None and not config.run.evaluate:
        resume = find_epoch_state(config, protocol_label(config), dataset.n_users, dataset.n_items)
    model, run_dir, device, hardware = start_ranking_run(
        config, dataset.n_users, dataset.n_items, "leave-one-out training"
    )
    logger.info(
        "run folder %s on %s; %d users, %d items, %d training items",
        run_dir,
        device,
        len(dataset.uid),
        dataset.n_items,
        len(dataset.items),
    )
    if model is not None:
        model = model.to(device)
        metrics = {
            "checkpoint": str(config.run.ckpt),
            **{split: evaluate_sequences(model, dataset, split, config, device) for split in ("valid", "test")},
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


def _improved(valid: dict[str, float], best: dict[str, float] | None, config: Config) -> bool:
    """Whether this evaluation beats the kept one: on ``select_metric``, or (paper parity) on any figure."""
    if best is None:
        return True
    names = [name for name in valid if name != "users"] if config.run.paper_parity else [config.run.select_metric]
    return any(valid[name] > best[name] for name in names)


def _train(
    config: Config,
    dataset: SequenceDataset,
    device: torch.device,
    run_dir: Path,
    resume: tuple[Path, CollaborativeModel] | None,
) -> dict:
    """The epoch loop (from ``resume``'s folder and model if given); returns the selected epoch's validation and
    test figures, the curve and timings."""
    run = config.run
    model = (
        resume[1]
        if resume is not None
        else build_recommender(config.model, dataset.n_users, dataset.n_items, _history_edges(dataset))
    )
    model = model.to(device)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    best_dir = run_dir / "checkpoints" / "best"
    history_starts, target_positions = dataset.training_prefixes()
    generator = torch.Generator().manual_seed(run.seed)
    progress = {
        "epoch": 0,
        "best_epoch": 0,
        "best_valid": None,
        "selected_valid": None,
        "stale": 0,
        "curve": [],
        "epoch_seconds": [],
        "protocol": protocol_label(config),
    }
    best_state = None
    if parameters:
        optimizer = torch.optim.Adam(parameters, lr=run.lr, weight_decay=run.weight_decay)
        scheduler = (
            torch.optim.lr_scheduler.StepLR(optimizer, run.lr_step_epochs, run.lr_step_gamma)
            if run.lr_step_epochs
            else None
        )
        schedulers = {"model": scheduler} if scheduler is not None else {}
        if resume is not None:
            progress = restore_epoch_state(resume[0], {"model": optimizer}, schedulers, generator, device, best_dir)
            if progress["best_epoch"]:  # the weights only: building a model here would draw from the restored stream
                best_state = load_file(require_file(best_dir / "model.safetensors"))
            logger.info(
                "resumed from %s after epoch %d (selected so far: epoch %d)",
                resume[0],
                progress["epoch"],
                progress["best_epoch"],
            )
        bar = tqdm(range(progress["epoch"] + 1, run.max_epochs + 1), desc=f"pretrain {config.model.arch}")
        for epoch in bar:
            start, stop = time.perf_counter(), False
            model.train()
            loss = _epoch(model, optimizer, dataset, history_starts, target_positions, run, generator, device)
            if scheduler is not None:
                scheduler.step()
            if not math.isfinite(loss):
                raise DiffRecError(
                    f"loss became {loss} at epoch {epoch}; training stopped, the selected checkpoint so far is kept at {best_dir if best_dir.exists() else '(none yet)'}"
                )
            progress["epoch_seconds"].append(time.perf_counter() - start)
            progress["epoch"] = epoch
            if epoch % run.eval_every == 0 or epoch == run.max_epochs:
                valid = evaluate_sequences(model, dataset, "valid", config, device)
                seconds = round(sum(progress["epoch_seconds"]), 3)
                progress["curve"].append(
                    {
                        "epoch": epoch,
                        "seconds": seconds,
                        "loss": round(loss, 6),
                        **{f"valid_{name}": value for name, value in valid.items() if name != "users"},
                    }
                )
                logger.info(
                    "epoch %d (%.1f s): %s", epoch, progress["epoch_seconds"][-1], json_safe(progress["curve"][-1])
                )
                bar.set_postfix(
                    {f"valid_{run.select_metric}": f"{valid[run.select_metric]:.3f}", "loss": f"{loss:.3f}"}
                )
                best_valid = progress["best_valid"]
                if _improved(valid, best_valid, config):
                    # Paper parity keeps each figure's best separately, as the published loop does.
                    progress["best_valid"] = (
                        valid
                        if best_valid is None or not run.paper_parity
                        else {name: max(value, best_valid.get(name, -math.inf)) for name, value in valid.items()}
                    )
                    progress.update(best_epoch=epoch, stale=0, selected_valid=valid)
                    best_state = copy.deepcopy(model.state_dict())
                    save_recommender(model, config.model, best_dir, {"epoch": epoch, "protocol": progress["protocol"]})
                else:
                    progress["stale"] += 1
                    stop = progress["stale"] >= run.patience
            save_epoch_state(
                run_dir / "checkpoints" / "last", model, config, {"model": optimizer}, schedulers, generator, progress
            )
            if stop:
                logger.info(
                    "early stop at epoch %d: validation has not improved for %d evaluations", epoch, progress["stale"]
                )
                break
        model.load_state_dict(best_state)
    else:  # nothing to train (most-popular): evaluate once
        save_recommender(model, config.model, best_dir, {"epoch": 0, "protocol": progress["protocol"]})
        progress["selected_valid"] = evaluate_sequences(model, dataset, "valid", config, device)
    test = evaluate_sequences(model, dataset, "test", config, device)
    epoch_seconds = progress["epoch_seconds"]
    samples = len(target_positions) * len(epoch_seconds)
    return {
        "selected": {"epoch": progress["best_epoch"], "valid": progress["selected_valid"], "test": test},
        "epochs_run": progress["epoch"],
        "seconds_per_epoch": round(float(np.mean(epoch_seconds)), 3) if epoch_seconds else None,
        "train_samples_per_second": round(samples / sum(epoch_seconds), 1) if epoch_seconds else None,
        "train_seconds": round(sum(epoch_seconds), 3),
        "mixed_precision": run.mixed_precision,
        "checkpoint": str(best_dir),
        "curve": progress["curve"],
    }


def _batches(
    lengths: np.ndarray, batch_size: int, group_by_length: bool, generator: torch.Generator
) -> list[np.ndarray]:
    """Shuffled sample batches; with ``group_by_length``, each run of 50 batches is sorted by history length
    before it is cut (as Hugging Face's ``group_by_length``), and the batches are shuffled again."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    if group_by_length:
        span = 50 * batch_size
        order = np.concatenate(
            [
                chunk[np.argsort(-lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(span, len(order), span))
            ]
        )
    batches = np.split(order, range(batch_size, len(order), batch_size))
    return (
        [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] if group_by_length else batches
    )


def _epoch(
    model: CollaborativeModel,
    optimizer: torch.optim.Optimizer,
    dataset: SequenceDataset,
    history_starts: np.ndarray,
    target_positions: np.ndarray,
    run: RunConfig,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """One pass over the training prefixes; the mean loss (or the first non-finite one)."""
    lengths = np.minimum(target_positions - history_starts, model.max_history)
    total, steps = 0.0, 0
    batches = _batches(lengths, run.batch_size, run.group_by_length and model.padding_invariant, generator)
    for rows in tqdm(batches, desc="batches", leave=False, mininterval=30):  # an ML-1M epoch is ~2,000 batches
        width = int(lengths[rows].max()) if model.padding_invariant else model.max_history
        loss = training_step(
            model,
            optimizer,
            dataset.items,
            history_starts[rows],
            target_positions[rows],
            width,
            run.mixed_precision == "bf16",
            device,
        )
        if not math.isfinite(loss):  # the caller stops and names the checkpoint it keeps
            return loss
        total, steps = total + loss, steps + 1
    return total / steps


def training_step(
    model: CollaborativeModel,
    optimizer: torch.optim.Optimizer,
    items: np.ndarray,
    history_starts: np.ndarray,
    target_positions: np.ndarray,
    width: int,
    bf16: bool,
    device: torch.device,
) -> float:
    """One optimizer step on a batch of prefixes (left-padded to ``width``), the loss under bf16 autocast if
    asked; returns the loss, and leaves the weights untouched when it is not finite."""
    history = torch.as_tensor(left_padded(items, history_starts, target_positions, width), device=device)
    target = torch.as_tensor(items[target_positions], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model.next_item_loss(history, target)
    if torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()

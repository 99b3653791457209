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

Training is a task of the engine (``minigpt4.training.engine``): after every epoch ``checkpoints/last`` holds what a
later run needs to continue exactly where this one stopped (weights, Adam and learning-rate state, the random
streams, the curve and the selection so far); ``run.resume_from`` names such a folder (``latest``: the newest under
``run.output_dir``) and ``run.max_epochs`` is then the total, so a schedule longer than one sitting is trained in
pieces with the same result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from minigpt4.config import Config
from minigpt4.data.sequences import SequenceDataset, left_padded, load_sequence_dataset
from minigpt4.evaluation.ranking import leave_one_out_metrics
from minigpt4.io import read_safetensors
from minigpt4.recommenders import build_recommender, save_recommender
from minigpt4.recommenders.base import CollaborativeModel
from minigpt4.training.collaborative import CollaborativeTask, ranking_run
from minigpt4.training.engine import Engine, Loop, MicroBatch, epoch_generator, epoch_loop
from minigpt4.training.run_folder import BEST

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
    summary = f"{len(dataset.uid)} users, {dataset.n_items} items, {len(dataset.items)} training items"
    return ranking_run(
        config, dataset, "leave-one-out training", summary, protocol_label(config), evaluate_sequences, _train
    )


class NextItemTask(CollaborativeTask):
    """Next-item loss over every prefix of the training sequences; validation ranked at each evaluation."""

    def __init__(self, model: CollaborativeModel, dataset: SequenceDataset, config: Config, device: torch.device):
        super().__init__(model, config)
        self.dataset, self.device = dataset, device
        self.history_starts, self.target_positions = dataset.training_prefixes()
        self.lengths = np.minimum(self.target_positions - self.history_starts, model.max_history)
        self.trim = model.padding_invariant  # batches cut to their longest history (padding cannot change an output)
        self.select = f"valid_{config.run.select_metric}"
        # best: each figure's best so far (paper parity compares against these); selected: valid at the kept epoch
        self.record = {"best": None, "selected": None, "protocol": protocol_label(config)}
        self.latest: dict | None = None

    def scheduler(self, optimizer: torch.optim.Optimizer, loop: Loop, total_steps: int) -> Any | None:
        """``run.lr_step_epochs``: the rate times ``run.lr_step_gamma`` every N epochs (StepLR); else constant."""
        run = self.config.run
        if not run.lr_step_epochs:
            return None
        steps = run.lr_step_epochs * self.batches_per_epoch(None)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: run.lr_step_gamma ** (step // steps))

    def batches_per_epoch(self, accelerator: Accelerator | None) -> int:
        """One batch per ``run.batch_size`` training prefixes (counted, not drawn)."""
        return math.ceil(len(self.lengths) / self.config.run.batch_size)

    def epoch_batches(self, epoch: int, accelerator: Accelerator | None) -> list[np.ndarray]:
        """The epoch's shuffled prefixes (grouped by length when the run asks and padding cannot matter)."""
        run = self.config.run
        group = run.group_by_length and self.trim
        return _batches(self.lengths, run.batch_size, group, epoch_generator(run.seed, epoch))

    def loss(self, model: torch.nn.Module, batch: np.ndarray, where: MicroBatch) -> dict[str, torch.Tensor]:
        """The model's next-item loss on the batch's prefixes, left-padded to the longest (or ``max_history``)."""
        width = int(self.lengths[batch].max()) if self.trim else self.model.max_history
        items = self.dataset.items
        history = left_padded(items, self.history_starts[batch], self.target_positions[batch], width)
        target = torch.as_tensor(items[self.target_positions[batch]], device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.run.mixed_precision == "bf16"):
            return {"loss": model.next_item_loss(torch.as_tensor(history, device=self.device), target)}

    def evaluate(self, model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Validation HR/NDCG under the run's protocol."""
        self.latest = evaluate_sequences(self.model, self.dataset, "valid", self.config, self.device)
        return {f"valid_{name}": value for name, value in self.latest.items() if name != "users"}

    def improved(self, figures: dict[str, float], best: dict[str, float] | None) -> bool:
        """On ``select_metric``, or (paper parity) on any figure against each figure's best so far, kept
        separately as the published loop does; the validation figures of a kept epoch are recorded."""
        kept = self.record["best"]
        names = (
            [name for name in self.latest if name != "users"]
            if self.config.run.paper_parity
            else [self.config.run.select_metric]
        )
        if kept is not None and not any(self.latest[name] > kept[name] for name in names):
            return False
        paper = self.config.run.paper_parity and kept is not None
        self.record["best"] = (
            {name: max(value, kept.get(name, -math.inf)) for name, value in self.latest.items()}
            if paper
            else self.latest
        )
        self.record["selected"] = self.latest
        return True


def _train(
    config: Config, dataset: SequenceDataset, accelerator: Accelerator, run_dir: Path, resume_from: Path | None
) -> dict:
    """The engine over epochs (from ``resume_from`` if given); returns the selected epoch's validation and test
    figures, the curve and timings."""
    run, device = config.run, accelerator.device
    model = build_recommender(config.model, dataset.n_users, dataset.n_items, _history_edges(dataset)).to(device)
    task = NextItemTask(model, dataset, config, device)
    best_dir = run_dir / "checkpoints" / BEST
    if not task.trainable():  # nothing to train (most-popular): evaluate once
        save_recommender(model, config.model, best_dir, {"epoch": 0, "protocol": task.record["protocol"]})
        selected = {"epoch": 0, "valid": evaluate_sequences(model, dataset, "valid", config, device)}
        fit = None
    else:
        steps_per_epoch = task.batches_per_epoch(accelerator)
        fit = Engine(task, epoch_loop(run, steps_per_epoch), accelerator, config, run_dir).fit(resume_from)
        model.load_state_dict(read_safetensors(best_dir / "model.safetensors"))
        selected = {"epoch": fit.best_step // steps_per_epoch, "valid": task.record["selected"]}
    test = evaluate_sequences(model, dataset, "test", config, device)
    epochs = fit.epochs if fit is not None else 0
    seconds = fit.train_seconds if fit is not None else 0.0
    return {
        "selected": {**selected, "test": test},
        "epochs_run": epochs,
        "seconds_per_epoch": round(seconds / epochs, 3) if epochs else None,
        "train_samples_per_second": fit.samples_per_second if fit is not None else None,
        "train_seconds": round(seconds, 3),
        "mixed_precision": run.mixed_precision,
        "checkpoint": str(best_dir),
        "curve": fit.curve if fit is not None else [],
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

"""Full-ranking training on the implicit shape (``datasets.shape: implicit``): most-popular, MF and LightGCN
with BPR, DiffMM, MDMNS and GenRec-V1, one loop for all of them.

Each epoch runs the model's own phase first (``prepare_epoch``: DiffMM's denoisers and graph
regeneration), then BPR steps over every training pair with one freshly sampled negative each. After each
evaluated epoch both validation and test are ranked, so one run yields both protocols: the default selects
the epoch by validation ``run.select_metric`` and reports test there; ``run.paper_parity`` selects by the
test metric itself (the published code's protocol) and is labelled so in every output. Early stopping
and the kept checkpoint follow the run's protocol. ``run.mixed_precision: bf16`` computes every training loss
(the denoisers' and ``pair_loss``) under bf16 autocast, sparse propagation in fp32; graph regeneration, the
weights, the optimizer and evaluation stay fp32. Training is a task of the engine (``minigpt4.training.engine``):
``checkpoints/last`` after every epoch, and ``run.resume_from`` continues a stopped run exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from minigpt4.config import Config
from minigpt4.data.implicit import ImplicitDataset, load_implicit_dataset
from minigpt4.evaluation.ranking import full_ranking_metrics
from minigpt4.recommenders import build_recommender, save_recommender
from minigpt4.recommenders.base import CollaborativeModel, EpochContext
from minigpt4.recommenders.graph import sample_negatives
from minigpt4.training.collaborative import CollaborativeTask, ranking_run
from minigpt4.training.engine import Engine, MicroBatch, epoch_generator, epoch_loop
from minigpt4.training.run_folder import BEST

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
    model: CollaborativeModel, dataset: ImplicitDataset, split: str, config: Config, device: torch.device
) -> dict:
    """Recall/NDCG/Precision@K (``run.ranking_ks``) on ``split``, the user's training items masked; where some
    evaluated users have no training items (a split in time), the same figures for those (``cold``) and the rest
    (``warm``) under ``by_group``."""
    was_training = model.training
    model.eval()
    train, target = dataset.matrices["train"], dataset.matrices[split]
    warm = np.diff(train.indptr) > 0
    groups = {"warm": warm, "cold": ~warm} if (~warm & (np.diff(target.indptr) > 0)).any() else None
    metrics = full_ranking_metrics(
        model.ranker(), train, target, tuple(config.run.ranking_ks), device=device, groups=groups
    )
    model.train(was_training)
    return metrics


def pretrain_implicit(config: Config) -> dict:
    """Train (or, with ``run.evaluate``, only evaluate) a full-ranking model; returns the metrics."""
    dataset = load_implicit_dataset(config.datasets.path, config.datasets.modalities)
    summary = (
        f"{dataset.n_users} users, {dataset.n_items} items, "
        f"{dataset.matrices['train'].nnz} training pairs, modalities {list(dataset.features) or 'none'}"
    )
    return ranking_run(
        config, dataset, "full-ranking training", summary, protocol_label(config), evaluate_ranking, _train
    )


class RankingTask(CollaborativeTask):
    """Each epoch: the model's own phase (DiffMM's denoisers and regenerated graphs, with their own optimizers),
    then BPR over every training pair with a fresh negative; validation and test ranked at each evaluation."""

    def __init__(self, model: CollaborativeModel, dataset: ImplicitDataset, config: Config, device: torch.device):
        run = config.run
        super().__init__(model, config)
        self.dataset, self.device = dataset, device
        groups = {name: params for name, params in model.optimizer_groups().items() if params}
        self.params = groups.pop("model", [])
        self.own = {
            name: torch.optim.Adam(params, lr=run.lr, weight_decay=run.weight_decay) for name, params in groups.items()
        }
        coo = dataset.matrices["train"].tocoo()
        self.users, self.items = coo.row.astype(np.int64), coo.col.astype(np.int64)
        metric = run.select_metric
        self.select = f"test_{metric}" if run.paper_parity else f"valid_{metric}"
        # by_valid / by_test: the epoch each protocol selects so far, with its figures (None before the first evaluation)
        self.record = {"by_valid": None, "by_test": None, "protocol": protocol_label(config)}
        self.epoch = 0

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters the BPR steps update (the model's own phase has its own optimizers)."""
        return self.params

    def extra_states(self) -> list:
        """The model's own optimizers (DiffMM's denoisers)."""
        return list(self.own.values())

    def context(self, generator: torch.Generator) -> EpochContext:
        """What the model's own phase may use."""
        run = self.config.run
        return EpochContext(
            self.dataset.matrices["train"],
            run.batch_size,
            generator,
            self.own,
            self.device,
            bf16=run.mixed_precision == "bf16",
        )

    def start_epoch(self, epoch: int, accelerator: Accelerator) -> dict[str, float]:
        """The model's own phase, drawing from the epoch's first stream."""
        self.epoch = epoch + 1  # the epoch an evaluation after its batches reports
        self.model.train()
        return self.model.prepare_epoch(self.context(epoch_generator(self.config.run.seed, epoch, 0)))

    def batches_per_epoch(self, accelerator: Accelerator | None) -> int:
        """One batch per ``run.batch_size`` training pairs (counted, not drawn: drawing samples every negative)."""
        return math.ceil(len(self.users) / self.config.run.batch_size)

    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> list[tuple[np.ndarray, ...]]:
        """Every training pair once with a fresh negative, shuffled, from the epoch's second stream."""
        generator = epoch_generator(self.config.run.seed, epoch, 1)
        negatives = sample_negatives(self.dataset.matrices["train"], self.users, generator)
        order = torch.randperm(len(self.users), generator=generator).numpy()
        size = self.config.run.batch_size
        return [
            tuple(column[order[start : start + size]] for column in (self.users, self.items, negatives))
            for start in range(0, len(order), size)
        ]

    def loss(self, model: torch.nn.Module, batch: tuple[np.ndarray, ...], where: MicroBatch) -> dict[str, torch.Tensor]:
        """BPR (and the model's regularisers), under bf16 autocast when the run asks for it."""
        tensors = [torch.as_tensor(column, device=self.device) for column in batch]
        bf16 = self.config.run.mixed_precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return model.pair_loss(*tensors, self.config.run.l2_reg)

    def batch_rows(self, batch: tuple[np.ndarray, ...]) -> int:
        """Pairs in a batch."""
        return len(batch[0])

    def evaluate(self, model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Validation and test ranked; each protocol's selection so far updated."""
        metric, epoch = self.config.run.select_metric, self.epoch
        valid = evaluate_ranking(self.model, self.dataset, "valid", self.config, self.device)
        test = evaluate_ranking(self.model, self.dataset, "test", self.config, self.device)
        by_valid, by_test = self.record["by_valid"], self.record["by_test"]
        if by_valid is None or valid[metric] > by_valid["valid"][metric]:
            self.record["by_valid"] = {"epoch": epoch, "valid": valid, "test": test}
        if by_test is None or test[metric] > by_test["test"][metric]:
            self.record["by_test"] = {"epoch": epoch, "test": test}
        return {f"valid_{metric}": valid[metric], f"test_{metric}": test[metric]}


def _train(
    config: Config, dataset: ImplicitDataset, accelerator: Accelerator, run_dir: Path, resume_from: Path | None
) -> dict:
    """The engine over epochs (from ``resume_from`` if given); returns both protocols' selections, the curve and
    timings."""
    run, device = config.run, accelerator.device
    features = {name: torch.as_tensor(values, dtype=torch.float32) for name, values in dataset.features.items()}
    model = build_recommender(config.model, dataset.n_users, dataset.n_items, _edges(dataset), features).to(device)
    task = RankingTask(model, dataset, config, device)
    best_dir = run_dir / "checkpoints" / BEST
    if not task.params and not task.own:  # nothing to train (most-popular): evaluate once
        task.epoch = 0
        task.evaluate(model, accelerator)
        save_recommender(model, config.model, best_dir, {"epoch": 0, "protocol": task.record["protocol"]})
        return _results(config, task.record, 0, [], 0.0, None, best_dir)
    loop = epoch_loop(run, task.batches_per_epoch(accelerator))
    fit = Engine(task, loop, accelerator, config, run_dir).fit(resume_from)
    return _results(config, task.record, fit.epochs, fit.curve, fit.train_seconds, fit.samples_per_second, best_dir)


def _results(
    config: Config,
    record: dict,
    epochs: int,
    curve: list[dict],
    seconds: float,
    samples_per_second: float | None,
    best_dir: Path,
) -> dict:
    """The metrics of a full-ranking run: the run's protocol's selection and both protocols' own."""
    return {
        "selected": record["by_test"] if config.run.paper_parity else record["by_valid"],
        "valid_selection": record["by_valid"],
        "paper_parity_selection": record["by_test"],
        "epochs_run": epochs,
        "mixed_precision": config.run.mixed_precision,
        "seconds_per_epoch": round(seconds / epochs, 3) if epochs else None,
        "train_seconds": round(seconds, 3),
        "train_samples_per_second": samples_per_second,  # training pairs over the loop less its evaluations
        "checkpoint": str(best_dir),
        "curve": curve,
    }

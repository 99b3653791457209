"""Collaborative pre-training on the rating shape (``diffrec pretrain``), a task of the training engine:
valid AUC every ``run.eval_every`` epochs with early stopping, the best epoch kept, AUC/UAUC/GAUC reported
on valid, test, test-warm and test-cold; ``run.resume_from`` continues a stopped run.

Splits live on the device as tensors and batches are fetched by tensor indexing; evaluation gathers
every process's predictions (``gather_for_metrics``) before any metric is computed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.utils.data import DataLoader

from minigpt4.config import Config
from minigpt4.data.contract import RatingDataset, load_rating_dataset
from minigpt4.data.tensors import RatingBatch, RatingTensors, whole_batch
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.ctr import evaluate_all, evaluate_split
from minigpt4.io import log_text
from minigpt4.recommenders import (
    CollaborativeModel,
    build_recommender,
    graph_edges,
    load_recommender,
    registration,
)
from minigpt4.training.collaborative import CollaborativeTask
from minigpt4.training.engine import Engine, MicroBatch, epoch_loop
from minigpt4.training.run_folder import BEST, begin_run, logger


def history_length(config: Config) -> int:
    """How many recent history items the model reads (0 for id-only models)."""
    return getattr(config.model, "max_history", 0)


def loaders(dataset: RatingDataset, config: Config, device: torch.device) -> dict[str, DataLoader]:
    """Sequential evaluation loaders over the device-resident valid and test splits."""
    return {
        name: DataLoader(
            RatingTensors(dataset.splits[name], history_length(config), device),
            batch_size=config.run.eval_batch_size,
            collate_fn=whole_batch,
        )
        for name in ("valid", "test")
    }


def pretrain(config: Config) -> dict:
    """Train (or, with ``run.evaluate``, only evaluate) a collaborative model; returns the metrics."""
    run, started = config.run, begin_run(config)
    dataset = load_rating_dataset(config.datasets.path)
    # A bad checkpoint or resume folder fails before any run folder is created.
    model = None
    if run.evaluate:
        if run.ckpt is None:
            raise DiffRecError("run.evaluate is true but run.ckpt is not set (a checkpoint folder to evaluate)")
        model = load_recommender(run.ckpt, config.model, dataset.n_users, dataset.n_items)
    elif run.eval_every > run.max_epochs:
        raise DiffRecError(
            f"run.eval_every ({run.eval_every}) exceeds run.max_epochs ({run.max_epochs}): no epoch would be evaluated"
        )
    accelerator, run_dir = started.open(), started.folder
    logger.info("run folder %s; %d process(es) on %s", run_dir, accelerator.num_processes, accelerator.device)
    split_loaders = loaders(dataset, config, accelerator.device)
    split_loaders = dict(zip(split_loaders, accelerator.prepare(*split_loaders.values())))
    if model is not None:
        model = accelerator.prepare(model)
        metrics = {"checkpoint": str(run.ckpt), **evaluate_all(model, split_loaders, accelerator)}
    else:
        metrics = _train(config, dataset, split_loaders, accelerator, run_dir, started.resume_from)
    return started.finish(config.model.arch, metrics)


class RatingTask(CollaborativeTask):
    """A collaborative model's loss on rating rows; valid AUC picks the best epoch."""

    select = "valid_auc"
    fused = True

    def __init__(self, model: CollaborativeModel, train: RatingTensors, valid: DataLoader, config: Config) -> None:
        super().__init__(model, config)
        self.train, self.valid = train, valid
        self._states = {0: torch.Generator().manual_seed(config.run.seed).get_state()}  # the stream before each epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's row order as a shuffling DataLoader with a generator seeded by ``run.seed`` draws it, the
        stream running on over the epochs (one seed draw and two permutations each): the order the published
        configs' anchor figures were measured with, replayed from the start so a resumed run draws it too."""
        known = max(start for start in self._states if start <= epoch)
        generator = torch.Generator()
        generator.set_state(self._states[known])
        for done in range(known, epoch):
            self._draw(generator)
            self._states[done + 1] = generator.get_state()
        return self._draw(generator)

    def _draw(self, generator: torch.Generator) -> list[int]:
        """One epoch's draws from the stream; the order."""
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's worker seed
        order = torch.randperm(len(self.train), generator=generator).tolist()
        torch.randperm(len(self.train), generator=generator)  # RandomSampler draws a second one at the epoch's end
        return order

    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> DataLoader:
        """The epoch's order, sharded over processes."""
        loader = DataLoader(
            self.train,
            batch_size=self.config.run.batch_size,
            sampler=self.epoch_order(epoch),
            collate_fn=whole_batch,
            generator=torch.Generator(),  # its worker-seed draw must not touch the global stream (dropout)
        )
        return prepare_data_loader(
            loader, accelerator.device, accelerator.num_processes, accelerator.process_index, put_on_device=True
        )

    def loss(self, model: nn.Module, batch: RatingBatch, where: MicroBatch) -> dict[str, torch.Tensor]:
        """The model's loss on the batch's labels."""
        return {"loss": model(batch)}

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Valid AUC and UAUC."""
        valid = evaluate_split(model, self.valid, accelerator)
        return {"valid_auc": valid["auc"], "valid_uauc": valid["uauc"]}


def _train(
    config: Config,
    dataset: RatingDataset,
    split_loaders: dict,
    accelerator: Accelerator,
    run_dir: Path,
    resume_from: Path | None,
) -> dict:
    """Train with the engine, evaluating every ``run.eval_every`` epochs; returns the best checkpoint's metrics."""
    run = config.run
    edges = None
    if "edges" in registration(config.model.arch).inputs:  # LightGCN's `graph` key picks its edges
        edges = graph_edges(
            dataset.splits["train"], positives_only=getattr(config.model, "graph", "positives") == "positives"
        )
    model = build_recommender(config.model, dataset.n_users, dataset.n_items, edges)
    train = RatingTensors(dataset.splits["train"], history_length(config), accelerator.device)
    task = RatingTask(model, train, split_loaders["valid"], config)
    fit = Engine(task, epoch_loop(run, task.batches_per_epoch(accelerator)), accelerator, config, run_dir).fit(
        resume_from
    )
    best_dir = run_dir / "checkpoints" / BEST
    best_model = load_recommender(best_dir, config.model).to(accelerator.device)
    metrics = evaluate_all(best_model, split_loaders, accelerator)
    best_point = next(point for point in fit.curve if point["step"] == fit.best_step)
    metrics.update(
        best_epoch=best_point["epoch"],
        epochs_run=fit.epochs,
        train_seconds=fit.train_seconds,
        seconds_to_best=best_point["seconds"],
        train_samples_per_second=fit.samples_per_second,
        checkpoint=str(best_dir),
        curve=fit.curve,
    )
    logger.info("best epoch %d: %s", best_point["epoch"], log_text({k: metrics[k] for k in ("valid", "test")}))
    return metrics

"""The one training loop behind ``diffrec pretrain`` (ratings, full ranking, sequences) and ``diffrec train``
(LLM recommender, image generator, joint model).

A trainer describes its workload as a :class:`Task`: the model, one epoch's micro-batches for this
process, the loss of a micro-batch, how it is evaluated, how its weights are saved. The engine owns, once
for all of them: the optimizer and its schedule, gradient accumulation, clipping, the finite loss and
gradient-norm checks, a random generator per (seed, micro-batch, process), evaluation every N optimizer
steps with the best checkpoint and early stopping, the logged curve, and one checkpoint format.

Checkpoints: ``checkpoints/last`` holds the Accelerate state (optimizer, scheduler, every process's random
streams), the task's weights in their own format, ``config.yaml`` and ``trainer_state.json``; it is
written as ``last.partial`` and renamed once complete. Tasks that select keep ``checkpoints/best`` (the
weights of the best evaluation). ``run.resume_from`` (a ``last`` folder, or ``latest``)
continues mid-epoch with the same batches and noise, so a resumed run ends as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from minigpt4.config import RunConfig, dump_config
from minigpt4.data.tensors import whole_batch
from minigpt4.errors import DiffRecError
from minigpt4.io import atomic_folder, json_safe, log_text, read_json, replace_folder
from minigpt4.training.run_folder import BEST, LAST, TRAINER_STATE, logger


@dataclass
class Loop:
    """How long and how the engine trains, in optimizer steps (a trainer fills it from its run section)."""

    seed: int
    max_epochs: int
    max_steps: int | None = None  # None: max_epochs over the task's batches
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    accumulation: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = None  # None: no clipping
    evaluate_every: int | None = None  # None: the task is never evaluated while training
    checkpoint_every: int | None = None  # None: at each evaluation (and always after the last step)
    log_every: int | None = None  # curve points without evaluation; None: at each evaluation or checkpoint
    patience: int | None = None  # evaluations without improvement before stopping; None: never early


def step_loop(run: RunConfig, evaluate: bool = True, early_stop: bool = True) -> Loop:
    """The loop of a step-based trainer (LLM, image, joint) from its run section: without ``evaluate``, a
    checkpoint every ``checkpoint_every_steps`` (else ``eval_every_steps``) and no evaluation."""
    return Loop(
        seed=run.seed,
        max_epochs=run.max_epochs,
        max_steps=run.max_steps,
        lr=run.lr,
        weight_decay=run.weight_decay,
        warmup_steps=run.warmup_steps,
        accumulation=run.gradient_accumulation_steps,
        max_grad_norm=run.max_grad_norm,
        evaluate_every=run.eval_every_steps if evaluate else None,
        checkpoint_every=run.checkpoint_every_steps or (None if evaluate else run.eval_every_steps),
        patience=run.patience if early_stop else None,
    )


def epoch_loop(run: RunConfig, steps_per_epoch: int) -> Loop:
    """The loop of an epoch-based collaborative trainer: evaluation every ``run.eval_every`` epochs, a checkpoint
    after every epoch, early stopping after ``run.patience`` evaluations, no clipping."""
    return Loop(
        seed=run.seed,
        max_epochs=run.max_epochs,
        lr=run.lr,
        weight_decay=run.weight_decay,
        evaluate_every=run.eval_every * steps_per_epoch,
        checkpoint_every=steps_per_epoch,
        patience=run.patience,
    )


@dataclass
class MicroBatch:
    """Where a micro-batch sits in the run, and the random stream its loss draws from."""

    step: int  # optimizer steps taken before it
    position: int  # micro-batches before it, over the whole run
    epoch: int
    generator: torch.Generator  # seeded by (seed, position, process): a resumed run draws the same


class Task(ABC):
    """A workload the engine trains. ``model`` is what Accelerate prepares; ``select`` names the figure of
    ``evaluate`` that picks ``checkpoints/best`` (None: the task keeps no best and never stops early)."""

    name: str
    model: nn.Module
    select: str | None = None

    @abstractmethod
    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> Iterable:
        """This process's micro-batches of one epoch, in order (a sized iterable, the same on every call)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, where: MicroBatch) -> dict[str, torch.Tensor]:
        """``loss`` (what is minimised) and any parts to log, of one micro-batch; ``model`` is the prepared one."""

    def save_weights(self, folder: Path) -> None:
        """The trained weights in the task's own format (the model's ``save_weights``)."""
        self.model.save_weights(folder)

    def load_weights(self, folder: Path) -> None:
        """Load what ``save_weights`` wrote (the model's ``load_weights``)."""
        self.model.load_weights(folder)

    def batches_per_epoch(self, accelerator: Accelerator | None) -> int:
        """How many micro-batches ``epoch_batches`` yields (tasks whose epochs are costly to draw compute it)."""
        return len(self.epoch_batches(0, accelerator))

    def trainable(self) -> list[nn.Parameter]:
        """The parameters to optimize, in a fixed order."""
        return [param for _, param in sorted(self.model.named_parameters()) if param.requires_grad]

    def optimizer(self, params: list[nn.Parameter], loop: Loop) -> torch.optim.Optimizer:
        """AdamW (tasks may choose another)."""
        return torch.optim.AdamW(params, lr=loop.lr, weight_decay=loop.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, loop: Loop, total_steps: int) -> Any | None:
        """Linear warmup, then cosine to zero (None: a constant learning rate)."""
        return get_cosine_schedule_with_warmup(optimizer, loop.warmup_steps, total_steps)

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Figures for the curve (one of them ``select``), computed on every process alike."""
        return {}

    def improved(self, figures: dict[str, float], best: dict[str, float] | None) -> bool:
        """Whether an evaluation beats the best so far (a finite ``select`` figure above the best's)."""
        value = figures[self.select]
        return math.isfinite(value) and (best is None or value > best[self.select])

    def start_epoch(self, epoch: int, accelerator: Accelerator) -> dict[str, float]:
        """Work done once at the start of each epoch before its batches (a model's own phase); losses to log."""
        return {}

    def extra_states(self) -> list:
        """Objects with ``state_dict`` beside the engine's optimizer (a model's own optimizers) to checkpoint."""
        return []

    def state_dict(self) -> dict:
        """The task's own bookkeeping, kept in ``trainer_state.json`` (JSON values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (nothing to restore by default)."""
        return None

    def batch_rows(self, batch: Any) -> int:
        """Training rows in a micro-batch (for the throughput figure)."""
        return len(batch)


@dataclass
class Fit:
    """What a finished ``Engine.fit`` reports."""

    model: nn.Module  # the prepared model, holding the final weights
    steps: int
    epochs: int  # completed epochs
    best_step: int  # the step of the best evaluation (tasks that select; 0 otherwise)
    curve: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # the whole loop's wall time, evaluations included
    evaluation_seconds: float | None = 0.0  # their share; None when resumed from a checkpoint that did not time them
    samples_per_second: float | None = 0.0  # training samples over the loop less its evaluations; None as above


def shuffled_batches(
    rows: Dataset, batch_size: int, seed: int, epoch: int, accelerator: Accelerator, device: torch.device | None = None
) -> DataLoader:
    """One epoch's batches of ``rows`` (a dataset fetching lists of rows at once): a permutation seeded by (seed,
    epoch), so a resumed run sees the same order, sharded over processes and put on ``device`` (the process's)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    loader = DataLoader(rows, batch_size=batch_size, sampler=order, collate_fn=whole_batch)
    return prepare_data_loader(
        loader, device or accelerator.device, accelerator.num_processes, accelerator.process_index, put_on_device=True
    )


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A random stream of one epoch (``stream`` tells an epoch's streams apart): a resumed run draws the same."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch * 17 + stream)


def micro_batch_generator(seed: int, position: int, accelerator: Accelerator) -> torch.Generator:
    """The random stream of one micro-batch on this process."""
    return torch.Generator().manual_seed(
        seed * 100_003 + position * accelerator.num_processes + accelerator.process_index
    )


class Engine:
    """Trains a task under one Accelerator, writing checkpoints into ``run_dir/checkpoints`` (each with ``config``, the
    run's settings, as YAML)."""

    def __init__(self, task: Task, loop: Loop, accelerator: Accelerator, config: BaseModel, run_dir: Path) -> None:
        self.task, self.loop, self.accelerator, self.config = task, loop, accelerator, config
        self.checkpoints = run_dir / "checkpoints"

    def fit(self, resume_from: Path | None = None) -> Fit:
        """Train to ``loop.max_steps`` (or ``max_epochs``), from ``resume_from`` (a ``last`` folder) if given."""
        task, loop, accelerator = self.task, self.loop, self.accelerator
        batches_per_epoch = task.batches_per_epoch(accelerator)
        if batches_per_epoch == 0:
            raise DiffRecError(
                f"{task.name}: the training rows fill no batch on {accelerator.num_processes} process(es)"
            )
        steps_per_epoch = max(1, batches_per_epoch // loop.accumulation)
        total_steps = loop.max_steps or loop.max_epochs * steps_per_epoch
        evaluate_every = loop.evaluate_every
        checkpoint_every = loop.checkpoint_every or evaluate_every or total_steps
        log_every = loop.log_every or evaluate_every or checkpoint_every
        params = task.trainable()
        logger.info(
            "%s: %d trainable tensors, %d parameters; %d optimizer steps (%d per epoch)",
            task.name,
            len(params),
            sum(p.numel() for p in params),
            total_steps,
            steps_per_epoch,
        )
        optimizer = task.optimizer(params, loop)
        # Not prepared: a prepared scheduler steps once per process, which would tie the schedule to the process count.
        scheduler = task.scheduler(optimizer, loop, total_steps)
        model, optimizer = accelerator.prepare(task.model, optimizer)
        for state in ([scheduler] if scheduler is not None else []) + task.extra_states():
            accelerator.register_for_checkpointing(state)
        self._register_hooks()
        # ``sums`` holds the loss sums since the last curve point, so a resumed run's curve matches too.
        progress = {"step": 0, "micro": 0, "epoch": 0, "batch": 0, "samples": 0, "seconds": 0.0}
        progress |= {"evaluation_seconds": 0.0, "best": None, "best_step": 0, "stale": 0, "sums": {}, "curve": []}
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
            progress = read_json(resume_from / TRAINER_STATE, dict)
            task.load_state_dict(progress.get("task", {}))
            progress.setdefault("evaluation_seconds", None)  # written before evaluations were timed: unknown
            if accelerator.is_main_process and (resume_from.parent / BEST).is_dir():
                shutil.copytree(resume_from.parent / BEST, self.checkpoints / BEST, dirs_exist_ok=True)
            accelerator.wait_for_everyone()
            logger.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                resume_from,
                progress["step"],
                progress["epoch"],
                progress["batch"],
            )
        accelerator.init_trackers("tensorboard", config={"lr": loop.lr, "seed": loop.seed})
        bar = tqdm(
            total=total_steps,
            initial=progress["step"],
            desc=f"train {task.name}",
            disable=not accelerator.is_local_main_process,
        )
        started, stop = time.perf_counter() - progress["seconds"], False
        model.train()
        while progress["step"] < total_steps and not stop:
            if progress["batch"] == 0:
                self._start_epoch(progress)
            batches = task.epoch_batches(progress["epoch"], accelerator)
            for index, batch in enumerate(batches):
                if index < progress["batch"]:  # a resumed epoch skips what the checkpoint already trained on
                    continue
                self._backward(model, batch, progress)
                if progress["batch"] == len(batches):  # the epoch is complete: a checkpoint now resumes at the next
                    progress["epoch"], progress["batch"] = progress["epoch"] + 1, 0
                if progress["micro"] % loop.accumulation:
                    continue
                self._optimizer_step(params, optimizer, scheduler, progress)
                bar.update()
                step = progress["step"]
                last = step >= total_steps
                if evaluate_every and (step % evaluate_every == 0 or last):
                    stop = self._evaluate(model, progress, started)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in progress["curve"][-1].items() if isinstance(v, float)})
                elif step % log_every == 0 or last:
                    self._curve_point(progress, started, {})
                if step % checkpoint_every == 0 or last or stop:
                    progress["seconds"] = time.perf_counter() - started
                    progress["task"] = task.state_dict()
                    self.save_checkpoint(self.checkpoints / LAST, progress)
                if last or stop:
                    stop = True
                    break
        bar.close()
        seconds, evaluation = time.perf_counter() - started, progress["evaluation_seconds"]
        accelerator.wait_for_everyone()
        return Fit(
            model=model,
            steps=progress["step"],
            epochs=progress["epoch"],
            best_step=progress["best_step"],
            curve=progress["curve"],
            train_seconds=round(seconds, 3),
            evaluation_seconds=None if evaluation is None else round(evaluation, 3),
            samples_per_second=(
                round(progress["samples"] / (seconds - evaluation), 3)
                if evaluation is not None and seconds > evaluation
                else None
            ),
        )

    def _start_epoch(self, progress: dict) -> None:
        """The task's once-per-epoch phase; its losses join the curve's sums."""
        losses = self.task.start_epoch(progress["epoch"], self.accelerator)
        for name, value in losses.items():
            if not math.isfinite(value):
                raise DiffRecError(f"{name} became {value} at {self._where(progress)}; {self._stopped()}")
            total, count = progress["sums"].get(name, (0.0, 0))
            progress["sums"][name] = [total + value, count + 1]

    def _backward(self, model: nn.Module, batch: Any, progress: dict) -> None:
        """The loss of one micro-batch and its gradients (synchronised across processes on the step's last one)."""
        loop, accelerator = self.loop, self.accelerator
        where = MicroBatch(
            progress["step"],
            progress["micro"],
            progress["epoch"],
            micro_batch_generator(loop.seed, progress["micro"], accelerator),
        )
        syncs = (progress["micro"] + 1) % loop.accumulation == 0
        with contextlib.nullcontext() if syncs else accelerator.no_sync(model):
            parts = self.task.loss(model, batch, where)
            loss = parts["loss"]
            if not torch.isfinite(loss):
                named = "".join(f", {name} {value.item():.4g}" for name, value in parts.items() if name != "loss")
                raise DiffRecError(f"loss became {loss.item()} at {self._where(progress)}{named}; {self._stopped()}")
            accelerator.backward(loss / loop.accumulation)
        # Each process draws its own rows: the curve holds the mean over processes.
        names = sorted(parts)
        values = accelerator.reduce(torch.stack([parts[name].detach().float() for name in names]), "mean").tolist()
        for name, value in zip(names, values):
            total, count = progress["sums"].get(name, (0.0, 0))
            progress["sums"][name] = [total + value, count + 1]
        progress["batch"] += 1
        progress["micro"] += 1
        progress["samples"] += self.task.batch_rows(batch) * accelerator.num_processes

    def _optimizer_step(self, params: list, optimizer: Any, scheduler: Any, progress: dict) -> None:
        """Clip, check the gradient norm, step the optimizer and the schedule."""
        if self.loop.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(params, self.loop.max_grad_norm)
            if not torch.isfinite(norm):
                raise DiffRecError(f"gradient norm became {norm.item()} at {self._where(progress)}; {self._stopped()}")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress["step"] += 1

    def _curve_point(self, progress: dict, started: float, figures: dict) -> dict:
        """Append the mean losses since the previous point and ``figures`` to the curve."""
        sums = progress["sums"]
        point = {
            "step": progress["step"],
            "epoch": progress["epoch"],
            "seconds": round(time.perf_counter() - started, 3),
            **{name: total / count for name, (total, count) in sorted(sums.items())},
            **figures,
        }
        sums.clear()
        progress["curve"].append(point)
        self.accelerator.log({k: v for k, v in point.items() if isinstance(v, float)}, step=progress["step"])
        logger.info("step %d: %s", progress["step"], log_text(point))
        return point

    def _evaluate(self, model: nn.Module, progress: dict, started: float) -> bool:
        """Evaluate, log the curve point, keep the best checkpoint; True when patience ran out."""
        task, began = self.task, time.perf_counter()
        figures = task.evaluate(model, self.accelerator)
        model.train()
        if progress["evaluation_seconds"] is not None:
            progress["evaluation_seconds"] += time.perf_counter() - began
        self._curve_point(progress, started, figures)
        if task.select is None:
            return False
        if task.improved(figures, progress["best"]):
            progress.update(best=figures, best_step=progress["step"], stale=0)
            if self.accelerator.is_main_process:
                self.save_weights(self.checkpoints / BEST)
            self.accelerator.wait_for_everyone()
            logger.info("step %d: %s %.4f (best)", progress["step"], task.select, figures[task.select])
            return False
        progress["stale"] += 1
        if self.loop.patience is not None and progress["stale"] >= self.loop.patience:
            logger.info(
                "early stop at step %d: %s has not improved for %d evaluations",
                progress["step"],
                task.select,
                progress["stale"],
            )
            return True
        return False

    def save_weights(self, folder: Path) -> None:
        """The task's weights, replacing ``folder`` once complete (main process only)."""
        with atomic_folder(folder) as partial:
            self.task.save_weights(partial)

    def save_checkpoint(self, folder: Path, progress: dict) -> None:
        """The Accelerate state, the task's weights, the config and ``progress`` into ``folder``, visible only once complete."""
        accelerator = self.accelerator
        partial = folder.with_name(folder.name + ".partial")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / "config.yaml").write_text(dump_config(self.config))
            (partial / TRAINER_STATE).write_text(json.dumps(json_safe(progress), indent=2))
            replace_folder(partial, folder)
        accelerator.wait_for_everyone()

    def _register_hooks(self) -> None:
        """Accelerate saves and loads the task's weights in the task's format, never the frozen base models."""
        accelerator, task = self.accelerator, self.task

        def save(models: list, weights: list, output_dir: str) -> None:
            if accelerator.is_main_process:
                task.save_weights(Path(output_dir))
            weights.clear()

        def load(models: list, input_dir: str) -> None:
            models.clear()
            task.load_weights(Path(input_dir))

        accelerator.register_save_state_pre_hook(save)
        accelerator.register_load_state_pre_hook(load)

    def _where(self, progress: dict) -> str:
        """The step and epoch of a message."""
        return f"epoch {progress['epoch'] + 1}, step {progress['step']}"

    def _stopped(self) -> str:
        """The end of a stopped run's message: the checkpoint it keeps."""
        kept = self.checkpoints / (BEST if self.task.select is not None else LAST)
        what = "the best checkpoint so far" if self.task.select is not None else "the last checkpoint"
        return f"training stopped, {what} is kept at {kept if kept.is_dir() else '(none yet)'}"

"""What the collaborative trainers (rating rows, full ranking, next item) share: one task base, and the run of the
full-ranking and next-item trainers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from minigpt4.config import Config
from minigpt4.errors import DiffRecError
from minigpt4.recommenders import CollaborativeModel, load_recommender, write_recommender
from minigpt4.training.engine import Loop, Task
from minigpt4.training.run_folder import begin_run, logger


class CollaborativeTask(Task):
    """What the collaborative trainers share: Adam at a constant rate, weights in the recommender's own format
    (``model.safetensors`` + ``config.json``), and a selection record of their own in the trainer state."""

    fused = False  # Adam's fused kernel (rating models: 2.5x faster steps than the default on CPU)

    def __init__(self, model: CollaborativeModel, config: Config) -> None:
        self.name, self.model, self.config = config.model.arch, model, config
        self.record: dict = {}

    def optimizer(self, params: list[nn.Parameter], loop: Loop) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(params, lr=loop.lr, weight_decay=loop.weight_decay, fused=self.fused or None)

    def scheduler(self, optimizer: torch.optim.Optimizer, loop: Loop, total_steps: int) -> Any | None:
        """A constant learning rate."""
        return None

    def save_weights(self, folder: Path) -> None:
        """The recommender's own format, with the run's protocol when it has one."""
        extra = {"protocol": self.record["protocol"]} if "protocol" in self.record else None
        write_recommender(self.model, self.config.model, folder, extra)

    def load_weights(self, folder: Path) -> None:
        """Load what ``save_weights`` wrote (a model or catalogue mismatch is named)."""
        saved = load_recommender(folder, self.config.model, self.model.n_users, self.model.n_items)
        self.model.load_state_dict(saved.state_dict())

    def state_dict(self) -> dict:
        """The selection record."""
        return self.record

    def load_state_dict(self, state: dict) -> None:
        """Restore it."""
        self.record = state


def ranking_run(
    config: Config,
    dataset: Any,
    what: str,
    summary: str,
    protocol: str,
    evaluate: Callable[[CollaborativeModel, Any, str, Config, torch.device], dict],
    train: Callable[[Config, Any, Accelerator, Path, Path | None], dict],
) -> dict:
    """A full-ranking or leave-one-out run (``what``; ``summary`` of its ``dataset`` for the log): with
    ``run.evaluate``, the checkpoint's ``evaluate(model, dataset, split, config, device)`` on valid and test;
    otherwise ``train(config, dataset, accelerator, run folder, resume folder)``. A bad checkpoint or resume folder fails before the run folder exists. They run in one process;
    their losses take bf16 autocast themselves (``run.mixed_precision``), so the Accelerator computes in fp32."""
    started = begin_run(config, protocol=protocol)
    if started.state.num_processes > 1:
        raise DiffRecError(f"{what} runs in one process (launch it without accelerate launch --num_processes)")
    model = None
    if config.run.evaluate:
        if config.run.ckpt is None:
            raise DiffRecError("run.evaluate is true but run.ckpt is not set (a checkpoint folder to evaluate)")
        model = load_recommender(config.run.ckpt, config.model, dataset.n_users, dataset.n_items)
    accelerator = started.open()
    logger.info("run folder %s on %s; %s", started.folder, accelerator.device, summary)
    if model is None:
        metrics = train(config, dataset, accelerator, started.folder, started.resume_from)
    else:
        model = model.to(accelerator.device)
        splits = {split: evaluate(model, dataset, split, config, accelerator.device) for split in ("valid", "test")}
        metrics = {"checkpoint": str(config.run.ckpt), **splits}
    return started.finish(config.model.arch, metrics, protocol=protocol)

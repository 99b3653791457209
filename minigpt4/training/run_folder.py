"""Run folders: ``<output_dir>/<timestamp>/`` holding the resolved config, log, metrics.json and checkpoints;
``<output_dir>/latest`` links to the newest training run (an evaluation's folder never moves it, so
``latest/checkpoints/...`` keeps naming trained weights)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed

from minigpt4.config import Config, dump_config
from minigpt4.errors import DiffRecError
from minigpt4.io import atomic_folder
from minigpt4.recommenders import CollaborativeModel, load_recommender

logger = logging.getLogger("diffrec")
TRAINER_STATE = "trainer_state.json"


def open_run_folder(config: Config, state: PartialState) -> Path:
    """Create the run folder on the main process (all processes get the same path) and start its log."""
    name = [time.strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(name)
    folder = config.run.output_dir / name[0]
    if state.is_main_process:
        suffix = 1
        while folder.exists():  # two runs in the same second never share a folder
            folder = config.run.output_dir / f"{name[0]}-{suffix}"
            suffix += 1
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "config.yaml").write_text(dump_config(config))
        if not config.run.evaluate:
            _point_latest(folder)
    folder = Path(broadcast_object_list([str(folder)])[0])
    _start_log(folder / "log.txt", state.is_main_process)
    return folder


def start_ranking_run(config: Config, n_users: int, n_items: int, what: str) -> tuple[CollaborativeModel | None, Path, torch.device]:
    """The common start of the full-ranking and leave-one-out runs: the checkpoint to evaluate (with
    ``run.evaluate``; None otherwise), the run folder, the seeded device. They run in one process."""
    model = None
    if config.run.evaluate:
        if config.run.ckpt is None:
            raise DiffRecError("run.evaluate is true but run.ckpt is not set (a checkpoint folder to evaluate)")
        model = load_recommender(config.run.ckpt, config.model, n_users, n_items)
    accelerator = Accelerator(cpu=config.run.cpu)
    if accelerator.num_processes > 1:
        raise DiffRecError(f"{what} runs in one process (launch it without accelerate launch --num_processes)")
    run_dir = open_run_folder(config, accelerator.state)
    set_seed(config.run.seed)
    return model, run_dir, accelerator.device


def _point_latest(folder: Path) -> None:
    """Make ``<output_dir>/latest`` a link to ``folder`` (replaced atomically), so configs can name the newest run."""
    link = folder.parent / "latest"
    partial = folder.parent / f".latest-{folder.name}"
    partial.unlink(missing_ok=True)
    partial.symlink_to(folder.name)
    os.replace(partial, link)


def _start_log(path: Path, main: bool) -> None:
    """Log to the run's log.txt and to stderr, on the main process only."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if main else logging.WARNING)
    if main:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        for handler in (logging.FileHandler(path), logging.StreamHandler()):
            handler.setFormatter(formatter)
            logger.addHandler(handler)


def write_metrics(folder: Path, metrics: dict) -> None:
    """metrics.json with missing values (NaN) written as null, never as a number."""
    (folder / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None recursively, so JSON says 'missing' instead of inventing a value."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def save_checkpoint(folder: Path, model: Any, config: Config, optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict) -> None:
    """A model's weights (its ``save_weights``), the resolved config and the state to resume from, written atomically."""
    with atomic_folder(folder) as partial:
        model.save_weights(partial)
        (partial / "config.yaml").write_text(dump_config(config))
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        (partial / TRAINER_STATE).write_text(json.dumps(json_safe(progress), indent=2))

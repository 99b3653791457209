"""Run folders: ``<output_dir>/<timestamp>/`` holding the resolved config, log, metrics.json and checkpoints;
``<output_dir>/latest`` links to the newest training run (an evaluation's folder never moves it, so
``latest/checkpoints/...`` keeps naming trained weights); ``run.resume_from`` resolved to a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed

from minigpt4.config import Config, dump_config, resolve_precision
from minigpt4.errors import DiffRecError, require_file
from minigpt4.hardware import configure_threads, describe, placed_devices
from minigpt4.io import json_safe, read_json

logger = logging.getLogger("diffrec")
TRAINER_STATE = "trainer_state.json"
LAST, BEST = "last", "best"  # checkpoints/last: where a run continues from; checkpoints/best: the selected weights


def choose_hardware(config: Config, llm_device: torch.device, image_device: torch.device | None = None) -> dict:
    """Set this process's CPU threads and resolve the config's ``auto`` dtypes and mixed precision for the
    devices (in place, before any model is built); the record that the log and metrics.json carry."""
    threads = configure_threads()
    return {
        **describe(llm_device),
        "threads_set_by": threads["set_by"],
        "precision": resolve_precision(config, llm_device, image_device),
    }


def run_accelerator(**kwargs) -> Accelerator:
    """The Accelerator of one run. Accelerate keeps one state per process and refuses a later run's other
    mixed precision (the demo trains MF in fp32, then DiffRec under bf16 where it is native), so the
    previous run's state is dropped first; the process group (``PartialState``) stays."""
    AcceleratorState._reset_state()
    return Accelerator(**kwargs)


def open_run_folder(config: Config, state: PartialState, hardware: dict) -> Path:
    """Create the run folder on the main process (all processes get the same path), start its log and log
    the hardware and precision ``choose_hardware`` chose."""
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
    start_log(folder / "log.txt", state.is_main_process)
    precision = ", ".join(
        f"{key} {value['resolved']} ({value['requested']})" for key, value in hardware["precision"].items()
    )
    logger.info(
        "hardware: %s, %s, CPU capability %s, native bf16 %s, %d torch threads (%s); precision: %s",
        hardware["device"],
        hardware.get("gpu", hardware["cpu"]),
        hardware["cpu_capability"],
        hardware["native_bf16"],
        hardware["threads"],
        hardware["threads_set_by"],
        precision,
    )
    return folder


@dataclass
class Run:
    """One training or evaluation run, from its seed to its metrics.json, in the order every trainer follows:
    ``begin_run`` seeds the process before anything random is built, resolves the resume folder and records the
    hardware; the trainer builds its model and data (so bad input fails before any folder exists); ``open``
    creates the run folder and the Accelerator; ``finish`` writes the record."""

    config: Config
    state: PartialState
    hardware: dict
    devices: tuple[torch.device, torch.device]  # the LLM's and the image models' (the process's device twice)
    resume_from: Path | None  # the checkpoints/last folder to continue from
    folder: Path | None = None
    accelerator: Accelerator | None = None

    def open(self, **options: Any) -> Accelerator:
        """Create the run folder (its log started) and the run's Accelerator, logging to tensorboard there."""
        self.folder = open_run_folder(self.config, self.state, self.hardware)
        self.accelerator = run_accelerator(
            cpu=self.config.run.cpu, log_with="tensorboard", project_dir=str(self.folder), **options
        )
        return self.accelerator

    def finish(self, model: str, metrics: dict, **labels: str) -> dict:
        """The run's record (run folder, model, dataset, ``labels``, ``metrics``, hardware; missing values as
        null), written to metrics.json by the main process; the trackers are closed."""
        record = json_safe(
            {
                "run_dir": str(self.folder),
                "model": model,
                "dataset": self.config.datasets.name,
                **labels,
                **metrics,
                "hardware": self.hardware,
            }
        )
        if self.accelerator.is_main_process:
            (self.folder / "metrics.json").write_text(json.dumps(record, indent=2))
        self.accelerator.end_training()
        return record


def begin_run(config: Config, placed: bool = False, protocol: str | None = None) -> Run:
    """Start a run: this process's devices (``run.devices`` when ``placed``), threads and precision, the resume
    folder checked (under ``protocol`` for epoch-based ranking runs; none when only evaluating), then the seed."""
    run = config.run
    state = PartialState(cpu=run.cpu)
    devices = placed_devices(run.devices, run.cpu, state) if placed else (state.device, state.device)
    hardware = choose_hardware(config, *devices)
    if protocol is not None:
        resume_from = epoch_resume(config, protocol)
    else:
        resume_from = None if run.evaluate else resume_folder(run.resume_from, run.output_dir)
    set_seed(run.seed)  # before the trainer builds anything random: a run's weights depend on its seed alone
    return Run(config, state, hardware, devices, resume_from)


def _point_latest(folder: Path) -> None:
    """Make ``<output_dir>/latest`` a link to ``folder`` (replaced atomically), so configs can name the newest run."""
    link = folder.parent / "latest"
    partial = folder.parent / f".latest-{folder.name}"
    partial.unlink(missing_ok=True)
    partial.symlink_to(folder.name)
    os.replace(partial, link)


def start_log(path: Path, main: bool) -> None:
    """Log to the run's log.txt and to stderr, on the main process only (the previous run's log is closed)."""
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if main else logging.WARNING)
    if main:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        for handler in (logging.FileHandler(path), logging.StreamHandler()):
            handler.setFormatter(formatter)
            logger.addHandler(handler)


def output_work_folder(out: Path, key: str) -> Path:
    """``<out>.training``: where a trainer that writes a folder ``out`` (not a run folder) keeps its checkpoints and
    log until ``out`` is written. Emptied first when it holds the work of other inputs or settings (``key`` names
    them); this trainer's log starts there, not in the log of whichever run came before in the process."""
    work = out.with_name(out.name + ".training")
    if (work / "key").is_file() and (work / "key").read_text() != key:
        shutil.rmtree(work)  # another run's checkpoints: nothing to continue
    work.mkdir(parents=True, exist_ok=True)
    (work / "key").write_text(key)
    start_log(work / "log.txt", main=True)
    return work


def continue_from(run_dir: Path) -> tuple[Path | None, int]:
    """``run_dir``'s complete ``checkpoints/last`` and the step it holds, or (None, 0) when there is none."""
    last = run_dir / "checkpoints" / LAST
    if not (last / TRAINER_STATE).is_file():
        return None, 0
    return last, read_json(last / TRAINER_STATE, dict)["step"]


def resume_folder(resume_from: Path | None, output_dir: Path) -> Path | None:
    """``run.resume_from`` as a checkpoint folder: ``latest`` names the newest complete ``checkpoints/last``
    (one that holds its trainer state, never a ``.partial``) of any run under ``output_dir``."""
    if resume_from is None:
        return None
    if resume_from.name != "latest":
        require_file(resume_from / TRAINER_STATE)
        return resume_from
    runs = (
        [path for path in output_dir.iterdir() if path.is_dir() and not path.is_symlink()]
        if output_dir.is_dir()
        else []
    )
    found = [path for folder in runs for path in [folder / "checkpoints" / LAST] if (path / TRAINER_STATE).is_file()]
    if not found:
        raise DiffRecError(
            f"run.resume_from is latest but no run under {output_dir} holds a complete checkpoints/{LAST}"
        )
    return max(found, key=lambda path: (path / TRAINER_STATE).stat().st_mtime_ns)


def epoch_resume(config: Config, protocol: str) -> Path | None:
    """The ``checkpoints/last`` folder ``run.resume_from`` names for an epoch-based ranking run, checked before any
    run folder exists: trained under the same protocol, and short of ``run.max_epochs`` (the total)."""
    run = config.run
    if run.evaluate:
        return None
    folder = resume_folder(run.resume_from, run.output_dir)
    if folder is None:
        return None
    progress = read_json(folder / TRAINER_STATE, dict)
    trained = progress.get("task", {}).get("protocol")
    if trained != protocol:
        raise DiffRecError(
            f"{folder} was trained under '{trained}'; this run asks for '{protocol}' (resume under the same protocol)"
        )
    if progress["epoch"] >= run.max_epochs:
        raise DiffRecError(
            f"{folder} is at epoch {progress['epoch']}; run.max_epochs {run.max_epochs} (the total) leaves nothing to train"
        )
    return folder

"""LLM recommender training and evaluation under Accelerate (``diffrec train`` / ``diffrec evaluate`` on a
``model.arch: llmrec`` config): AdamW, warmup then cosine, gradient accumulation, mixed precision,
evaluation every N optimizer steps with early stopping on valid AUC, resumable checkpoints.

A checkpoint folder (``checkpoints/best``, ``checkpoints/last``) holds the LoRA adapter, the
collaborative modules, ``config.yaml``, and the optimizer, scheduler and loop state to resume from.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from minigpt4.config import Config
from minigpt4.data.contract import RatingDataset, load_rating_dataset, subsample
from minigpt4.data.tensors import whole_batch
from minigpt4.errors import DiffRecError, require_file
from minigpt4.evaluation.ctr import evaluate_all, evaluate_split
from minigpt4.io import json_safe, read_json
from minigpt4.llm.prompts import PromptTemplate
from minigpt4.llm.recommender import LLMRecommender, PromptRows, build_llm_recommender, prompt_rows
from minigpt4.training.run_folder import (
    TRAINER_STATE,
    choose_hardware,
    logger,
    open_run_folder,
    resume_folder,
    run_accelerator,
    save_checkpoint,
    write_metrics,
)


def split_prompt_rows(
    config: Config,
    dataset: RatingDataset,
    model: LLMRecommender,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
) -> dict[str, PromptRows]:
    """Tokenized prompts of train, valid and test (subsampled as ``run.*_rows`` say)."""
    run, history = config.run, model.collab.max_history if model.collab is not None else 0
    rec_config = model.config  # the llmrec section, on its own or inside a joint model
    limits = {"train": run.train_rows, "valid": run.valid_rows, "test": run.test_rows}
    return {
        name: prompt_rows(
            subsample(dataset.splits[name], limits[name], run.seed),
            rec_config,
            template,
            tokenizer,
            history,
            f"{dataset.root}/{name}",
        )
        for name in limits
    }


def train_llm(config: Config) -> dict:
    """Train (or, with ``run.evaluate``, only evaluate) an LLM recommender; returns the metrics."""
    run = config.run
    state = PartialState(cpu=run.cpu)
    hardware = choose_hardware(config, state.device)
    dataset = load_rating_dataset(config.datasets.path)
    run.resume_from = resume_folder(run.resume_from, run.output_dir, "last")
    # Everything that can fail on a bad path or checkpoint fails before the run folder exists.
    model, tokenizer, template = build_llm_recommender(config.model, dataset, state.device)
    if run.evaluate:
        if run.ckpt is None:
            raise DiffRecError("run.evaluate is true but run.ckpt is not set (a checkpoint folder of diffrec train)")
        model.load_weights(run.ckpt)
    elif run.resume_from is not None:
        model.load_weights(run.resume_from)
        require_file(run.resume_from / TRAINER_STATE)
    rows = split_prompt_rows(config, dataset, model, tokenizer, template)
    run_dir = open_run_folder(config, state, hardware)
    accelerator = run_accelerator(
        cpu=run.cpu,
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(run_dir),
    )
    set_seed(run.seed)
    logger.info(
        "run folder %s; %s with %s on %d process(es), %s; rows train/valid/test %d/%d/%d",
        run_dir,
        config.model.mode,
        type(model.llm).__name__,
        accelerator.num_processes,
        accelerator.device,
        len(rows["train"]),
        len(rows["valid"]),
        len(rows["test"]),
    )
    eval_loaders = {name: eval_loader(rows[name], run.eval_batch_size) for name in ("valid", "test")}
    if run.evaluate:
        model, *prepared = accelerator.prepare(model, *eval_loaders.values())
        metrics = {
            "checkpoint": str(run.ckpt),
            **evaluate_all(model, dict(zip(eval_loaders, prepared)), accelerator, progress=True),
        }
    else:
        metrics = _train(config, model, rows["train"], eval_loaders, accelerator, run_dir)
    metrics = json_safe(
        {
            "run_dir": str(run_dir),
            "model": f"llmrec/{config.model.mode}",
            "dataset": config.datasets.name,
            **metrics,
            "hardware": hardware,
        }
    )
    if accelerator.is_main_process:
        write_metrics(run_dir, metrics)
    accelerator.end_training()
    return metrics


def eval_loader(rows: PromptRows, batch_size: int) -> DataLoader:
    """Batches of similar prompt lengths (less padding); predictions are put back in row order afterwards."""
    by_length = sorted(range(len(rows)), key=lambda row: len(rows.input_ids[row]))
    return DataLoader(rows, batch_size=batch_size, sampler=by_length, collate_fn=whole_batch)


def epoch_loader(
    rows: PromptRows, config: Config, epoch: int, accelerator: Accelerator, device: torch.device | None = None
) -> DataLoader:
    """One epoch's training batches: a permutation seeded by (seed, epoch), so a resumed run sees the same
    order, sharded over processes and put on ``device`` (the process's by default)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.run.seed + epoch)).tolist()
    loader = DataLoader(rows, batch_size=config.run.batch_size, sampler=order, collate_fn=whole_batch)
    return prepare_data_loader(
        loader, device or accelerator.device, accelerator.num_processes, accelerator.process_index, put_on_device=True
    )


def _stopped(best: Path) -> str:
    """The end of a stopped run's message: where its best checkpoint so far is."""
    return f"training stopped, the best checkpoint so far is kept at {best if best.is_dir() else '(none yet)'}"


def _train(
    config: Config,
    model: LLMRecommender,
    train_rows: PromptRows,
    eval_loaders: dict,
    accelerator: Accelerator,
    run_dir: Path,
) -> dict:
    """The step loop with periodic evaluation and early stopping; returns the best checkpoint's metrics."""
    run = config.run
    micro_batches = math.ceil(len(train_rows) / (run.batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, micro_batches // run.gradient_accumulation_steps)
    total_steps = run.max_steps or run.max_epochs * steps_per_epoch
    named = sorted((name, param) for name, param in model.named_parameters() if param.requires_grad)
    params = [param for _, param in named]
    logger.info(
        "%d trainable tensors, %d parameters; %d optimizer steps (%d per epoch)",
        len(params),
        sum(p.numel() for p in params),
        total_steps,
        steps_per_epoch,
    )
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, run.warmup_steps, total_steps)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, prepared))
    unwrapped: LLMRecommender = accelerator.unwrap_model(model)
    checkpoints = run_dir / "checkpoints"
    progress = {"step": 0, "epoch": 0, "batch": 0, "best_auc": None, "best_step": 0, "stale": 0, "curve": []}
    if run.resume_from is not None:
        progress = read_json(run.resume_from / TRAINER_STATE, dict)
        optimizer.load_state_dict(torch.load(require_file(run.resume_from / "optimizer.pt"), weights_only=True))
        scheduler.load_state_dict(torch.load(require_file(run.resume_from / "scheduler.pt"), weights_only=True))
        earlier_best = run.resume_from.parent / "best"
        if accelerator.is_main_process and earlier_best.is_dir():
            shutil.copytree(earlier_best, checkpoints / "best")
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            run.resume_from,
            progress["step"],
            progress["epoch"],
            progress["batch"],
        )
    accelerator.init_trackers(
        "tensorboard", config={"mode": config.model.mode, "lr": run.lr, "batch_size": run.batch_size}
    )
    start, samples, loss_sum, loss_count, stop = time.perf_counter(), 0, 0.0, 0, False
    bar = tqdm(
        total=total_steps,
        initial=progress["step"],
        desc=f"train {config.model.mode}",
        disable=not accelerator.is_local_main_process,
    )
    while progress["step"] < total_steps and not stop:
        loader = epoch_loader(train_rows, config, progress["epoch"], accelerator)
        if progress["batch"]:
            loader = accelerator.skip_first_batches(loader, progress["batch"])
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(batch)
                if not torch.isfinite(loss):
                    raise DiffRecError(
                        f"loss became {loss.item()} at step {progress['step']}; {_stopped(checkpoints / 'best')}"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(params, run.max_grad_norm)
                    if not torch.isfinite(norm):
                        raise DiffRecError(
                            f"gradient norm became {norm.item()} at step {progress['step']}; {_stopped(checkpoints / 'best')}"
                        )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress["batch"] += 1
            samples += len(batch) * accelerator.num_processes
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            progress["step"] += 1
            bar.update()
            if progress["step"] % run.eval_every_steps and progress["step"] < total_steps:
                continue
            stop = _evaluate_and_checkpoint(
                config,
                model,
                unwrapped,
                eval_loaders,
                accelerator,
                optimizer,
                scheduler,
                progress,
                loss_sum / loss_count,
                checkpoints,
                start,
            )
            bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", valid_auc=f"{progress['curve'][-1]['valid_auc']:.4f}")
            loss_sum, loss_count = 0.0, 0
            if stop or progress["step"] >= total_steps:
                break
        else:
            progress["epoch"], progress["batch"] = progress["epoch"] + 1, 0
    bar.close()
    train_seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    best_dir = checkpoints / "best"
    if not best_dir.is_dir():
        raise DiffRecError(
            "no evaluation produced a valid AUC (does the valid split hold both labels?); nothing to report"
        )
    unwrapped.load_weights(best_dir)
    metrics = evaluate_all(model, eval_loaders, accelerator, progress=True)
    metrics.update(
        best_step=progress["best_step"],
        steps_run=progress["step"],
        train_seconds=round(train_seconds, 3),
        train_samples_per_second=round(samples / train_seconds, 3),
        checkpoint=str(best_dir),
        curve=progress["curve"],
    )
    logger.info(
        "best step %d: %s", progress["best_step"], json.dumps(json_safe({k: metrics[k] for k in ("valid", "test")}))
    )
    return metrics


def _evaluate_and_checkpoint(
    config: Config,
    model,
    unwrapped: LLMRecommender,
    eval_loaders: dict,
    accelerator: Accelerator,
    optimizer,
    scheduler,
    progress: dict,
    mean_loss: float,
    checkpoints: Path,
    start: float,
) -> bool:
    """Valid metrics, the curve point, the last and (when improved) best checkpoints; True when patience ran out."""
    valid = evaluate_split(model, eval_loaders["valid"], accelerator, "valid")
    model.train()
    step = progress["step"]
    accelerator.log({"train/loss": mean_loss, "valid/auc": valid["auc"], "valid/uauc": valid["uauc"]}, step=step)
    progress["curve"].append(
        {
            "step": step,
            "seconds": round(time.perf_counter() - start, 3),
            "loss": mean_loss,
            "valid_auc": valid["auc"],
            "valid_uauc": valid["uauc"],
        }
    )
    improved = math.isfinite(valid["auc"]) and (progress["best_auc"] is None or valid["auc"] > progress["best_auc"])
    if improved:
        progress.update(best_auc=valid["auc"], best_step=step, stale=0)
    else:
        progress["stale"] += 1
    if accelerator.is_main_process:
        save_checkpoint(checkpoints / "last", unwrapped, config, optimizer, scheduler, progress)
        if improved:
            save_checkpoint(checkpoints / "best", unwrapped, config, optimizer, scheduler, progress)
    accelerator.wait_for_everyone()
    logger.info(
        "step %d: loss %.4f, valid AUC %.4f, UAUC %.4f%s",
        step,
        mean_loss,
        valid["auc"],
        valid["uauc"],
        " (best)" if improved else "",
    )
    if progress["stale"] >= config.run.patience:
        logger.info("early stop at step %d: valid AUC has not improved for %d evaluations", step, progress["stale"])
        return True
    return False

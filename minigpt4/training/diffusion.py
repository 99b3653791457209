"""Personalized image training under Accelerate (``diffrec train`` on a ``model.arch: sd3`` config) and its
evaluation (``diffrec evaluate``: the three arms of ``diffusion/generate.py``, in a run folder).

Samples are the training split's liked (user, item) pairs whose item has an image: the user's
preference vector (frozen collaborative model), the item image's VAE latent distribution and the
caption's SD3 text embeddings. Latents and embeddings are computed once per item before the first
step. LoRA and fusion train with AdamW, warmup then cosine, gradient accumulation and clipping; a
checkpoint (``checkpoints/last``) holds the LoRA in diffusers' format, the fusion weights, the
resolved config and the optimizer, scheduler and loop state to resume from.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from minigpt4.config import Config, FlowMatchingConfig, SD3Config
from minigpt4.data.contract import RatingDataset, load_rating_dataset, subsample
from minigpt4.data.images import (
    PersonalHoldout,
    image_pixels,
    item_captions,
    liked_rows,
    load_holdout,
    load_image_table,
    personal_holdout,
)
from minigpt4.diffusion.generate import evaluate_arms, load_for_sampling
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import LORA_FILE, PersonalizedSD3
from minigpt4.errors import DiffRecError, require_file
from minigpt4.io import json_safe, read_json
from minigpt4.recommenders import load_recommender
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


@dataclass
class ImageSamples:
    """Training samples and the per-item caches they index into."""

    preference: torch.Tensor | None  # [N, d] per sample; None when the LLM gives it (joint runs)
    item_index: torch.Tensor  # [N] row of the item caches
    latent_parameters: torch.Tensor  # [M, 2C, h, w] VAE mean and log-variance per item
    prompt_embeds: torch.Tensor  # [M, L, joint_dim]
    pooled: torch.Tensor  # [M, pooled_dim]
    iids: list[int]  # item id of each cache row
    other_prompt_embeds: torch.Tensor  # [2, L, joint_dim]: the generic instruction, then the empty one
    other_pooled: torch.Tensor  # [2, pooled_dim]

    def __len__(self) -> int:
        return len(self.item_index)

    def captions(
        self, rows: list[int], flow: FlowMatchingConfig, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption embeddings of a micro-batch: each sample's item caption, or with probability
        ``flow.generic_rate`` the generic instruction and ``flow.caption_dropout`` the empty one (drawn
        from ``generator`` only when either is set, so other runs draw what they always drew)."""
        index = self.item_index[rows]
        prompt_embeds, pooled = self.prompt_embeds[index], self.pooled[index]
        if flow.generic_rate + flow.caption_dropout == 0:
            return prompt_embeds, pooled
        draw = torch.rand(len(rows), generator=generator)
        choice = torch.full((len(rows),), -1)
        choice[draw < flow.generic_rate] = 0
        choice[(draw >= flow.generic_rate) & (draw < flow.generic_rate + flow.caption_dropout)] = 1
        replaced = choice >= 0
        prompt_embeds, pooled = prompt_embeds.clone(), pooled.clone()
        prompt_embeds[replaced], pooled[replaced] = (
            self.other_prompt_embeds[choice[replaced]],
            self.other_pooled[choice[replaced]],
        )
        return prompt_embeds, pooled


@torch.no_grad()
def encode_items(
    model: PersonalizedSD3,
    config: SD3Config,
    dataset: RatingDataset,
    images: pd.DataFrame,
    iids: list[int],
    batch_size: int,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """VAE latent distributions of the items' images and SD3 embeddings of their captions, once per item."""
    paths = images.set_index("iid")["path"]
    captions = item_captions(config.flow.caption, dataset.items, iids)
    parts: dict[str, list[torch.Tensor]] = {"latent_parameters": [], "prompt_embeds": [], "pooled": []}
    for start in tqdm(range(0, len(iids), batch_size), desc="encode item images and captions", disable=not progress):
        chunk = iids[start : start + batch_size]
        pixels = torch.stack([image_pixels(dataset.root / paths[iid], config.flow.resolution) for iid in chunk])
        parts["latent_parameters"].append(model.encode_images(pixels).float().cpu())
        prompt_embeds, pooled = model.encode_text(captions[start : start + batch_size])
        parts["prompt_embeds"].append(prompt_embeds.float().cpu())
        parts["pooled"].append(pooled.float().cpu())
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


def image_holdout(config: Config, dataset: RatingDataset, images: pd.DataFrame) -> PersonalHoldout | None:
    """The users whose latest liked items this run's image training holds out (``model.holdout``), or None."""
    holdout = (config.model.image if config.model.arch == "diffrec" else config.model).holdout
    return personal_holdout(dataset, images, holdout.users, holdout.items, config.run.seed) if holdout.users else None


def training_pairs(
    config: Config, dataset: RatingDataset, images: pd.DataFrame, holdout: PersonalHoldout | None = None
) -> pd.DataFrame:
    """The (sub-sampled, ``run.train_rows``) liked training pairs whose item has an image, without the held-out ones."""
    rows = liked_rows(dataset, "train", images)
    rows = subsample(holdout.drop_from(rows) if holdout is not None else rows, config.run.train_rows, config.run.seed)
    if rows.empty:
        raise DiffRecError(
            f"{dataset.root}: no liked training pair has an item image (images.parquet covers {len(images)} items)"
        )
    return rows


def build_samples(
    config: SD3Config,
    rows: pd.DataFrame,
    model: PersonalizedSD3,
    dataset: RatingDataset,
    images: pd.DataFrame,
    batch_size: int,
    progress: bool = True,
) -> ImageSamples:
    """Training samples of liked pairs: preferences (when the model has a collaborative model) and cached item encodings."""
    iids = sorted(int(iid) for iid in rows["iid"].unique())
    caches = encode_items(model, config, dataset, images, iids, batch_size, progress)
    with torch.no_grad():
        other_prompt_embeds, other_pooled = model.encode_text([config.flow.generic_caption, ""])
    preference = model.preference(rows).cpu() if model.collab is not None else None
    position = {iid: index for index, iid in enumerate(iids)}
    item_index = torch.tensor([position[int(iid)] for iid in rows["iid"]])
    return ImageSamples(
        preference,
        item_index,
        iids=iids,
        other_prompt_embeds=other_prompt_embeds.float().cpu(),
        other_pooled=other_pooled.float().cpu(),
        **caches,
    )


def build_personalized(
    config: SD3Config, dataset: RatingDataset, device: torch.device | str = "cpu"
) -> PersonalizedSD3:
    """The pipeline from its folder with a fresh LoRA and fusion, and the frozen collaborative model."""
    collab = load_recommender(config.collab.ckpt, None, dataset.n_users, dataset.n_items).to(device)
    return PersonalizedSD3(config, load_sd3_pipeline(config.pipeline, device), collab)


def load_training_weights(model: PersonalizedSD3, folder: Path) -> None:
    """Put a checkpoint's LoRA and fusion weights into a model built for training (to resume)."""
    path = require_file(folder / LORA_FILE)
    # diffusers' file names keys ``transformer.<module>.lora_A.weight``; peft's state dict drops the prefix.
    state = {key.removeprefix("transformer."): value for key, value in load_file(path).items()}
    result = set_peft_model_state_dict(model.transformer, state)
    if result.unexpected_keys:
        raise DiffRecError(f"{path}: keys that the configured LoRA does not have, first {result.unexpected_keys[0]}")
    model.load_fusion(folder)


def train_images(config: Config) -> dict:
    """Train LoRA and fusion on the liked items' images; returns the loss curve and the checkpoint."""
    run = config.run
    state = PartialState(cpu=run.cpu)
    hardware = choose_hardware(config, state.device)
    dataset = load_rating_dataset(config.datasets.path)
    images = load_image_table(dataset.root, dataset.n_items)
    run.resume_from = resume_folder(run.resume_from, run.output_dir, "last")
    # Everything that can fail on a bad path, image or checkpoint fails before the run folder exists.
    set_seed(run.seed)  # the LoRA and fusion initialisation too
    model = build_personalized(config.model, dataset, state.device)
    if run.resume_from is not None:
        load_training_weights(model, run.resume_from)
        require_file(run.resume_from / TRAINER_STATE)
    model.holdout = image_holdout(config, dataset, images)
    rows = training_pairs(config, dataset, images, model.holdout)
    samples = build_samples(
        config.model, rows, model, dataset, images, run.eval_batch_size, progress=state.is_local_main_process
    )
    if config.model.fusion.standardize and run.resume_from is None:
        model.fusion.standardize_with(samples.preference.to(state.device))
    run_dir = open_run_folder(config, state, hardware)
    accelerator = run_accelerator(
        cpu=run.cpu,
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(run_dir),
    )
    metrics = _train(config, model, samples, accelerator, run_dir)
    metrics = json_safe(
        {"run_dir": str(run_dir), "model": "sd3", "dataset": config.datasets.name, **metrics, "hardware": hardware}
    )
    if accelerator.is_main_process:
        write_metrics(run_dir, metrics)
    accelerator.end_training()
    return metrics


@functools.lru_cache(maxsize=2)
def _pass_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one pass, seeded by (seed, pass); drawn once per pass, not per micro-batch."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))


def micro_batch_rows(
    count: int, batch_size: int, position: int, seed: int, process: int = 0, processes: int = 1
) -> list[int]:
    """The sample positions of micro-batch ``position`` for one process: the pass's seeded order, sharded by
    rank, so a resumed run draws the same rows."""
    per_pass = count // (batch_size * processes)
    if per_pass == 0:
        raise DiffRecError(
            f"{count} image samples cannot fill a micro-batch of {batch_size} on {processes} process(es)"
        )
    epoch, offset = divmod(position, per_pass)
    start = (offset * processes + process) * batch_size
    return _pass_order(count, seed, epoch)[start : start + batch_size].tolist()


def _stopped(checkpoint: Path) -> str:
    """The end of a stopped run's message: where its last checkpoint is."""
    return f"training stopped, the last checkpoint is kept at {checkpoint if checkpoint.is_dir() else '(none yet)'}"


def _train(
    config: Config, model: PersonalizedSD3, samples: ImageSamples, accelerator: Accelerator, run_dir: Path
) -> dict:
    """The step loop: one micro-batch per accumulation step, a checkpoint every ``eval_every_steps``."""
    run = config.run
    micro_per_step = run.gradient_accumulation_steps
    steps_per_epoch = max(1, len(samples) // (run.batch_size * micro_per_step * accelerator.num_processes))
    total_steps = run.max_steps or run.max_epochs * steps_per_epoch
    params = model.trainable_parameters()
    logger.info(
        "run folder %s; %d samples over %d items; %d trainable tensors, %d parameters; %d optimizer steps",
        run_dir,
        len(samples),
        len(samples.iids),
        len(params),
        sum(p.numel() for p in params),
        total_steps,
    )
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, run.warmup_steps, total_steps)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    checkpoint = run_dir / "checkpoints" / "last"
    progress = {"step": 0, "curve": []}
    if run.resume_from is not None:
        progress = read_json(run.resume_from / TRAINER_STATE, dict)
        optimizer.load_state_dict(torch.load(require_file(run.resume_from / "optimizer.pt"), weights_only=True))
        scheduler.load_state_dict(torch.load(require_file(run.resume_from / "scheduler.pt"), weights_only=True))
        logger.info("resumed from %s at step %d", run.resume_from, progress["step"])
    accelerator.init_trackers(
        "tensorboard", config={"lr": run.lr, "batch_size": run.batch_size, "lora_r": config.model.lora.r}
    )
    device = accelerator.device
    start = time.perf_counter()
    bar = tqdm(
        total=total_steps, initial=progress["step"], desc="train sd3", disable=not accelerator.is_local_main_process
    )
    prepared.train()
    while progress["step"] < total_steps:
        step = progress["step"]
        step_loss = 0.0
        for micro in range(micro_per_step):
            # Every micro-batch has its own seeded generator: rows, noise and timesteps repeat on resume.
            position = step * micro_per_step + micro
            rows = micro_batch_rows(
                len(samples), run.batch_size, position, run.seed, accelerator.process_index, accelerator.num_processes
            )
            generator = torch.Generator().manual_seed(
                run.seed * 100_003 + position * accelerator.num_processes + accelerator.process_index
            )
            index = samples.item_index[rows]
            prompt_embeds, pooled = samples.captions(rows, config.model.flow, generator)
            with accelerator.accumulate(prepared):
                latents = model.latents(samples.latent_parameters[index], generator).to(device)
                loss = prepared(
                    latents, prompt_embeds.to(device), pooled.to(device), samples.preference[rows].to(device), generator
                )
                if not torch.isfinite(loss):
                    raise DiffRecError(f"loss became {loss.item()} at step {step}; {_stopped(checkpoint)}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(params, run.max_grad_norm)
                    if not torch.isfinite(norm):
                        raise DiffRecError(f"gradient norm became {norm.item()} at step {step}; {_stopped(checkpoint)}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # Each process draws its own rows: the curve holds the mean over processes.
            step_loss += accelerator.reduce(loss.detach(), "mean").item() / micro_per_step
        scheduler.step()
        progress["step"] = step + 1
        progress["curve"].append(
            {"step": step + 1, "seconds": round(time.perf_counter() - start, 3), "loss": step_loss}
        )
        accelerator.log({"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0]}, step=step + 1)
        bar.update()
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if progress["step"] % run.eval_every_steps == 0 or progress["step"] == total_steps:
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, accelerator.unwrap_model(prepared), config, optimizer, scheduler, progress)
            accelerator.wait_for_everyone()
    bar.close()
    seconds = time.perf_counter() - start
    losses = [point["loss"] for point in progress["curve"]]
    window = max(1, min(10, len(losses) // 4))
    logger.info(
        "trained %d steps in %.1f s; mean loss of the first/last %d steps %.4f -> %.4f",
        progress["step"],
        seconds,
        window,
        np.mean(losses[:window]),
        np.mean(losses[-window:]),
    )
    return {
        "steps_run": progress["step"],
        "samples": len(samples),
        "items": len(samples.iids),
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
        "train_seconds": round(seconds, 3),
        "checkpoint": str(checkpoint),
        "curve": progress["curve"],
    }


def evaluate_images(config: Config) -> dict:
    """Generate in the three arms for liked test pairs (``run.test_rows`` of them) and for the checkpoint's
    held-out users; CLIP and personalization scores."""
    run = config.run
    dataset = load_rating_dataset(config.datasets.path)
    images = load_image_table(dataset.root, dataset.n_items)
    if config.model.clip is None:
        raise DiffRecError("evaluating images needs a CLIP scorer: set model.clip.path")
    state = PartialState(cpu=run.cpu)
    hardware = choose_hardware(config, state.device)
    model = load_for_sampling(config, dataset, state.device)
    pairs = subsample(liked_rows(dataset, "test", images), run.test_rows, run.seed)
    if pairs.empty:
        raise DiffRecError(f"{dataset.root}: no liked test pair has an item image")
    run_dir = open_run_folder(config, state, hardware)
    holdout = load_holdout(run.ckpt, dataset, images)
    results = evaluate_arms(
        model,
        model.preference,
        pairs,
        holdout,
        dataset,
        images,
        config.model,
        run.seed,
        run.eval_batch_size,
        run_dir / "images",
    )
    metrics = json_safe({"run_dir": str(run_dir), "checkpoint": str(run.ckpt), **results, "hardware": hardware})
    if state.is_main_process:
        write_metrics(run_dir, metrics)
    return metrics

"""Personalized image training under Accelerate (``diffrec train`` on a ``model.arch: sd3`` config) and its
evaluation (``diffrec evaluate``: the three arms of ``diffusion/generate.py``, in a run folder).

Samples are the training split's liked (user, item) pairs whose item has an image: the user's
preference vector (frozen collaborative model), the item image's VAE latent distribution and the
caption's SD3 text embeddings. Latents and embeddings are computed once per item before the first
step. LoRA and fusion train as a task of the training engine (``minigpt4.training.engine``); its
``checkpoints/last`` holds the LoRA in diffusers' format and the fusion weights beside the state to resume from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

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
from minigpt4.diffusion.personalized import PersonalizedSD3
from minigpt4.errors import DiffRecError
from minigpt4.recommenders import load_recommender
from minigpt4.training.engine import Engine, MicroBatch, Task, step_loop
from minigpt4.training.run_folder import LAST, begin_run, logger


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


def train_images(config: Config) -> dict:
    """Train LoRA and fusion on the liked items' images; returns the loss curve and the checkpoint."""
    run, started = config.run, begin_run(config)
    device = started.state.device
    dataset = load_rating_dataset(config.datasets.path)
    images = load_image_table(dataset.root, dataset.n_items)
    # Everything that can fail on a bad path, image or checkpoint fails before the run folder exists.
    model = build_personalized(config.model, dataset, device)
    model.holdout = image_holdout(config, dataset, images)
    rows = training_pairs(config, dataset, images, model.holdout)
    samples = build_samples(
        config.model, rows, model, dataset, images, run.eval_batch_size, progress=started.state.is_local_main_process
    )
    if config.model.fusion.standardize and started.resume_from is None:
        model.fusion.standardize_with(samples.preference.to(device))
    accelerator, run_dir = started.open(mixed_precision=run.mixed_precision), started.folder
    logger.info("run folder %s; %d samples over %d items", run_dir, len(samples), len(samples.iids))
    loop = step_loop(run, evaluate=False)
    loop.log_every = 1
    fit = Engine(ImageTask(model, samples, config), loop, accelerator, config, run_dir).fit(started.resume_from)
    losses = [point["loss"] for point in fit.curve]
    window = max(1, min(10, len(losses) // 4))
    logger.info(
        "trained %d steps in %.1f s; mean loss of the first/last %d steps %.4f -> %.4f",
        fit.steps,
        fit.train_seconds,
        window,
        np.mean(losses[:window]),
        np.mean(losses[-window:]),
    )
    metrics = {
        "steps_run": fit.steps,
        "samples": len(samples),
        "items": len(samples.iids),
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
        "train_seconds": fit.train_seconds,
        "train_samples_per_second": fit.samples_per_second,
        "checkpoint": str(run_dir / "checkpoints" / LAST),
        "curve": fit.curve,
    }
    return started.finish("sd3", metrics)


class ImageTask(Task):
    """Flow matching of the personalized SD3 on liked (user, item image, caption) samples."""

    name = "sd3"

    def __init__(self, model: PersonalizedSD3, samples: ImageSamples, config: Config) -> None:
        self.model, self.samples, self.config = model, samples, config

    def trainable(self) -> list[torch.nn.Parameter]:
        """LoRA and fusion."""
        return self.model.trainable_parameters()

    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> list[list[int]]:
        """The pass's seeded sample order, cut into micro-batches sharded by rank."""
        return pass_batches(len(self.samples), self.config.run.batch_size, self.config.run.seed, epoch, accelerator)

    def loss(self, model: torch.nn.Module, batch: list[int], where: MicroBatch) -> dict[str, torch.Tensor]:
        """The flow-matching loss; captions, latents, noise and timesteps drawn from the micro-batch's stream."""
        samples, device = self.samples, self.model.transformer.device
        prompt_embeds, pooled = samples.captions(batch, self.config.model.flow, where.generator)
        latents = self.model.latents(samples.latent_parameters[samples.item_index[batch]], where.generator)
        preference = samples.preference[batch].to(device)
        loss = model(latents.to(device), prompt_embeds.to(device), pooled.to(device), preference, where.generator)
        return {"loss": loss}

    def load_weights(self, folder: Path) -> None:
        """Load what ``save_weights`` wrote."""
        self.model.load_weights(folder)


@functools.lru_cache(maxsize=4)
def pass_batches(count: int, batch_size: int, seed: int, epoch: int, accelerator: Accelerator) -> list[list[int]]:
    """One pass's micro-batches of sample positions for this process: the pass's seeded order cut into
    ``batch_size`` rows, every process taking its own (the rows that fill no micro-batch on all processes wait).
    Drawn once per pass and kept (callers only read it)."""
    processes, process = accelerator.num_processes, accelerator.process_index
    per_pass = count // (batch_size * processes)
    if per_pass == 0:
        raise DiffRecError(
            f"{count} image samples cannot fill a micro-batch of {batch_size} on {processes} process(es)"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
    return [
        order[(offset * processes + process) * batch_size : (offset * processes + process + 1) * batch_size].tolist()
        for offset in range(per_pass)
    ]


def evaluate_images(config: Config) -> dict:
    """Generate in the three arms for liked test pairs (``run.test_rows`` of them) and for the checkpoint's
    held-out users; CLIP and personalization scores."""
    run = config.run
    dataset = load_rating_dataset(config.datasets.path)
    images = load_image_table(dataset.root, dataset.n_items)
    if config.model.clip is None:
        raise DiffRecError("evaluating images needs a CLIP scorer: set model.clip.path")
    started = begin_run(config)
    model = load_for_sampling(config, dataset, started.state.device)
    pairs = subsample(liked_rows(dataset, "test", images), run.test_rows, run.seed)
    if pairs.empty:
        raise DiffRecError(f"{dataset.root}: no liked test pair has an item image")
    started.open()
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
        started.folder / "images",
    )
    return started.finish("sd3", {"checkpoint": str(run.ckpt), **results})

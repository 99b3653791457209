"""Base weights for a tiny SD3 pipeline, trained on a dataset's item images before any personalization.

A randomly initialised VAE decodes to noise, so a personalized LoRA on top of it can only learn noise.
This first trains the VAE to reconstruct the item images (MSE), then trains the
whole transformer with the flow-matching objective on every (image, caption) pair, and writes a new
pipeline folder in diffusers' format. It is what a real deployment gets from the published SD3.5
weights; ``diffrec demo`` runs it on the tiny pipeline and caches the result under a fingerprint of
its inputs, so a second demo run loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from minigpt4.config import FlowMatchingConfig, PipelineConfig
from minigpt4.data.contract import load_rating_dataset
from minigpt4.data.images import image_pixels, item_captions, load_image_table
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import flow_matching_loss, sample_latents
from minigpt4.errors import DiffRecError
from minigpt4.io import atomic_folder

FINGERPRINT_FILE = "base_training.json"
CAPTION_DROPOUT = 0.1


def base_fingerprint(pipeline: Path, dataset: Path, settings: dict) -> str:
    """A digest of the starting pipeline's weights index, the images table and the training settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in sorted(pipeline.rglob("*.json")) + [dataset / "images.parquet"]:
        digest.update(path.read_bytes())
    for path in sorted(pipeline.rglob("*.safetensors")):
        digest.update(path.stat().st_size.to_bytes(8, "little"))
    return digest.hexdigest()[:16]


def train_base_pipeline(
    pipeline: Path,
    dataset_root: Path,
    out: Path,
    caption: str,
    resolution: int = 64,
    vae_steps: int = 150,
    transformer_steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train the VAE, then the transformer, on every item image; write the pipeline to ``out`` (skipped when cached)."""
    settings = {
        "caption": caption,
        "resolution": resolution,
        "vae_steps": vae_steps,
        "transformer_steps": transformer_steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }
    fingerprint = base_fingerprint(pipeline, dataset_root, settings)
    record_path = out / FINGERPRINT_FILE
    if record_path.is_file() and json.loads(record_path.read_text()).get("fingerprint") == fingerprint:
        return {**json.loads(record_path.read_text()), "cached": True}
    dataset = load_rating_dataset(dataset_root)
    table = load_image_table(dataset.root, dataset.n_items)
    if table.empty:
        raise DiffRecError(f"{dataset.root}: the images table is empty; nothing to train the base pipeline on")
    start = time.perf_counter()
    torch.manual_seed(seed)
    pixels = torch.stack(
        [
            image_pixels(dataset.root / path, resolution)
            for path in tqdm(table["path"], desc="read item images", disable=not progress)
        ]
    )
    sd3 = load_sd3_pipeline(PipelineConfig(path=pipeline, use_t5=False, max_sequence_length=8))
    vae_curve = _train_vae(sd3.vae, pixels, vae_steps, batch_size, lr, seed, progress)
    captions = item_captions(caption, dataset.items, list(table["iid"]))
    transformer_curve = _train_transformer(sd3, pixels, captions, transformer_steps, batch_size, lr, seed, progress)
    with atomic_folder(out) as partial:
        sd3.save_pretrained(partial)
        record = {"fingerprint": fingerprint, "settings": settings, "images": len(table), "seconds": round(time.perf_counter() - start, 1),
                  "vae_loss": _ends(vae_curve), "transformer_loss": _ends(transformer_curve)}  # fmt: skip
        (partial / FINGERPRINT_FILE).write_text(json.dumps(record, indent=2))
    return {**record, "cached": False}


def _ends(curve: list[float]) -> dict:
    """Mean of the first and last tenth of a loss curve."""
    tenth = max(1, len(curve) // 10)
    return {"first": float(np.mean(curve[:tenth])), "last": float(np.mean(curve[-tenth:]))}


def _train_vae(
    vae, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, progress: bool
) -> list[float]:
    """Reconstruction (MSE) of random batches of the item images, decoding samples of the posterior.

    The posterior's log-variance stays at the small fixed value the tiny VAE starts with, as a trained SD
    VAE's nearly deterministic posterior: a KL term would drive it towards 1 under Adam (whose update
    size ignores the term's 1e-6 weight) and bury the image in latent noise.
    """
    vae.requires_grad_(True).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    latent_channels = vae.config.latent_channels
    log_variance = vae.encoder.conv_out
    generator = torch.Generator().manual_seed(seed)
    curve = []
    bar = tqdm(range(steps), desc="train base VAE on item images", disable=not progress)
    for _ in bar:
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        reconstruction = vae.decode(vae.encode(batch).latent_dist.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch)
        _check(loss)
        loss.backward()
        log_variance.weight.grad[latent_channels:] = 0
        log_variance.bias.grad[latent_channels:] = 0
        _step(optimizer, vae.parameters())
        curve.append(loss.item())
        bar.set_postfix(loss=f"{curve[-1]:.4f}")
    vae.requires_grad_(False).eval()
    return curve


def _train_transformer(
    sd3, pixels: torch.Tensor, captions: list[str], steps: int, batch_size: int, lr: float, seed: int, progress: bool
) -> list[float]:
    """Flow matching of the whole transformer on (image latent, caption) pairs, latents and embeddings cached once."""
    with torch.no_grad():
        parameters = torch.cat([sd3.vae.encode(chunk).latent_dist.parameters for chunk in pixels.split(64)])
        # The empty caption comes last: dropped captions point at it, as SD's trainers drop 10% of them
        # so that classifier-free guidance has an unconditional prediction to push away from.
        prompt_embeds, _, pooled, _ = sd3.encode_prompt(
            prompt=[*captions, ""],
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=8,
        )
    transformer = sd3.transformer.requires_grad_(True).train()
    optimizer = torch.optim.Adam(transformer.parameters(), lr=lr)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    flow = FlowMatchingConfig()
    generator = torch.Generator().manual_seed(seed + 1)
    curve = []
    bar = tqdm(range(steps), desc="train base transformer on item images", disable=not progress)
    for _ in bar:
        index = torch.randint(len(parameters), (batch_size,), generator=generator)
        latents = sample_latents(sd3.vae, parameters[index], generator)
        text = torch.where(torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT, len(captions), index)
        loss = flow_matching_loss(transformer, scheduler, flow, latents, prompt_embeds[text], pooled[text], generator)
        _check(loss)
        loss.backward()
        _step(optimizer, transformer.parameters())
        curve.append(loss.item())
        bar.set_postfix(loss=f"{curve[-1]:.4f}")
    transformer.requires_grad_(False).eval()
    return curve


def _check(loss: torch.Tensor) -> None:
    """A non-finite loss stops training before it reaches the weights (nothing is written)."""
    if not torch.isfinite(loss):
        raise DiffRecError(f"base training loss became {loss.item()}; nothing was written")


def _step(optimizer: torch.optim.Optimizer, parameters) -> None:
    """One optimizer step on clipped gradients."""
    torch.nn.utils.clip_grad_norm_(list(parameters), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

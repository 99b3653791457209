"""Base weights for a tiny SD3 pipeline, trained on a dataset's item images before any personalization.

A randomly initialised VAE decodes to noise, so a personalized LoRA on top of it can only learn noise.
This first trains the VAE to reconstruct the item images (MSE), then trains the whole transformer with the
flow-matching objective on every (image, caption) pair, and writes a new pipeline folder in diffusers'
format. It is what a real deployment gets from the published SD3.5 weights; ``diffrec demo`` runs it on the
tiny pipeline and caches the result under a fingerprint of its inputs, so a second demo run loads it.

Both phases are engine tasks: their checkpoints live in ``<out>.training/{vae,transformer}/checkpoints``, and a
run killed part-way (the same inputs and settings) continues from the last one and ends as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from minigpt4.config import FlowMatchingConfig, PipelineConfig
from minigpt4.data.contract import load_rating_dataset
from minigpt4.data.images import image_pixels, item_captions, load_image_table
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import flow_matching_loss, sample_latents
from minigpt4.errors import DiffRecError
from minigpt4.io import atomic_folder
from minigpt4.training.engine import Engine, Fit, Loop, MicroBatch, Task, epoch_generator
from minigpt4.training.run_folder import continue_from, output_work_folder, run_accelerator

FINGERPRINT_FILE = "base_training.json"
CAPTION_DROPOUT = 0.1
WEIGHTS = "weights.safetensors"


class BaseTrainingSettings(BaseModel):
    """What the base weights are trained with (all but the checkpoint frequency enters the fingerprint)."""

    model_config = ConfigDict(extra="forbid")

    caption: str
    resolution: int = 64
    vae_steps: int = 150
    transformer_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps between checkpoints of a phase


def base_fingerprint(pipeline: Path, dataset: Path, settings: BaseTrainingSettings) -> str:
    """A digest of the starting pipeline's weights index, the images table and the training settings."""
    digest = hashlib.sha256(settings.model_dump_json(exclude={"checkpoint_every"}).encode())
    for path in sorted(pipeline.rglob("*.json")) + [dataset / "images.parquet"]:
        digest.update(path.read_bytes())
    for path in sorted(pipeline.rglob("*.safetensors")):
        digest.update(path.stat().st_size.to_bytes(8, "little"))
    return digest.hexdigest()[:16]


class _PhaseTask(Task):
    """One phase over random batches of the item rows: Adam at a constant rate, weights as one safetensors file."""

    def __init__(self, model: nn.Module, rows: int, settings: BaseTrainingSettings, steps: int, stream: int) -> None:
        self.model, self.rows, self.settings, self.steps, self.stream = model, rows, settings, steps, stream

    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> torch.Tensor:
        """The whole phase as one epoch of ``steps`` batches of row indices, drawn with replacement."""
        generator = epoch_generator(self.settings.seed, epoch, self.stream)
        return torch.randint(self.rows, (self.steps, self.settings.batch_size), generator=generator)

    def optimizer(self, params: list[nn.Parameter], loop: Loop) -> torch.optim.Optimizer:
        """Adam, as the published SD trainers use."""
        return torch.optim.Adam(params, lr=loop.lr)

    def scheduler(self, optimizer: torch.optim.Optimizer, loop: Loop, total_steps: int) -> None:
        """A constant learning rate."""
        return None

    def save_weights(self, folder: Path) -> None:
        """Every weight of the phase's model in one file."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: value.contiguous() for name, value in self.model.state_dict().items()}, folder / WEIGHTS)

    def load_weights(self, folder: Path) -> None:
        """What ``save_weights`` wrote."""
        self.model.load_state_dict(load_file(folder / WEIGHTS))


class VaeTask(_PhaseTask):
    """Reconstruction (MSE) of random batches of the item images, decoding samples of the posterior.

    The posterior's log-variance stays at the small fixed value the tiny VAE starts with, as a trained SD
    VAE's nearly deterministic posterior: a KL term would drive it towards 1 under Adam (whose update
    size ignores the term's 1e-6 weight) and bury the image in latent noise.
    """

    name = "base VAE"

    def __init__(self, vae: nn.Module, pixels: torch.Tensor, settings: BaseTrainingSettings) -> None:
        super().__init__(vae.requires_grad_(True), len(pixels), settings, settings.vae_steps, stream=0)
        self.pixels = pixels
        channels = vae.config.latent_channels
        log_variance = vae.encoder.conv_out  # its second half of output channels is the log-variance

        def keep_log_variance(grad: torch.Tensor) -> torch.Tensor:
            return torch.cat([grad[:channels], torch.zeros_like(grad[channels:])])

        for param in (log_variance.weight, log_variance.bias):
            param.register_hook(keep_log_variance)

    def loss(self, model: nn.Module, batch: torch.Tensor, where: MicroBatch) -> dict[str, torch.Tensor]:
        """MSE of the decoded posterior sample against the images."""
        pixels = self.pixels[batch]
        reconstruction = model.decode(model.encode(pixels).latent_dist.sample(where.generator)).sample
        return {"loss": F.mse_loss(reconstruction, pixels)}


class TransformerTask(_PhaseTask):
    """Flow matching of the whole transformer on (image latent, caption) pairs, latents and embeddings cached once;
    10% of captions are dropped to the empty one, as SD's trainers do, so that classifier-free guidance has an
    unconditional prediction to push away from."""

    name = "base transformer"

    def __init__(self, sd3, pixels: torch.Tensor, captions: list[str], settings: BaseTrainingSettings) -> None:
        super().__init__(
            sd3.transformer.requires_grad_(True), len(pixels), settings, settings.transformer_steps, stream=1
        )
        self.vae, self.captions = sd3.vae, captions
        with torch.no_grad():
            self.latent_moments = torch.cat(
                [sd3.vae.encode(chunk).latent_dist.parameters for chunk in pixels.split(64)]
            )
            self.prompt_embeds, _, self.pooled, _ = sd3.encode_prompt(
                prompt=[*captions, ""],  # the empty caption last: dropped captions point at it
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                max_sequence_length=8,
            )
        self.flow_scheduler = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
        self.flow = FlowMatchingConfig()

    def loss(self, model: nn.Module, batch: torch.Tensor, where: MicroBatch) -> dict[str, torch.Tensor]:
        """The flow-matching loss of the batch's latents under their (sometimes dropped) captions."""
        latents = sample_latents(self.vae, self.latent_moments[batch], where.generator)
        dropped = torch.rand(len(batch), generator=where.generator) < CAPTION_DROPOUT
        text = torch.where(dropped, len(self.captions), batch)
        loss = flow_matching_loss(
            model, self.flow_scheduler, self.flow, latents, self.prompt_embeds[text], self.pooled[text], where.generator
        )
        return {"loss": loss}


def train_base_pipeline(pipeline: Path, dataset_root: Path, out: Path, settings: BaseTrainingSettings) -> dict:
    """Train the VAE, then the transformer, on every item image; write the pipeline to ``out`` (skipped when cached,
    continued from the last checkpoint when a run with the same fingerprint was stopped)."""
    fingerprint = base_fingerprint(pipeline, dataset_root, settings)
    record_path = out / FINGERPRINT_FILE
    if record_path.is_file() and json.loads(record_path.read_text()).get("fingerprint") == fingerprint:
        return {**json.loads(record_path.read_text()), "cached": True}
    dataset = load_rating_dataset(dataset_root)
    table = load_image_table(dataset.root, dataset.n_items)
    if table.empty:
        raise DiffRecError(f"{dataset.root}: the images table is empty; nothing to train the base pipeline on")
    work = output_work_folder(out, fingerprint)
    set_seed(settings.seed)  # before anything random is built
    pixels = torch.stack(
        [
            image_pixels(dataset.root / path, settings.resolution)
            for path in tqdm(table["path"], desc="read item images")
        ]
    )
    sd3 = load_sd3_pipeline(PipelineConfig(path=pipeline, use_t5=False, max_sequence_length=8))
    vae, vae_from = _run_phase(VaeTask(sd3.vae, pixels, settings), settings, work / "vae")
    sd3.vae.requires_grad_(False).eval()
    captions = item_captions(settings.caption, dataset.items, list(table["iid"]))
    transformer, transformer_from = _run_phase(
        TransformerTask(sd3, pixels, captions, settings), settings, work / "transformer"
    )
    sd3.transformer.requires_grad_(False).eval()
    with atomic_folder(out) as partial:
        sd3.save_pretrained(partial)
        record = {"fingerprint": fingerprint, "settings": settings.model_dump(), "images": len(table),
                  "seconds": round(vae.train_seconds + transformer.train_seconds, 1),
                  "samples_per_second": {"vae": vae.samples_per_second, "transformer": transformer.samples_per_second},
                  "continued_from_step": {"vae": vae_from, "transformer": transformer_from},
                  "vae_loss": _ends(vae), "transformer_loss": _ends(transformer)}  # fmt: skip
        (partial / FINGERPRINT_FILE).write_text(json.dumps(record, indent=2))
        shutil.copy(work / "log.txt", partial / "training_log.txt")
    shutil.rmtree(work)
    return {**record, "cached": False}


def _run_phase(task: _PhaseTask, settings: BaseTrainingSettings, run_dir: Path) -> tuple[Fit, int]:
    """Fit one phase under the engine, continuing from its ``last`` checkpoint when one is complete; the fit and the
    step it started from."""
    resume, start = continue_from(run_dir)
    loop = Loop(seed=settings.seed, max_epochs=1, max_steps=task.steps, lr=settings.lr, max_grad_norm=1.0,
                checkpoint_every=settings.checkpoint_every, log_every=max(1, task.steps // 10))  # fmt: skip
    return Engine(task, loop, run_accelerator(cpu=True), settings, run_dir).fit(resume), start


def _ends(fit: Fit) -> dict:
    """The mean loss over the first and the last of the curve's ten points (each a tenth of the steps)."""
    return {"first": float(fit.curve[0]["loss"]), "last": float(fit.curve[-1]["loss"])}

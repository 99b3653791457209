"""Personalized SD3: a pipeline whose transformer carries a peft LoRA, an adaptive fusion module, and the
frozen collaborative model that gives each user a preference vector. The training loss is the
rectified-flow objective of diffusers' SD3 LoRA trainer (logit-normal timesteps by default)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from minigpt4.config import FlowMatchingConfig, SD3Config
from minigpt4.data.images import PersonalHoldout
from minigpt4.data.tensors import RatingBatch, RatingTensors
from minigpt4.diffusion.fusion import AdaptiveFusion, FusedConditioning
from minigpt4.errors import DiffRecError, require_file
from minigpt4.io import read_safetensors
from minigpt4.recommenders.base import CollaborativeModel

if TYPE_CHECKING:  # for annotations only: the pipeline classes are heavy to import
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

LORA_FILE = "pytorch_lora_weights.safetensors"
FUSION_FILE = "fusion.safetensors"


class PersonalizedSD3(nn.Module):
    """SD3 + LoRA + adaptive fusion; trains on (preference, image latents, caption embeddings) samples."""

    def __init__(
        self,
        config: SD3Config,
        pipeline,
        collab: CollaborativeModel | None,
        lora: bool = True,
        preference_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        # Without a collaborative model the caller supplies preferences of ``preference_dim`` (the LLM's hidden state).
        self.collab = collab.requires_grad_(False).eval() if collab is not None else None
        for part in (
            pipeline.transformer,
            pipeline.vae,
            pipeline.text_encoder,
            pipeline.text_encoder_2,
            pipeline.text_encoder_3,
        ):
            if part is not None:
                part.requires_grad_(False)
        if lora:
            self.transformer.add_adapter(
                LoraConfig(
                    r=config.lora.r,
                    lora_alpha=config.lora.alpha,
                    lora_dropout=config.lora.dropout,
                    init_lora_weights="gaussian",
                    target_modules=config.lora.target_modules,
                )
            )
        transformer_config = self.transformer.config
        if preference_dim is None:
            preference_dim = collab.user_embeddings(
                _probe_batch(max(collab.max_history, 1)).to(next(collab.parameters()).device)
            ).shape[-1]
        # Built beside the transformer, so the model is usable wherever the pipeline was placed.
        self.fusion = AdaptiveFusion(
            preference_dim,
            transformer_config.joint_attention_dim,
            transformer_config.pooled_projection_dim,
            config.fusion.tokens,
            config.fusion.hidden,
        ).to(self.transformer.device)
        # The pipeline's scheduler is re-stepped at every sampling call; training keeps its own copy.
        self.train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self.holdout: PersonalHoldout | None = (
            None  # set by the trainer: what its training never saw, saved with the weights
        )

    def train(self, mode: bool = True) -> PersonalizedSD3:
        """Only the transformer (its LoRA) and the fusion module ever train; the rest stays in eval mode."""
        super().train(mode)
        if self.collab is not None:
            self.collab.eval()
        for part in (self.pipeline.vae, self.pipeline.text_encoder, self.pipeline.text_encoder_2):
            part.eval()
        return self

    @torch.no_grad()
    def preference(self, rows: pd.DataFrame) -> torch.Tensor:
        """The user's preference vector of each rating row, [B, d], from the frozen collaborative model."""
        if self.collab is None:
            raise DiffRecError("this image model takes its preference from the LLM, not from a collaborative model")
        tensors = RatingTensors(rows, self.collab.max_history, self.transformer.device)
        return self.collab.user_embeddings(tensors.__getitems__(list(range(len(rows))))).float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's ``prompt_embeds`` [B, L, joint_dim] and ``pooled_prompt_embeds`` [B, pooled_dim] of each text."""
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=self.config.pipeline.max_sequence_length,
            device=self.transformer.device,
        )
        return prompt_embeds, pooled

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution parameters (mean and log-variance) of [B, 3, H, W] images in [-1, 1]."""
        vae = self.pipeline.vae
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters

    def latents(self, parameters: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw scaled, shifted latents from cached distribution parameters, as diffusers' SD3 trainer does."""
        return sample_latents(self.pipeline.vae, parameters, generator)

    def fuse(
        self,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        preference: torch.Tensor,
        alpha_override: float | None = None,
    ) -> FusedConditioning:
        """The pipeline's conditioning: the text embeddings fused with the preference vectors."""
        return self.fusion(prompt_embeds, pooled, preference, alpha_override)

    def forward(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        preference: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Flow-matching loss of a batch of clean latents under the fused conditioning."""
        fused = self.fuse(prompt_embeds, pooled, preference)
        return flow_matching_loss(
            self.transformer,
            self.train_scheduler,
            self.config.flow,
            latents,
            fused.prompt_embeds,
            fused.pooled_prompt_embeds,
            generator,
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA and fusion parameters."""
        return [p for p in self.parameters() if p.requires_grad]

    def save_weights(self, folder: Path) -> None:
        """LoRA in diffusers' format (``load_lora_weights`` reads it), the fusion module in safetensors and the holdout."""
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(self.transformer),
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
        )
        save_file(
            {name: tensor.detach().contiguous() for name, tensor in self.fusion.state_dict().items()},
            folder / FUSION_FILE,
        )
        if self.holdout is not None:
            self.holdout.save(folder)

    def load_weights(self, folder: Path) -> None:
        """Put a checkpoint's LoRA and fusion weights into this model (to resume, evaluate or serve)."""
        path = require_file(folder / LORA_FILE)
        # diffusers' file names keys ``transformer.<module>.lora_A.weight``; peft's state dict drops the prefix.
        state = {key.removeprefix("transformer."): value for key, value in read_safetensors(path).items()}
        result = set_peft_model_state_dict(self.transformer, state)
        if result.unexpected_keys:
            raise DiffRecError(
                f"{path}: keys that the configured LoRA does not have, first {result.unexpected_keys[0]}"
            )
        self.load_fusion(folder)

    def load_fusion(self, folder: Path) -> None:
        """Load the fusion module of a checkpoint, failing on a missing file or a shape mismatch."""
        path = folder / FUSION_FILE
        if not path.is_file():
            raise DiffRecError(f"{path}: missing (a diffusion checkpoint holds {LORA_FILE} and {FUSION_FILE})")
        state = read_safetensors(path)
        expected = self.fusion.state_dict()
        for name in ("preference_mean", "preference_std"):  # fusion files written before standardization existed
            state.setdefault(name, expected[name])
        for name, tensor in expected.items():
            if name not in state or state[name].shape != tensor.shape:
                got = tuple(state[name].shape) if name in state else "nothing"
                raise DiffRecError(
                    f"{path}: '{name}' should be {tuple(tensor.shape)}, found {got}; the checkpoint was trained with another fusion or collaborative model"
                )
        self.fusion.load_state_dict(state)


def sample_latents(
    vae: AutoencoderKL, parameters: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Latents drawn from a VAE's cached distribution parameters, shifted and scaled as the transformer expects."""
    sample = DiagonalGaussianDistribution(parameters).sample(generator)
    return (sample - vae.config.shift_factor) * vae.config.scaling_factor


def flow_matching_loss(
    transformer: SD3Transformer2DModel,
    scheduler: FlowMatchEulerDiscreteScheduler,
    flow: FlowMatchingConfig,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The rectified-flow loss of diffusers' SD3 trainer for clean latents under the given conditioning."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    u = compute_density_for_timestep_sampling(
        flow.weighting_scheme,
        len(latents),
        logit_mean=flow.logit_mean,
        logit_std=flow.logit_std,
        mode_scale=flow.mode_scale,
        generator=generator,
    )
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    dtype = transformer.dtype
    prediction = transformer(
        hidden_states=noisy.to(dtype),
        timestep=timesteps,
        encoder_hidden_states=prompt_embeds.to(dtype),
        pooled_projections=pooled.to(dtype),
        return_dict=False,
    )[0].float()
    if flow.precondition_outputs:
        prediction = prediction * (-sigmas) + noisy
        target = latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(flow.weighting_scheme, sigmas)
    return (weighting * (prediction - target) ** 2).reshape(len(latents), -1).mean(1).mean()


def load_personalized(
    config: SD3Config, pipeline: StableDiffusion3Pipeline, collab: CollaborativeModel, ckpt: Path
) -> PersonalizedSD3:
    """A plain pipeline with a checkpoint's LoRA loaded through diffusers' ``load_lora_weights`` and its fusion."""
    lora = ckpt / LORA_FILE
    if not lora.is_file():
        raise DiffRecError(
            f"{lora}: missing (run.ckpt must be a checkpoint folder of `diffrec train` on an sd3 config)"
        )
    pipeline.load_lora_weights(ckpt, weight_name=LORA_FILE)
    model = PersonalizedSD3(config, pipeline, collab, lora=False)
    model.load_fusion(ckpt)
    return model


def _probe_batch(history: int) -> RatingBatch:
    """One row for user 1 with an empty (all padding) history, to read the preference dimension."""
    one = torch.ones(1, dtype=torch.long)
    return RatingBatch(rows=one * 0, uid=one, iid=one, label=one.float(), his=torch.zeros(1, history, dtype=torch.long))

"""Sections of the image generator (``model.arch: sd3``) and the joint model (``model.arch: diffrec``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from minigpt4.config.base import Section
from minigpt4.config.llm import CollabConfig, LLMRecConfig

# The attention projections of SD3's joint blocks, and of SD3.5's second (image-only) attention.
SD3_ATTENTION = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
]


class PipelineConfig(Section):
    """An SD3/SD3.5 pipeline folder in diffusers' format and how to place it."""

    path: Path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the VAE always stays float32
    use_t5: bool = True  # False leaves T5-XXL out (its tokens become zeros), as the pipeline allows
    max_sequence_length: int = Field(256, gt=0)  # T5 tokens after CLIP's 77
    cpu_offload: bool = False  # model CPU offload; needs an accelerator
    vae_slicing: bool = False
    vae_tiling: bool = False


class DiffusionLoRAConfig(Section):
    """peft LoRA on the SD3 transformer, saved in diffusers' ``pytorch_lora_weights.safetensors``."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(SD3_ATTENTION))


class FusionConfig(Section):
    """Adaptive fusion: K preference tokens and a pooled shift from the user, mixed in by a per-sample gate."""

    tokens: int = Field(4, gt=0)
    hidden: int = Field(256, gt=0)
    # Standardize each preference dimension with the training samples' mean and std (kept with the fusion
    # weights): collaborative user vectors share a large common direction that says nothing about the user.
    standardize: bool = False
    alpha_override: float | None = Field(None, ge=0, le=1)  # sampling only: force the gate for every sample


class FlowMatchingConfig(Section):
    """The rectified-flow objective of SD3 (diffusers' SD3 LoRA trainer) and what each image is captioned with."""

    caption: str = "{title}"  # filled from the items table; the instruction the image is paired with
    # So that the preference has something to decide: a share of training pairs get an instruction that
    # names no item (only the user's preference then tells what to draw), and a share an empty one.
    generic_caption: str = "a movie poster"
    generic_rate: float = Field(0.0, ge=0, le=1)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    weighting_scheme: Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    precondition_outputs: bool = True  # the loss compares the predicted clean latents, as diffusers does
    resolution: int = Field(1024, gt=0)  # training images are resized and centre-cropped to this

    @model_validator(mode="after")
    def _rates_fit(self) -> FlowMatchingConfig:
        """A pair gets one instruction: the shares of generic and empty ones cannot exceed all pairs."""
        if self.generic_rate + self.caption_dropout > 1:
            raise ValueError(f"generic_rate {self.generic_rate} + caption_dropout {self.caption_dropout} exceeds 1")
        return self


class SamplingConfig(Section):
    """``diffrec generate``: SD3.5 Medium's usual settings, and how many images a run folder keeps."""

    steps: int = Field(40, gt=0)
    guidance_scale: float = Field(4.5, ge=0)
    height: int | None = Field(None, gt=0)  # None: the pipeline's default size
    width: int | None = Field(None, gt=0)
    negative_prompt: str = ""
    keep_best: int = Field(8, ge=0)  # images kept per (user, item, instruction), best CLIP score first
    max_images: int = Field(200, gt=0)  # images kept in the run folder in all; the lowest scores go first


class HoldoutConfig(Section):
    """Users whose most recent liked items the image training never sees; personalization is measured on them."""

    users: int = Field(0, ge=0)  # 0: none held out, and no generic-instruction evaluation
    items: int = Field(5, gt=0)  # the most recent liked items held out per user (users with twice as many qualify)


class ClipConfig(Section):
    """The CLIP scorer: an open_clip ``local-dir`` folder, or a built-in model name with a checkpoint file."""

    path: Path
    model_name: str | None = None  # e.g. ViT-B-32 when path is a checkpoint file; None when path is a folder
    batch_size: int = Field(32, gt=0)


class VLMJudgeConfig(Section):
    """An optional vision-language judge from a local Hugging Face folder (image-text-to-text)."""

    path: Path
    max_new_tokens: int = Field(200, gt=0)


class SD3Config(Section):
    """Personalized images: SD3/SD3.5 with LoRA, conditioned on the user's preference by adaptive fusion."""

    arch: Literal["sd3"] = "sd3"
    pipeline: PipelineConfig
    lora: DiffusionLoRAConfig = Field(default_factory=DiffusionLoRAConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    flow: FlowMatchingConfig = Field(default_factory=FlowMatchingConfig)
    # The user preference vector comes from this collaborative model (in a joint ``diffrec`` model it
    # may be left out: the recommender's collaborative model, or the LLM, gives it).
    collab: CollabConfig | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)
    clip: ClipConfig | None = None
    judge: VLMJudgeConfig | None = None


class JointConfig(Section):
    """How the recommender and the image generator train together in one ``diffrec`` run."""

    preference: Literal["collab", "llm"] = (
        "collab"  # the image side's user vector: collaborative embedding or the LLM's answer-position hidden state
    )
    rec_weight: float = Field(1.0, ge=0)  # loss = rec_weight * BCE + image_weight * flow matching
    image_weight: float = Field(1.0, ge=0)
    schedule: Literal["sum", "alternate"] = "sum"  # alternate: even steps train the recommender, odd steps the images
    image_batch_size: int = Field(4, gt=0)  # liked (user, item image) pairs per micro-batch and process
    eval_images: int = Field(32, gt=0)  # liked test pairs generated and scored at evaluation
    replies: int = Field(0, ge=0)  # personalized replies written at evaluation, for the report
    reply_users: int = Field(
        0, ge=0
    )  # held-out users whose replies (own and shuffled prompt) are scored for personalization


class DiffRecConfig(Section):
    """The whole DiffRec model: the LLM recommender and the personalized image generator, trained jointly."""

    arch: Literal["diffrec"] = "diffrec"
    rec: LLMRecConfig
    image: SD3Config
    joint: JointConfig = Field(default_factory=JointConfig)

    @model_validator(mode="after")
    def _preference_source(self) -> DiffRecConfig:
        """The collaborative preference needs a collaborative model on one side or the other."""
        if self.joint.preference == "collab" and self.image.collab is None and self.rec.collab is None:
            raise ValueError("joint.preference collab needs model.rec.collab or model.image.collab")
        return self

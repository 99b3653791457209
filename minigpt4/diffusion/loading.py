"""Loading an SD3/SD3.5 pipeline folder in diffusers' format (SD3.5 Medium as published, or a tiny one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from minigpt4.config import PipelineConfig
from minigpt4.errors import DiffRecError
from minigpt4.hardware import resolve_dtype
from minigpt4.io import read_json

if TYPE_CHECKING:  # diffusers' pipelines load on first use
    from diffusers import StableDiffusion3Pipeline

# Components a published SD3 folder may leave out; the pipeline takes None for them.
OPTIONAL_COMPONENTS = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")


def load_sd3_pipeline(config: PipelineConfig, device: torch.device | str = "cpu") -> StableDiffusion3Pipeline:
    """A ``StableDiffusion3Pipeline`` from a local folder, with dtype, device, offload and VAE options applied."""
    from diffusers import StableDiffusion3Pipeline

    folder = config.path
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise DiffRecError(
            f"model.pipeline.path {folder}: no model_index.json (expected a diffusers SD3 pipeline folder)"
        )
    index = read_json(index_file, dict)
    if index.get("_class_name") != "StableDiffusion3Pipeline":
        raise DiffRecError(
            f"{index_file}: _class_name is {index.get('_class_name')!r}, expected StableDiffusion3Pipeline"
        )
    # T5 is optional in SD3: leave it out when asked to, or when the folder has none.
    absent = {name: None for name in OPTIONAL_COMPONENTS if index.get(name, [None])[0] is None}
    if not config.use_t5:
        absent.update(text_encoder_3=None, tokenizer_3=None)
    # SD3's VAE decodes badly in half precision; it stays in float32 as in diffusers' trainers.
    dtypes = {"vae": torch.float32, "default": resolve_dtype(config.dtype, device)}
    pipeline = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtypes, **absent)
    if config.vae_slicing:
        pipeline.vae.enable_slicing()
    if config.vae_tiling:
        pipeline.vae.enable_tiling()
    if config.cpu_offload:
        if torch.device(device).type == "cpu":
            raise DiffRecError("model.pipeline.cpu_offload needs an accelerator device; the run is on the CPU")
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline

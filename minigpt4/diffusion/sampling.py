"""Seeded sampling of personalized images, and the image store of a run folder.

``generate_images`` fuses the instruction with each user's preference (the negative branch of
classifier-free guidance gets the text-only conditioning, alpha = 0) and runs the pipeline with one
generator per image, so an image depends only on its own seed. The store keeps images with one JSONL
record each under a keep-best-k and maximum-count policy, instead of one file per call forever.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import torch
from PIL import Image

from minigpt4.config import SamplingConfig
from minigpt4.diffusion.personalized import PersonalizedSD3


@torch.no_grad()
def generate_images(
    model: PersonalizedSD3,
    preference: torch.Tensor,
    instructions: list[str],
    seeds: list[int],
    sampling: SamplingConfig,
    alpha_override: float | None = None,
) -> tuple[list[Image.Image], torch.Tensor]:
    """One image per (preference row, instruction, seed), and the fusion gate alpha of each."""
    pipeline = model.pipeline
    device = model.transformer.device
    guided = sampling.guidance_scale > 1
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
        prompt=instructions,
        prompt_2=None,
        prompt_3=None,
        negative_prompt=[sampling.negative_prompt] * len(instructions),
        do_classifier_free_guidance=guided,
        max_sequence_length=model.config.pipeline.max_sequence_length,
        device=device,
    )
    preference = preference.to(device)
    fused = model.fuse(prompt_embeds, pooled, preference, alpha_override)
    negative = {}
    if guided:
        text_only = model.fuse(negative_embeds, negative_pooled, preference, alpha_override=0.0)
        negative = {
            "negative_prompt_embeds": text_only.prompt_embeds,
            "negative_pooled_prompt_embeds": text_only.pooled_prompt_embeds,
        }
    latents = pipeline(
        prompt_embeds=fused.prompt_embeds,
        pooled_prompt_embeds=fused.pooled_prompt_embeds,
        **negative,
        num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        height=sampling.height,
        width=sampling.width,
        generator=[torch.Generator(device).manual_seed(seed) for seed in seeds],
        output_type="latent",
    ).images
    # Decoded here rather than in the pipeline: the VAE stays in float32 whatever the transformer's dtype.
    vae = pipeline.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    pixels = vae.decode(latents, return_dict=False)[0]
    return pipeline.image_processor.postprocess(pixels, output_type="pil"), fused.alpha.float().cpu()


class ImageStore:
    """PNG files plus ``records.jsonl`` in a folder; keeps the best ``keep_best`` per (user, item, instruction)
    and at most ``max_images`` in all, ranked by ``score`` (records without a score rank by recency)."""

    def __init__(self, folder: Path, keep_best: int, max_images: int) -> None:
        self.folder = Path(folder)
        self.keep_best = keep_best
        self.max_images = max_images
        self.index = self.folder / "records.jsonl"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records = (
            [json.loads(line) for line in self.index.read_text().splitlines()] if self.index.is_file() else []
        )

    def add(self, image: Image.Image, record: dict) -> dict:
        """Save one image with its record, then apply the keep policy; the record says whether it was kept."""
        name = f"u{record.get('user')}_i{record.get('item')}_s{record.get('seed')}_{uuid.uuid4().hex[:8]}.png"
        image.save(self.folder / name)
        record = {**record, "file": name}
        self.records.append(record)
        self._prune()
        record["kept"] = any(kept["file"] == name for kept in self.records)
        return record

    def _prune(self) -> None:
        """Drop the images that fall outside the policy and rewrite the index atomically."""

        def rank(position: int) -> tuple[float, int]:
            score = self.records[position].get("score")
            return (score if isinstance(score, (int, float)) and math.isfinite(score) else -math.inf, position)

        groups: dict[tuple, list[int]] = {}
        for position, record in enumerate(self.records):
            groups.setdefault((record.get("user"), record.get("item"), record.get("instruction")), []).append(position)
        keep = set()
        for positions in groups.values():
            keep.update(sorted(positions, key=rank, reverse=True)[: self.keep_best])
        keep = set(sorted(keep, key=rank, reverse=True)[: self.max_images])
        for position, record in enumerate(self.records):
            if position not in keep:
                (self.folder / record["file"]).unlink(missing_ok=True)
        self.records = [record for position, record in enumerate(self.records) if position in keep]
        partial = self.index.with_suffix(".jsonl.partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in self.records))
        partial.replace(self.index)

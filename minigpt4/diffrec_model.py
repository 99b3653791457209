"""The DiffRec model: the LLM recommender and the personalized SD3 generator in one module, with the joint loss.

Below the trainers and the serving API, which both build it (``build_diffrec``): serving never imports a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from minigpt4.config import DiffRecConfig
from minigpt4.data.contract import RatingDataset
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import PersonalizedSD3
from minigpt4.llm.prompts import PromptTemplate
from minigpt4.llm.recommender import LLMRecommender, PromptBatch, PromptRows, build_llm_recommender, prompt_rows
from minigpt4.recommenders import load_recommender


@dataclass
class ImageBatch:
    """One micro-batch of image pairs: cached latent distributions and caption embeddings, and the preference input."""

    latent_parameters: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    preference: torch.Tensor | None  # collaborative preference vectors, or None when the LLM gives them
    prompts: PromptBatch | None  # the pairs' prompts, when the LLM gives the preference


class DiffRecModel(nn.Module):
    """The LLM recommender and the personalized SD3 generator, with the joint loss."""

    def __init__(
        self,
        config: DiffRecConfig,
        rec: LLMRecommender,
        image: PersonalizedSD3,
        tokenizer: PreTrainedTokenizerBase,
        template: PromptTemplate,
    ) -> None:
        super().__init__()
        self.config = config
        self.rec = rec
        self.image = image
        self.tokenizer = tokenizer  # the LLM's, for prompts and replies
        self.template = template

    @property
    def rec_device(self) -> torch.device:
        """Where the LLM lives."""
        return self.rec.llm.device

    @property
    def image_device(self) -> torch.device:
        """Where the SD3 transformer lives."""
        return self.image.transformer.device

    def rating_prompts(self, rows: pd.DataFrame, where: str) -> PromptRows:
        """The recommender's prompts for rating rows (for the image side's LLM preference)."""
        history = self.rec.collab.max_history if self.rec.collab is not None else 0
        return prompt_rows(rows, self.config.rec, self.template, self.tokenizer, history, where)

    def preference(self, prompts: PromptBatch | None, collab_preference: torch.Tensor | None) -> torch.Tensor:
        """The image side's user vectors: the LLM's answer-position hidden states, or the collaborative ones."""
        if self.config.joint.preference == "llm":
            _, hidden = self.rec.score_and_hidden(prompts.to(self.rec_device))
            return hidden.float().to(self.image_device)
        return collab_preference.to(self.image_device)

    def image_loss(self, batch: ImageBatch, generator: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of one image micro-batch."""
        device = self.image_device
        latents = self.image.latents(batch.latent_parameters, generator).to(device)
        preference = self.preference(batch.prompts, batch.preference)
        return self.image(latents, batch.prompt_embeds.to(device), batch.pooled.to(device), preference, generator)

    def forward(
        self, rec_batch: PromptBatch | None, image_batch: ImageBatch | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted joint loss and its parts (a part is absent when its batch is None)."""
        joint = self.config.joint
        parts: dict[str, torch.Tensor] = {}
        if rec_batch is not None:
            parts["rec"] = self.rec(rec_batch.to(self.rec_device))
        if image_batch is not None:
            parts["image"] = self.image_loss(image_batch, generator).to(self.rec_device)
        weights = {"rec": joint.rec_weight, "image": joint.image_weight}
        return sum(weights[name] * loss for name, loss in parts.items()), parts

    def save_weights(self, folder: Path) -> None:
        """``rec/`` (adapter, collaborative modules and the rec config) and ``image/`` (diffusers LoRA, fusion)."""
        (folder / "rec").mkdir(parents=True, exist_ok=True)
        (folder / "image").mkdir(parents=True, exist_ok=True)
        self.rec.save_weights(folder / "rec")
        (folder / "rec" / "config.yaml").write_text(
            yaml.safe_dump({"model": self.config.rec.model_dump(mode="json")}, sort_keys=False)
        )
        self.image.save_weights(folder / "image")

    def load_weights(self, folder: Path) -> None:
        """Load what ``save_weights`` wrote; a missing file or a mismatch is an error naming it."""
        self.rec.load_weights(folder / "rec")
        self.image.load_weights(folder / "image")


def build_diffrec(
    config: DiffRecConfig, dataset: RatingDataset, devices: tuple[torch.device, torch.device]
) -> DiffRecModel:
    """The recommender on the first device and the image generator (fresh LoRA and fusion) on the second."""
    rec_device, image_device = devices
    rec, tokenizer, template = build_llm_recommender(config.rec, dataset, rec_device)
    preference_dim = None
    if config.joint.preference == "llm":
        collab, preference_dim = None, rec.hidden_size()
    elif config.image.collab is not None:
        collab = load_recommender(config.image.collab.ckpt, None, dataset.n_users, dataset.n_items).to(image_device)
    else:
        collab = rec.collab  # the recommender's frozen collaborative model gives the preference too
    image = PersonalizedSD3(
        config.image, load_sd3_pipeline(config.image.pipeline, image_device), collab, preference_dim=preference_dim
    )
    return DiffRecModel(config, rec, image, tokenizer, template)

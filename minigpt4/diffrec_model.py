"""The DiffRec model: the LLM recommender and the personalized SD3 generator in one module, with the joint loss.

Below the trainers and the serving API, which both build it (``build_diffrec``): serving never imports a trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from minigpt4.config import DiffRecConfig
from minigpt4.data.contract import RatingDataset
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import PersonalizedSD3
from minigpt4.errors import DiffRecError
from minigpt4.llm.prompts import PromptTemplate
from minigpt4.llm.recommender import LLMRecommender, PromptBatch, PromptRows, build_llm_recommender, prompt_rows
from minigpt4.recommenders import CollaborativeModel, load_recommender


@dataclass
class ImageBatch:
    """One micro-batch of image pairs: cached latent distributions and caption embeddings, and the preference input."""

    latent_parameters: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    preference: torch.Tensor | None  # collaborative preference vectors, or None when the LLM gives them
    prompts: PromptBatch | None  # the pairs' prompts, when the LLM gives the preference


PromptsOf = Callable[[pd.DataFrame], PromptRows]  # rating rows -> the recommender's prompts for them


def rating_prompts_of(
    rec: LLMRecommender, template: PromptTemplate, tokenizer: PreTrainedTokenizerBase, where: str
) -> PromptsOf:
    """The recommender's prompts for rating rows, with as much history as its collaborative model reads."""
    history = rec.collab.max_history if rec.collab is not None else 0
    return lambda rows: prompt_rows(rows, rec.config, template, tokenizer, history, where)


class PreferenceSource(ABC):
    """Where the image half reads each sample's user from (``model.joint.preference``): one [B, d] vector per
    rating row. A new source is one subclass, named in ``PREFERENCE_SOURCES`` and in the config's choices."""

    name: ClassVar[str]
    fixed: ClassVar[bool]  # the same vector for a row all through training: cached once, and fusion can standardize

    def check(self, config: DiffRecConfig) -> None:
        """Refuse settings this source cannot train with (one line naming the key); none by default."""
        return None

    @abstractmethod
    def image_collab(
        self, config: DiffRecConfig, rec: LLMRecommender, dataset: RatingDataset, device: torch.device
    ) -> tuple[CollaborativeModel | None, int | None]:
        """The image half's collaborative model and the preference size (None: that model's embedding size)."""

    @abstractmethod
    def training_prompts(self, prompts_of: PromptsOf, pairs: pd.DataFrame) -> PromptRows | None:
        """The image pairs' prompts when the vectors come from the LLM while training (None: cached vectors)."""

    @abstractmethod
    def batch_vectors(
        self, rec: LLMRecommender, image: PersonalizedSD3, prompts: PromptBatch | None, cached: torch.Tensor | None
    ) -> torch.Tensor:
        """A training micro-batch's vectors on the image device, from its prompts or its cached vectors."""

    @abstractmethod
    def row_vectors(
        self, rec: LLMRecommender | None, image: PersonalizedSD3, prompts_of: PromptsOf, rows: pd.DataFrame
    ) -> torch.Tensor:
        """The vectors of rating rows, for generating (evaluation and serving)."""


class CollabPreference(PreferenceSource):
    """The frozen collaborative model's user vector: the image model's own teacher (``model.image.collab``), else
    the recommender's."""

    name, fixed = "collab", True

    def image_collab(self, config, rec, dataset, device):
        if config.image.collab is None:
            return rec.collab, None
        return load_recommender(config.image.collab.ckpt, None, dataset.n_users, dataset.n_items).to(device), None

    def training_prompts(self, prompts_of, pairs):
        return None

    def batch_vectors(self, rec, image, prompts, cached):
        return cached.to(image.transformer.device)

    def row_vectors(self, rec, image, prompts_of, rows):
        return image.preference(rows)


class LLMPreference(PreferenceSource):
    """The LLM's hidden state at the answer position of the row's rating prompt (trained through both losses)."""

    name, fixed = "llm", False

    def check(self, config: DiffRecConfig) -> None:
        if config.rec.llm.gradient_checkpointing:
            # Both LLM passes of a step (ratings and image pairs) would share the CoRA weights that
            # checkpointing re-reads in backward, so the first pass would be recomputed with the second's.
            raise DiffRecError(
                "joint.preference llm runs the LLM twice per step; turn model.rec.llm.gradient_checkpointing off"
            )

    def image_collab(self, config, rec, dataset, device):
        return None, rec.hidden_size()

    def training_prompts(self, prompts_of, pairs):
        return prompts_of(pairs)

    def batch_vectors(self, rec, image, prompts, cached):
        _, hidden = rec.score_and_hidden(prompts.to(rec.llm.device))
        return hidden.float().to(image.transformer.device)

    def row_vectors(self, rec, image, prompts_of, rows):
        prompts = prompts_of(rows.reset_index(drop=True))
        return self.batch_vectors(rec, image, prompts.__getitems__(list(range(len(rows)))), None)


PREFERENCE_SOURCES: dict[str, PreferenceSource] = {
    source.name: source for source in (CollabPreference(), LLMPreference())
}


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
        self.source = PREFERENCE_SOURCES[config.joint.preference]

    @property
    def rec_device(self) -> torch.device:
        """Where the LLM lives."""
        return self.rec.llm.device

    @property
    def image_device(self) -> torch.device:
        """Where the SD3 transformer lives."""
        return self.image.transformer.device

    def prompts_of(self, where: str) -> PromptsOf:
        """The recommender's prompts for rating rows (``where`` names them in errors)."""
        return rating_prompts_of(self.rec, self.template, self.tokenizer, where)

    def row_preference(self, rows: pd.DataFrame, where: str) -> torch.Tensor:
        """The image side's user vectors of rating rows, from the configured source."""
        return self.source.row_vectors(self.rec, self.image, self.prompts_of(where), rows)

    def image_loss(self, batch: ImageBatch, generator: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of one image micro-batch."""
        device = self.image_device
        latents = self.image.latents(batch.latent_parameters, generator).to(device)
        preference = self.source.batch_vectors(self.rec, self.image, batch.prompts, batch.preference)
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
    collab, preference_dim = PREFERENCE_SOURCES[config.joint.preference].image_collab(
        config, rec, dataset, image_device
    )
    image = PersonalizedSD3(
        config.image, load_sd3_pipeline(config.image.pipeline, image_device), collab, preference_dim=preference_dim
    )
    return DiffRecModel(config, rec, image, tokenizer, template)

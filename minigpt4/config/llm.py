"""Sections of the LLM recommender (``model.arch: llmrec``): the causal LM, prompts, LoRA, CoRA, CoLLM, replies."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from minigpt4.config.base import Section

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LLMConfig(Section):
    """The causal LM: a local Hugging Face folder, a GGUF file, or (no path) the bundled SmolLM2-135M-Instruct."""

    path: Path | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = (
        "auto"  # auto: bfloat16 where it is native on the device, else float32
    )
    load_in_8bit: bool = False  # needs bitsandbytes and a CUDA device
    gradient_checkpointing: bool = False
    max_length: int = Field(512, gt=8)  # prompt tokens; the oldest history titles go first when a prompt is longer


class PromptConfig(Section):
    """The prompt template (a file in ``prompts/``) and how much history it shows."""

    template: Path
    max_history: int = Field(10, ge=0)


class LoRAConfig(Section):
    """peft LoRA on the LLM, trained on the prompts in every mode (TALLRec's adapter)."""

    enabled: bool = True
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))


class CoRAConfig(Section):
    """Per-sample collaborative LoRA: a query generator turns concat(user, item) into A; each target has its own B.

    ``generator: ours`` is one cross-attention layer of ``queries`` learned queries (``width``, ``heads``), each
    writing rank / queries rows of A, scaled by 1/sqrt(hidden). ``generator: published`` is CoRA's own: an
    8-layer Q-former (``layers``, ``qformer_heads``, ``ffn``; width = the concat(user, item) size) whose queries'
    mean becomes A, L2-normalised per sample; with it the text LoRA is off unless ``model.lora`` is given, the
    update's input has dropout 0.05 and the update is computed in fp32 under mixed precision."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    generator: Literal["ours", "published"] = "ours"
    queries: int = Field(4, gt=0)
    width: int = Field(256, gt=0)  # ours
    heads: int = Field(4, gt=0)  # ours
    layers: int = Field(8, gt=0)  # published
    qformer_heads: int = Field(8, gt=0)  # published
    ffn: int = Field(3072, gt=0)  # published: BERT's feed-forward size
    dropout: float | None = Field(None, ge=0, lt=1)  # on the update's input; None: 0.05 published, 0 ours
    fp32_update: bool | None = None  # None: True published, False ours

    @property
    def update_dropout(self) -> float:
        """The dropout on the update's input."""
        return self.dropout if self.dropout is not None else (0.05 if self.generator == "published" else 0.0)

    @property
    def update_in_fp32(self) -> bool:
        """Whether the update is computed in fp32 whatever the autocast."""
        return self.fp32_update if self.fp32_update is not None else self.generator == "published"


class CoLLMConfig(Section):
    """CoLLM's projector: an MLP from a collaborative embedding to one token embedding.

    ``recipe: ours`` trains LoRA and one GELU MLP per side together. ``recipe: published`` is CoLLM's two
    stages: the LoRA of a TALLRec run (``stage1``, its checkpoint folder) is loaded and frozen, and one ReLU MLP
    shared by users and items is trained (CoLLM's ``hidden`` is 10 x the embedding size)."""

    hidden: int = Field(256, gt=0)
    recipe: Literal["ours", "published"] = "ours"
    stage1: Path | None = None  # published: a TALLRec checkpoint folder (diffrec train, mode tallrec)


class CollabConfig(Section):
    """The frozen collaborative model behind ``collm`` and ``cora``: a ``diffrec pretrain`` checkpoint folder."""

    ckpt: Path


class ReplyConfig(Section):
    """The personalized reply (``diffrec reply``): its template and sampling settings."""

    template: Path | None = None
    chat_template: bool = True  # the filled template is the user's message in the LLM's chat template, when it has one
    max_new_tokens: int = Field(60, gt=0)
    do_sample: bool = True
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)


class LLMRecConfig(Section):
    """An LLM recommender answering Yes/No: text only (tallrec), embeddings as tokens (collm) or per-sample LoRA (cora)."""

    arch: Literal["llmrec"] = "llmrec"
    mode: Literal["tallrec", "collm", "cora"] = "cora"
    llm: LLMConfig = Field(default_factory=LLMConfig)
    prompt: PromptConfig
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    collab: CollabConfig | None = None
    cora: CoRAConfig = Field(default_factory=CoRAConfig)
    collm: CoLLMConfig = Field(default_factory=CoLLMConfig)
    reply: ReplyConfig = Field(default_factory=ReplyConfig)

    @model_validator(mode="after")
    def _collab_matches_mode(self) -> LLMRecConfig:
        """collm and cora need a collaborative checkpoint; tallrec must not name one it would ignore."""
        if self.mode != "tallrec" and self.collab is None:
            raise ValueError(f"mode {self.mode} needs model.collab.ckpt (a collaborative checkpoint folder)")
        if self.mode == "tallrec" and self.collab is not None:
            raise ValueError("mode tallrec is text only; remove model.collab or choose mode collm or cora")
        if self.mode == "collm" and self.collm.recipe == "published" and self.collm.stage1 is None:
            raise ValueError("model.collm.recipe published needs model.collm.stage1 (a TALLRec checkpoint folder)")
        if self.mode == "collm" and self.collm.recipe == "published" and not self.lora.enabled:
            raise ValueError("model.collm.recipe published freezes the stage-1 LoRA: model.lora.enabled must be true")
        if self.mode == "cora" and self.cora.generator == "published" and "lora" not in self.model_fields_set:
            self.lora = LoRAConfig(enabled=False)  # CoRA as published trains no text LoRA
        if self.cora.generator == "ours" and self.cora.rank % self.cora.queries:
            raise ValueError(
                f"model.cora.rank ({self.cora.rank}) must be a multiple of model.cora.queries ({self.cora.queries})"
            )
        return self

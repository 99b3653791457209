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
    """Per-sample collaborative LoRA: a query generator turns concat(user, item) into A; each target has its own B."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    queries: int = Field(4, gt=0)  # learned queries; each writes rank / queries rows of A
    width: int = Field(256, gt=0)
    heads: int = Field(4, gt=0)


class CoLLMConfig(Section):
    """CoLLM's projector: an MLP from a collaborative embedding to one token embedding."""

    hidden: int = Field(256, gt=0)


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
        if self.cora.rank % self.cora.queries:
            raise ValueError(
                f"model.cora.rank ({self.cora.rank}) must be a multiple of model.cora.queries ({self.cora.queries})"
            )
        return self

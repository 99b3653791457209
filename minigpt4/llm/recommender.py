"""The LLM recommender: a causal LM that answers Yes/No for (user, item) prompts, in three modes that
share one model class, trainer and evaluator.

- ``tallrec``: LoRA (peft) on text-only prompts;
- ``collm``: LoRA plus an MLP putting the frozen collaborative model's user and item embeddings into
  the prompt as token embeddings (``<UserID>``, ``<TargetItemID>``);
- ``cora``: LoRA plus per-sample LoRA weights generated from concat(user, item) embeddings.

A checkpoint folder holds ``adapter/`` (peft's format), ``collab_modules.safetensors`` (the CoRA
generator and B matrices, or the CoLLM projector) and ``config.yaml``; the trainer adds its state.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, ValidationError
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minigpt4.config import LLMRecConfig
from minigpt4.data.contract import RatingDataset
from minigpt4.data.tensors import RatingBatch, RatingTensors
from minigpt4.errors import DiffRecError, first_line, require_file
from minigpt4.io import read_safetensors, read_yaml
from minigpt4.llm.collm import CoLLMProjector
from minigpt4.llm.cora import CoRA
from minigpt4.llm.loading import load_causal_lm, load_tokenizer
from minigpt4.llm.prompts import PromptTemplate, encode_prompts
from minigpt4.llm.scoring import (
    answer_hidden_states,
    answer_token_ids,
    yes_no_from_hidden,
    yes_no_logits,
    yes_no_with_shared_prefix,
)
from minigpt4.recommenders import CollaborativeModel, load_recommender

ADAPTER_DIR = "adapter"
COLLAB_MODULES = "collab_modules.safetensors"
# Model keys that change the shapes or meaning of saved weights; a checkpoint must agree on them.
STRUCTURAL_KEYS = ("mode", "lora", "cora", "collm")


@dataclass
class PromptBatch:
    """Right-padded prompt tokens, slot positions (-1: none) and the collaborative model's inputs."""

    rows: torch.Tensor
    rating: RatingBatch
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    user_slot: torch.Tensor
    item_slot: torch.Tensor

    def to(self, device: torch.device | str) -> PromptBatch:
        """The batch on ``device``."""
        return PromptBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return len(self.rows)


class PromptRows(torch.utils.data.Dataset):
    """One split's prompts, tokenized once; a list of rows becomes one padded ``PromptBatch``."""

    def __init__(
        self,
        frame: pd.DataFrame,
        input_ids: list[list[int]],
        slots: dict[str, np.ndarray],
        collab_history: int,
        pad_id: int,
    ) -> None:
        self.ratings = RatingTensors(frame, collab_history)
        self.uid, self.label, self.not_cold = self.ratings.uid, self.ratings.label, self.ratings.not_cold
        self.input_ids = input_ids
        none = np.full(len(frame), -1, dtype=np.int64)
        self.user_slot = torch.as_tensor(slots.get("<UserID>", none))
        self.item_slot = torch.as_tensor(slots.get("<TargetItemID>", none))
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, row: int) -> PromptBatch:
        return self.__getitems__([row])

    def __getitems__(self, rows: list[int]) -> PromptBatch:
        length = max(len(self.input_ids[row]) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            tokens = self.input_ids[row]
            ids[index, : len(tokens)] = torch.as_tensor(tokens)
            mask[index, : len(tokens)] = 1
        index = torch.as_tensor(rows, dtype=torch.long)
        return PromptBatch(
            index, self.ratings.__getitems__(rows), ids, mask, self.user_slot[index], self.item_slot[index]
        )


def prompt_rows(
    frame: pd.DataFrame,
    config: LLMRecConfig,
    template: PromptTemplate,
    tokenizer: PreTrainedTokenizerBase,
    collab_history: int,
    where: str,
    chat: bool = False,
) -> PromptRows:
    """Fill, tokenize and wrap one split for the LLM recommender (``chat``: inside the tokenizer's chat template)."""
    encoded = encode_prompts(template, frame, tokenizer, config.prompt.max_history, config.llm.max_length, where, chat)
    return PromptRows(frame, encoded.input_ids, encoded.slot_positions, collab_history, tokenizer.pad_token_id)


def check_template(config: LLMRecConfig, template: PromptTemplate) -> None:
    """collm needs both slots; the other modes read no slot."""
    if config.mode == "collm" and set(template.slots) != {"<UserID>", "<TargetItemID>"}:
        raise DiffRecError(
            f"{template.path}: mode collm needs the slots <UserID> and <TargetItemID>, found {list(template.slots) or 'none'}"
        )
    if config.mode != "collm" and template.slots:
        raise DiffRecError(
            f"{template.path}: slots {list(template.slots)} are filled only in mode collm, not {config.mode}"
        )


class LLMRecommender(nn.Module):
    """A causal LM scoring Yes/No prompts, with the mode's way of reading the frozen collaborative model."""

    def __init__(
        self,
        config: LLMRecConfig,
        llm: PreTrainedModel,
        answer_ids: tuple[int, int],
        collab: CollaborativeModel | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        # peft and the older checkpointing name (which works on every supported transformers) warn on
        # newer transformers about deprecated names they call.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if config.lora.enabled:
                lora = config.lora
                llm = get_peft_model(
                    llm,
                    LoraConfig(
                        r=lora.r,
                        lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout,
                        target_modules=lora.target_modules,
                        task_type="CAUSAL_LM",
                    ),
                )
            if config.mode == "collm" and config.collm.recipe == "published":
                # CoLLM's stage 2: the stage-1 TALLRec LoRA, loaded and frozen; only the projector trains.
                check_checkpoint_config(config.collm.stage1, config, keys=("lora",))
                _load_adapter(llm, config.collm.stage1)
                for name, param in llm.named_parameters():
                    if "lora_" in name:
                        param.requires_grad_(False)
            if config.llm.gradient_checkpointing:
                # Non-reentrant checkpointing re-runs each layer inside backward with the CoRA weights it used.
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.llm = llm
        self.register_buffer("answer_ids", torch.as_tensor(answer_ids), persistent=False)
        self.collab = collab
        self.cora: CoRA | None = None
        self.projector: CoLLMProjector | None = None
        if collab is not None:
            collab.requires_grad_(False).eval()
            user_dim, item_dim = collab_dims(collab)
            if config.mode == "cora":
                self.cora = CoRA(self.llm, user_dim, item_dim, config.cora)
            else:
                self.projector = CoLLMProjector(
                    user_dim, item_dim, self.llm.get_input_embeddings().embedding_dim, config.collm
                )

    def train(self, mode: bool = True) -> LLMRecommender:
        """Train mode for the LLM and the new modules; the collaborative model stays frozen in eval mode."""
        super().train(mode)
        if self.collab is not None:
            self.collab.eval()
        return self

    def collab_embeddings(self, rating: RatingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen collaborative model's user and item embeddings, [B, du] and [B, di]."""
        with torch.no_grad():
            return self.collab.user_embeddings(rating).float(), self.collab.item_embeddings(rating.iid).float()

    def prepare_inputs(self, batch: PromptBatch) -> torch.Tensor:
        """Token embeddings of the prompts, with the mode's collaborative signal in place (slots or CoRA weights)."""
        embeds = self.llm.get_input_embeddings()(batch.input_ids)
        if self.collab is not None:
            user, item = self.collab_embeddings(batch.rating)
            if self.cora is not None:
                self.cora.set_weights(user, item)
            else:
                embeds = self.projector.place(embeds, user, item, batch.user_slot, batch.item_slot)
        return embeds

    def score(self, batch: PromptBatch) -> torch.Tensor:
        """log P(" Yes") - log P(" No") at the answer position, [B]."""
        return yes_no_logits(self.llm, self.prepare_inputs(batch), batch.attention_mask, self.answer_ids)

    @property
    def shares_prefixes(self) -> bool:
        """Whether prompts with a common beginning can run it once: not under CoRA, whose per-sample
        weights (from the user *and* the item) change every position's output."""
        return self.cora is None

    def score_shared_prefix(self, batch: PromptBatch, prefix: int) -> torch.Tensor:
        """``score`` of rows whose first ``prefix`` tokens (and collaborative slots there) are the same, that
        part run once."""
        if not self.shares_prefixes:
            raise DiffRecError(
                "CoRA's per-sample weights change every position, the prefix's too: score each prompt whole"
            )
        if not 0 < prefix < int(batch.attention_mask.sum(1).min()):
            raise DiffRecError(f"the shared prefix must be shorter than every prompt, got {prefix} tokens")
        embeds = self.prepare_inputs(batch)
        return yes_no_with_shared_prefix(
            self.llm, embeds[:1, :prefix], embeds[:, prefix:], batch.attention_mask[:, prefix:], self.answer_ids
        )

    def score_and_hidden(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The Yes/No score [B] and the answer position's hidden state [B, hidden] of one forward pass."""
        hidden = answer_hidden_states(self.llm, self.prepare_inputs(batch), batch.attention_mask)
        return yes_no_from_hidden(self.llm, hidden, self.answer_ids), hidden

    def hidden_size(self) -> int:
        """Width of the answer-position hidden state."""
        return self.llm.get_input_embeddings().embedding_dim

    def forward(self, batch: PromptBatch) -> torch.Tensor:
        """Binary cross-entropy of the Yes/No score against the labels."""
        return F.binary_cross_entropy_with_logits(self.score(batch), batch.rating.label)

    def collab_module(self) -> nn.Module | None:
        """The mode's trained module besides LoRA: the CoRA generator and Bs, or the CoLLM projector."""
        return self.cora if self.cora is not None else self.projector

    def save_weights(self, folder: Path) -> None:
        """The trained weights: the LoRA adapter (peft format) and the collaborative modules (safetensors)."""
        if self.config.lora.enabled:
            self.llm.save_pretrained(folder / ADAPTER_DIR)
        module = self.collab_module()
        if module is not None:
            save_file(
                {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()},
                folder / COLLAB_MODULES,
            )

    def load_weights(self, folder: Path) -> None:
        """Load what ``save_weights`` wrote; a missing file or a shape mismatch is an error."""
        folder = Path(folder)
        check_checkpoint_config(folder, self.config)
        if self.config.lora.enabled:
            _load_adapter(self.llm, folder)
        module = self.collab_module()
        if module is not None:
            path = require_file(folder / COLLAB_MODULES)
            try:
                module.load_state_dict(read_safetensors(path))
            except RuntimeError as err:
                raise DiffRecError(f"{path}: weights do not fit this model ({first_line(err)})") from None


def collab_dims(collab: CollaborativeModel) -> tuple[int, int]:
    """Sizes of the collaborative user and item embeddings, read off a one-row probe."""
    device = next(collab.buffers(), next(collab.parameters())).device
    ones = torch.ones(1, dtype=torch.long, device=device)
    probe = RatingBatch(
        rows=ones, uid=ones, iid=ones, label=ones.float(), his=torch.zeros(1, 1, dtype=torch.long, device=device)
    )
    with torch.no_grad():
        return collab.user_embeddings(probe).shape[-1], collab.item_embeddings(ones).shape[-1]


def _load_adapter(llm: nn.Module, folder: Path) -> None:
    """Put a checkpoint's peft adapter into ``llm``; keys of another LoRA are an error naming the file."""
    adapter = require_file(Path(folder) / ADAPTER_DIR / "adapter_model.safetensors")
    state = read_safetensors(adapter)
    expected = set(get_peft_model_state_dict(llm))
    if set(state) != expected:
        raise DiffRecError(
            f"{adapter}: adapter keys differ from this model's LoRA ({len(set(state) ^ expected)} keys differ)"
        )
    set_peft_model_state_dict(llm, state)


def check_checkpoint_config(folder: Path, config: LLMRecConfig, keys: tuple[str, ...] = STRUCTURAL_KEYS) -> None:
    """The checkpoint's saved model section agrees with ``config`` on every weight-shaping key (``keys``); a
    section saved before a key existed reads that key's default."""
    path = require_file(Path(folder) / "config.yaml")
    saved = read_yaml(path)
    saved = saved.get("model", {}) if isinstance(saved, dict) else {}
    current = config.model_dump(mode="json")
    for key in keys:
        section = getattr(config, key)
        if isinstance(section, BaseModel) and isinstance(saved.get(key), dict):
            try:
                saved[key] = type(section).model_validate(saved[key]).model_dump(mode="json")
            except ValidationError:
                pass  # reported as a mismatch below
        if saved.get(key) != current[key]:
            raise DiffRecError(
                f"{path}: checkpoint has model.{key} = {saved.get(key)!r}, this run has {current[key]!r}"
            )


def build_llm_recommender(
    config: LLMRecConfig, dataset: RatingDataset, device: torch.device | str = "cpu"
) -> tuple[LLMRecommender, PreTrainedTokenizerBase, PromptTemplate]:
    """The LLM, its tokenizer, the prompt template and the frozen collaborative model, assembled for the mode."""
    template = PromptTemplate.load(config.prompt.template)
    check_template(config, template)
    collab = None
    if config.collab is not None:
        collab = load_recommender(config.collab.ckpt, None, dataset.n_users, dataset.n_items).to(device)
    tokenizer = load_tokenizer(config.llm)
    answer_ids = answer_token_ids(tokenizer, template.cue)
    model = LLMRecommender(config, load_causal_lm(config.llm, device), answer_ids, collab)
    return model, tokenizer, template

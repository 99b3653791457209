"""Yes/No scoring: the log-odds of the tokenizer's own " Yes" against " No" at the answer position,
from the final hidden state and the two output rows they need (never full-vocabulary logits)."""

from __future__ import annotations

import inspect
import os

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minigpt4.errors import DiffRecError

ANSWER_WORDS = ("Yes", "No")


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, cue: str) -> tuple[int, int]:
    """The ids of " Yes" and " No" as the tokenizer writes them after ``cue``; each must be one token."""
    prefix = tokenizer(cue, add_special_tokens=False).input_ids
    ids = []
    for word in ANSWER_WORDS:
        full = tokenizer(f"{cue} {word}", add_special_tokens=False).input_ids
        extra = full[len(prefix) :]
        if full[: len(prefix)] != prefix or len(extra) != 1:
            raise DiffRecError(
                f"the answer word {word!r} after {cue!r} is {len(extra)} tokens {extra} for this tokenizer; scoring needs exactly one"
            )
        ids.append(extra[0])
    return ids[0], ids[1]


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row."""
    return attention_mask.sum(dim=1) - 1


def answer_hidden_states(
    model: PreTrainedModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The decoder's last hidden state at each row's last token (the answer position), [B, hidden]."""
    hidden = model.get_decoder()(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_positions(attention_mask)]


def yes_no_from_hidden(model: PreTrainedModel, final: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """logit(" Yes") - logit(" No") from answer-position hidden states, [B], through two rows of the output matrix."""
    head = model.get_output_embeddings()
    # In fp32 even under bf16 autocast: two output rows cost nothing, and bf16 logits (about 1/8 apart
    # near 20) would tie most candidates of a ranking.
    with torch.autocast(final.device.type, enabled=False):
        logits = final.float() @ head.weight[answer_ids].float().T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[answer_ids].float()
    return logits[:, 0] - logits[:, 1]


def yes_no_logits(
    model: PreTrainedModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, answer_ids: torch.Tensor
) -> torch.Tensor:
    """logit(" Yes") - logit(" No") at each row's last token, [B], from two rows of the output matrix."""
    return yes_no_from_hidden(model, answer_hidden_states(model, inputs_embeds, attention_mask), answer_ids)


def shared_prefix_length(input_ids: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its own (0: none)."""
    if len(input_ids) < 2:
        return 0
    return max(0, min(len(os.path.commonprefix(input_ids)), min(map(len, input_ids)) - 1))


def yes_no_with_shared_prefix(
    model: PreTrainedModel,
    prefix_embeds: torch.Tensor,
    suffix_embeds: torch.Tensor,
    suffix_mask: torch.Tensor,
    answer_ids: torch.Tensor,
) -> torch.Tensor:
    """``yes_no_logits`` of prompts that all begin with the same tokens: the prefix [1, P, D] runs once and its
    key/value cache serves every right-padded suffix [B, S, D] (``suffix_mask`` [B, S])."""
    decoder = model.get_decoder()
    # transformers renamed ``past_key_values`` to ``cache`` (argument and output) in the 5.x series.
    cache_name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    length = prefix_embeds.shape[1]
    prefix_mask = torch.ones(1, length, dtype=suffix_mask.dtype, device=suffix_mask.device)
    cache = getattr(decoder(inputs_embeds=prefix_embeds, attention_mask=prefix_mask, use_cache=True), cache_name)
    rows = len(suffix_embeds)
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(length, length + suffix_embeds.shape[1], device=suffix_embeds.device).expand(rows, -1)
    hidden = decoder(
        inputs_embeds=suffix_embeds,
        attention_mask=torch.cat([prefix_mask.expand(rows, -1), suffix_mask], dim=1),
        position_ids=positions,
        use_cache=True,
        **{cache_name: cache},
    ).last_hidden_state
    final = hidden[torch.arange(rows, device=hidden.device), last_positions(suffix_mask)]
    return yes_no_from_hidden(model, final, answer_ids)


def full_vocabulary_yes_no(
    model: PreTrainedModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, answer_ids: torch.Tensor
) -> torch.Tensor:
    """The same score through the whole LM head (every position, every token): the reference for tests and benchmarks."""
    logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    final = logits[rows, last_positions(attention_mask)][:, answer_ids]
    return (final[:, 0] - final[:, 1]).float()

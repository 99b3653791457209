"""Yes/No scoring: the log-odds of the tokenizer's own " Yes" against " No" at the answer position,
from the final hidden state and the two output rows they need (never full-vocabulary logits)."""

from __future__ import annotations

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
            raise DiffRecError(f"the answer word {word!r} after {cue!r} is {len(extra)} tokens {extra} for this tokenizer; scoring needs exactly one")
        ids.append(extra[0])
    return ids[0], ids[1]


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row."""
    return attention_mask.sum(dim=1) - 1


def answer_hidden_states(model: PreTrainedModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state at each row's last token (the answer position), [B, hidden]."""
    hidden = model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
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


def full_vocabulary_yes_no(
    model: PreTrainedModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, answer_ids: torch.Tensor
) -> torch.Tensor:
    """The same score through the whole LM head (every position, every token): the reference for tests and benchmarks."""
    logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    final = logits[rows, last_positions(attention_mask)][:, answer_ids]
    return (final[:, 0] - final[:, 1]).float()

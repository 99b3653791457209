"""A short personalized reply about an item, written by the LLM with the same adapters that score it."""

from __future__ import annotations

import pandas as pd
import torch

from minigpt4.config import Config
from minigpt4.data.contract import RatingDataset, load_rating_dataset
from minigpt4.data.tensors import whole_batch
from minigpt4.errors import DiffRecError
from minigpt4.llm.prompts import PromptTemplate
from minigpt4.llm.recommender import LLMRecommender, PromptBatch, check_template, prompt_rows


def reply_row(dataset: RatingDataset, user: int, item: int) -> pd.DataFrame:
    """One rating-table row for (user, item): the user's latest history (and instruction) with the item's title."""
    if not 1 <= user <= dataset.n_users:
        raise DiffRecError(f"--user {user} is not a user id of {dataset.root} (1..{dataset.n_users})")
    titles = dataset.items.set_index("iid")["title"]
    if item not in titles.index:
        raise DiffRecError(f"--item {item} is not an item id of {dataset.root}/items")
    rows = pd.concat(dataset.splits.values(), ignore_index=True)
    rows = rows[rows["uid"] == user]
    if rows.empty:
        raise DiffRecError(f"user {user} has no rows in {dataset.root}")
    latest = rows.sort_values("timestamp", kind="stable").iloc[[-1]].copy()
    latest["iid"], latest["title"], latest["label"] = item, titles[item], 0
    return latest.reset_index(drop=True)


def write_reply(config: Config, user: int, item: int) -> dict:
    """Generate the reply for (user, item) from the checkpoint ``run.ckpt``, seeded by ``run.seed``."""
    from minigpt4.training.llm import build_llm_recommender  # the trainer imports this package

    model_config = config.model
    if model_config.reply.template is None:
        raise DiffRecError("model.reply.template is not set (e.g. ../prompts/reply_movie.txt)")
    if config.run.ckpt is None:
        raise DiffRecError("run.ckpt is not set: a reply needs the trained adapters of a diffrec train checkpoint")
    template = PromptTemplate.load(model_config.reply.template)
    check_template(model_config, template)
    dataset = load_rating_dataset(config.datasets.path)
    model, tokenizer, _ = build_llm_recommender(model_config, dataset)
    model.load_weights(config.run.ckpt)
    row = reply_row(dataset, user, item)
    history = model.collab.max_history if model.collab is not None else 0
    batch = whole_batch(prompt_rows(row, model_config, template, tokenizer, history, "reply").__getitems__([0]))
    text = tokenizer.decode(generate(model, batch, tokenizer.pad_token_id, config), skip_special_tokens=True)
    return {"user": user, "item": item, "title": row["title"].iloc[0], "prompt": tokenizer.decode(batch.input_ids[0]), "reply": text.strip()}


@torch.no_grad()
def generate(model: LLMRecommender, batch: PromptBatch, pad_id: int, config: Config) -> torch.Tensor:
    """The new token ids continuing the batch's one prompt, with the mode's collaborative signal in place."""
    settings = config.model.reply
    model.eval()
    torch.manual_seed(config.run.seed)
    embeds = model.prepare_inputs(batch)
    output = model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=batch.attention_mask,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None,
        pad_token_id=pad_id,
    )
    return output[0]  # generating from embeddings returns only the new tokens

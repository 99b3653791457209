"""A short personalized reply about an item, written by the LLM with the same adapters that score it, and
whether replies are personal: all-MiniLM-L6-v2 embeddings of each held-out user's reply against their
held-out liked items, beside replies written from a shuffled user's prompt."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from minigpt4.config import Config, LLMRecConfig, ReplyConfig
from minigpt4.data.contract import RatingDataset, load_rating_dataset
from minigpt4.data.images import PersonalHoldout
from minigpt4.data.implicit import encode_texts, item_texts
from minigpt4.data.tensors import whole_batch
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.personalization import index_items, personalization_metrics, shuffled_donors
from minigpt4.llm.prompts import PromptTemplate
from minigpt4.llm.recommender import LLMRecommender, PromptBatch, build_llm_recommender, check_template, prompt_rows


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
    if config.run.ckpt is None:
        raise DiffRecError("run.ckpt is not set: a reply needs the trained adapters of a diffrec train checkpoint")
    dataset = load_rating_dataset(config.datasets.path)
    row = reply_row(dataset, user, item)
    reply_template(config.model)  # a missing template fails before the model loads
    model, tokenizer, _ = build_llm_recommender(config.model, dataset)
    model.load_weights(config.run.ckpt)
    return write_replies(model, tokenizer, config.model, config.run.seed, row)[0]


def reply_template(config: LLMRecConfig) -> PromptTemplate:
    """The configured reply template, checked against the mode."""
    if config.reply.template is None:
        raise DiffRecError("model.reply.template is not set (e.g. ../prompts/reply_movie.txt)")
    template = PromptTemplate.load(config.reply.template)
    check_template(config, template)
    return template


def write_replies(
    model: LLMRecommender, tokenizer: PreTrainedTokenizerBase, config: LLMRecConfig, seed: int, rows: pd.DataFrame
) -> list[dict]:
    """One seeded reply per rating row (its user's history and its item), with the prompt it answered."""
    template = reply_template(config)
    history = model.collab.max_history if model.collab is not None else 0
    prompts = prompt_rows(
        rows.reset_index(drop=True), config, template, tokenizer, history, "reply", chat=config.reply.chat_template
    )
    replies = []
    for index, row in enumerate(rows.itertuples()):
        batch = whole_batch(prompts.__getitems__([index])).to(model.llm.device)
        text = tokenizer.decode(
            generate(model, batch, tokenizer.pad_token_id, config.reply, seed), skip_special_tokens=True
        )
        replies.append(
            {
                "user": int(row.uid),
                "item": int(row.iid),
                "title": row.title,
                "prompt": tokenizer.decode(batch.input_ids[0]),
                "reply": text.strip(),
            }
        )
    return replies


@torch.no_grad()
def generate(model: LLMRecommender, batch: PromptBatch, pad_id: int, settings: ReplyConfig, seed: int) -> torch.Tensor:
    """The new token ids continuing the batch's one prompt, with the mode's collaborative signal in place."""
    model.eval()
    torch.manual_seed(seed)
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


REPLY_ARMS = (
    "own",
    "shuffled",
)  # the user's own prompt and collaborative signal; another user's, scored as this user's


def reply_personalization(
    model: LLMRecommender,
    tokenizer: PreTrainedTokenizerBase,
    config: LLMRecConfig,
    seed: int,
    holdout: PersonalHoldout,
    dataset: RatingDataset,
    users: int,
) -> dict:
    """Replies for the first ``users`` held-out users about their latest liked training item, in two arms,
    scored by the personalization metrics over MiniLM embeddings against their held-out liked items (title
    and genres); the copy guard compares with the history titles the prompt showed."""
    if users < 10:
        return {"missing": f"needs replies for 10 or more held-out users; {users} configured (model.joint.reply_users)"}
    rows = holdout.rows.head(users).reset_index(drop=True)
    held_out = holdout.held_out[:users]
    items, liked, history = index_items(held_out, [list(his) for his in rows["his"]])
    item_features = torch.from_numpy(
        encode_texts(item_texts(dataset.items.set_index("iid", drop=False).loc[items].reset_index(drop=True)))
    )
    donors = shuffled_donors(rows["uid"].to_numpy(), seed)
    results = {"users": len(rows), "embedding": "all-MiniLM-L6-v2", "arms": {}}
    for arm, source in (("own", rows), ("shuffled", rows.iloc[donors].reset_index(drop=True))):
        replies = write_replies(model, tokenizer, config, seed, source)
        features = torch.from_numpy(encode_texts([reply["reply"] or " " for reply in replies]))
        metrics = personalization_metrics(features, np.arange(len(rows)), item_features, liked, history, seed=seed)
        results["arms"][arm] = {
            **metrics,
            "examples": [{**reply, "for_user": int(user)} for reply, user in zip(replies[:3], rows["uid"])],
        }
    return results

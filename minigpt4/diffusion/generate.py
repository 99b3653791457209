"""``diffrec generate`` (one user's image, seeded), and the image evaluation that ``diffrec evaluate`` on
``sd3`` and ``diffrec`` configs runs: images in three arms (the fusion, alpha forced to 0, another user's
preference) for liked test pairs and, with the generic instruction, for the users whose latest liked items
the image training held out; scored by CLIP-T and CLIP-I, by the personalization metrics, and by the VLM
judge when one is configured."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from minigpt4.config import Config, SD3Config
from minigpt4.data.contract import RatingDataset, load_rating_dataset
from minigpt4.data.images import PersonalHoldout, item_captions, liked_rows, load_image_table, open_image
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import PersonalizedSD3, load_personalized
from minigpt4.diffusion.sampling import ImageStore, generate_images
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.clip_score import ClipScorer
from minigpt4.evaluation.personalization import index_items, personalization_metrics, shuffled_donors
from minigpt4.evaluation.vlm_judge import VLMJudge, summarize_verdicts
from minigpt4.io import json_safe, log_text
from minigpt4.recommenders import load_recommender

logger = logging.getLogger("diffrec")
REFERENCE_IMAGES = 8  # most recent liked items whose images a CLIP-I score compares against
ARMS = (
    "fused",
    "alpha0",
    "shuffled",
)  # the fusion; the same seeds text-only; the same seeds with another user's preference


def load_for_sampling(config: Config, dataset: RatingDataset, device: torch.device | str = "cpu") -> PersonalizedSD3:
    """The pipeline with ``run.ckpt``'s LoRA (through diffusers' ``load_lora_weights``) and fusion."""
    if config.run.ckpt is None:
        raise DiffRecError("run.ckpt is not set (a checkpoint folder of `diffrec train` on an sd3 config)")
    collab = load_recommender(config.model.collab.ckpt, None, dataset.n_users, dataset.n_items).to(device)
    return load_personalized(config.model, load_sd3_pipeline(config.model.pipeline, device), collab, config.run.ckpt)


def latest_row(dataset: RatingDataset, user: int) -> pd.DataFrame:
    """The user's most recent rating row over all splits (its history is the user's latest)."""
    if not 1 <= user <= dataset.n_users:
        raise DiffRecError(f"unknown user id {user}: {dataset.root} has users 1..{dataset.n_users}")
    rows = pd.concat([frame[frame["uid"] == user] for frame in dataset.splits.values()])
    if rows.empty:
        raise DiffRecError(f"user {user} has no rating row in {dataset.root}")
    return rows.sort_values("timestamp", kind="stable").tail(1).reset_index(drop=True)


def reference_images(dataset: RatingDataset, images: pd.DataFrame, history: list) -> list:
    """The images of the most recent liked history items that have one."""
    paths = images.set_index("iid")["path"]
    recent = [int(iid) for iid in history if int(iid) in paths.index][-REFERENCE_IMAGES:]
    return [open_image(dataset.root / paths[iid]) for iid in recent]


def score_images(
    scorer: ClipScorer | None,
    images: list,
    texts: list[str],
    references: list[list],
    features: torch.Tensor | None = None,
) -> list[dict]:
    """CLIP-T and CLIP-I of each image (missing without a scorer or references), with the backbone;
    ``features``: the images' scorer features when already computed."""
    if scorer is None:
        return [{"clip_t": None, "clip_i": None, "backbone": None, "truncated": None} for _ in images]
    clip_t, _ = scorer.clip_t(images, texts, features)
    clip_i = scorer.clip_i(images, references, features)
    return [
        {"clip_t": t, "clip_i": i, "backbone": scorer.backbone, "truncated": scorer.truncated(text)}
        for t, i, text in zip(clip_t, clip_i, texts)
    ]


def generate_for_user(
    config: Config, user: int, item: int | None, instruction: str | None, seed: int | None, alpha: float | None
) -> dict:
    """One seeded image for a user (about an item, or for a free instruction), stored with its record."""
    dataset = load_rating_dataset(config.datasets.path)
    images = load_image_table(dataset.root, dataset.n_items)
    row = latest_row(dataset, user)
    if item is not None and not 1 <= item <= dataset.n_items:
        raise DiffRecError(f"unknown item id {item}: {dataset.root} has items 1..{dataset.n_items}")
    if instruction is None:
        if item is None:
            raise DiffRecError("give --item (its caption becomes the instruction) or --instruction TEXT")
        instruction = item_captions(config.model.flow.caption, dataset.items, [item])[0]
    device = PartialState(cpu=config.run.cpu).device
    model = load_for_sampling(config, dataset, device)
    scorer = ClipScorer(config.model.clip, device) if config.model.clip is not None else None
    seed = config.run.seed if seed is None else seed
    override = alpha if alpha is not None else config.model.fusion.alpha_override
    generated, gate = generate_images(
        model, model.preference(row), [instruction], [seed], config.model.sampling, override
    )
    scores = score_images(
        scorer, generated, [instruction], [reference_images(dataset, images, list(row["his"].iloc[0]))]
    )[0]
    store = ImageStore(
        config.run.output_dir / "images", config.model.sampling.keep_best, config.model.sampling.max_images
    )
    record = {
        "user": user,
        "item": item,
        "instruction": instruction,
        "seed": seed,
        "alpha": float(gate[0]),
        "alpha_forced": override is not None,
        "checkpoint": str(config.run.ckpt),
        "steps": config.model.sampling.steps,
        "guidance_scale": config.model.sampling.guidance_scale,
        **scores,
        "score": scores["clip_t"],
    }
    record = store.add(generated[0], json_safe(record))
    return {**record, "folder": str(store.folder)}


Preference = Callable[[pd.DataFrame], torch.Tensor]  # rating rows -> their users' preference vectors [B, d]


class DrawnImage(NamedTuple):
    """One generated image of an arm, its record, the judge's verdict (None without a judge) and its scorer features."""

    image: Image.Image
    record: dict
    verdict: dict | None
    features: torch.Tensor


@torch.no_grad()
def evaluate_arms(
    model: PersonalizedSD3,
    preference: Preference,
    pairs: pd.DataFrame,
    holdout: PersonalHoldout | None,
    dataset: RatingDataset,
    images: pd.DataFrame,
    config: SD3Config,
    seed: int,
    batch_size: int,
    store_folder: Path,
) -> dict:
    """Images in the three arms for liked test pairs (each item's caption) and, with a holdout, for each held-out
    user (the generic instruction, so only the preference can tell what to draw); scored by CLIP, by the
    personalization metrics and by the judge when one is configured.

    Each process draws its share (an image's seed is fixed by its row, not by the process); records are
    gathered before any mean, and the main process stores the images. Returns the backbone, the pair count,
    per arm the means of ``summarize_records`` with ``personalization`` (and the judge's), and ``generic``:
    the same for the held-out users, or why it is missing.
    """
    state = PartialState()
    scorer = ClipScorer(config.clip, model.transformer.device)
    judge = VLMJudge(config.judge, model.transformer.device) if config.judge is not None else None
    texts = item_captions(config.flow.caption, dataset.items, list(pairs["iid"]))
    drawn = draw_arms(model, scorer, judge, preference, pairs, texts, dataset, images, config, seed, batch_size)
    results = {"backbone": scorer.backbone, "pairs": len(pairs)}
    results.update(
        summarize_arms(drawn, test_references(scorer, pairs, dataset, images), judge, seed, leave_out_drawn=True)
    )
    if holdout is None:
        results["generic"] = {
            "missing": "the image training held out no users (model.holdout.users 0, or a checkpoint without holdout.json)"
        }
    else:
        generic = draw_arms(
            model,
            scorer,
            judge,
            preference,
            holdout.rows,
            [config.flow.generic_caption] * len(holdout.rows),
            dataset,
            images,
            config,
            seed,
            batch_size,
            generic=True,
        )
        results["generic"] = {
            "instruction": config.flow.generic_caption,
            "users": len(holdout.users),
            "held_out_items": sum(map(len, holdout.held_out)),
            **summarize_arms(
                generic, holdout_references(scorer, holdout, dataset, images), judge, seed, leave_out_drawn=False
            ),
        }
        drawn += generic
    if state.is_main_process:
        store = ImageStore(store_folder, config.sampling.keep_best, config.sampling.max_images)
        for entry in stored_rows(drawn, config.sampling.max_images // 2):
            store.add(entry.image, json_safe(entry.record))
        if holdout is not None:
            holdout.save(store_folder)  # which liked items the report shows as never trained on
    return results


def draw_arms(
    model: PersonalizedSD3,
    scorer: ClipScorer,
    judge: VLMJudge | None,
    preference: Preference,
    rows: pd.DataFrame,
    texts: list[str],
    dataset: RatingDataset,
    images: pd.DataFrame,
    config: SD3Config,
    seed: int,
    batch_size: int,
    generic: bool = False,
) -> list[DrawnImage]:
    """Each row's text drawn in each arm, the same seeds in every arm;
    the shuffled arm takes a seeded other row's user. Records name the row's item unless ``generic``."""
    state = PartialState()
    donors = shuffled_donors(rows["uid"].to_numpy(), seed)
    drawn = []
    with state.split_between_processes(list(range(len(rows)))) as mine:
        for start in tqdm(
            range(0, len(mine), batch_size),
            desc=f"generate images ({'generic instruction' if generic else 'item captions'})",
            disable=not state.is_local_main_process,
        ):
            chunk = mine[start : start + batch_size]
            frame, chunk_texts, seeds = (
                rows.iloc[chunk],
                [texts[index] for index in chunk],
                [seed + index for index in chunk],
            )
            users, others = preference(frame), preference(rows.iloc[donors[chunk]])
            references = [reference_images(dataset, images, list(his)) for his in frame["his"]]
            for variant, vectors, override in (
                ("fused", users, config.fusion.alpha_override),
                ("alpha0", users, 0.0),
                ("shuffled", others, config.fusion.alpha_override),
            ):
                generated, gate = generate_images(model, vectors, chunk_texts, seeds, config.sampling, override)
                features = scorer.image_features(generated)
                scores = score_images(scorer, generated, chunk_texts, references, features)
                for image, row, text, image_seed, alpha, score, feature in zip(
                    generated, frame.itertuples(), chunk_texts, seeds, gate.tolist(), scores, features
                ):
                    record = {
                        "user": int(row.uid),
                        "item": None if generic else int(row.iid),
                        "instruction": text,
                        "seed": image_seed,
                        "alpha": alpha,
                        "variant": variant,
                        **score,
                        "score": score["clip_t"],
                    }
                    drawn.append(
                        DrawnImage(image, record, judge.judge(image, text) if judge is not None else None, feature)
                    )
    return gather_object(drawn)


def stored_rows(drawn: list[DrawnImage], limit: int) -> list[DrawnImage]:
    """The images of the first rows of each kind (item caption, generic) whose every arm fits in ``limit``
    images per kind, so the stored images show the arms side by side."""
    rows: dict[bool, list[tuple]] = {}
    for entry in drawn:
        key = (entry.record["user"], entry.record["item"])
        kind = rows.setdefault(entry.record["item"] is None, [])
        if key not in kind and len(kind) < limit // len(ARMS):
            kind.append(key)
    kept = {key for keys in rows.values() for key in keys}
    return [entry for entry in drawn if (entry.record["user"], entry.record["item"]) in kept]


def summarize_arms(
    drawn: list[DrawnImage], references: HeldOut, judge: VLMJudge | None, seed: int, leave_out_drawn: bool
) -> dict:
    """Per arm: the record means, the judge's verdicts and the personalization metrics against ``references``."""
    results = {}
    for variant in ARMS:
        chosen = [entry for entry in drawn if entry.record["variant"] == variant]
        records = [entry.record for entry in chosen]
        results[variant] = summarize_records(records)
        if judge is not None:
            results[variant]["judge"] = {"model": judge.name, **summarize_verdicts([entry.verdict for entry in chosen])}
        results[variant]["personalization"] = arm_personalization(
            references, records, torch.stack([entry.features for entry in chosen]), seed, leave_out_drawn
        )
        logger.info(
            "%s%s: %s", variant, "" if leave_out_drawn else " (generic instruction)", log_text(results[variant])
        )
    return results


@dataclass
class HeldOut:
    """What the personalization metrics compare images with: each evaluated user's liked items that image training never saw."""

    users: list[int]  # evaluated user ids, in the metrics' user order
    items: list[int]  # item ids whose images were embedded
    features: torch.Tensor | None  # [I, D] scorer image features of ``items``
    liked: list[list[int]]  # per user, rows of ``items``: liked and never in image training
    history: list[list[int]]  # per user, rows of ``items`` among the liked items the generator saw


def embedded_references(
    scorer: ClipScorer,
    dataset: RatingDataset,
    images: pd.DataFrame,
    users: list[int],
    liked: list[list[int]],
    history: list[list[int]],
) -> HeldOut:
    """Users' held-out liked items and history items (item ids, with images), each item embedded once."""
    items, liked_positions, history_positions = index_items(liked, history)
    paths = images.set_index("iid")["path"]
    features = scorer.image_features([open_image(dataset.root / paths[iid]) for iid in items]) if items else None
    return HeldOut(users, items, features, liked_positions, history_positions)


def test_references(scorer: ClipScorer, pairs: pd.DataFrame, dataset: RatingDataset, images: pd.DataFrame) -> HeldOut:
    """The evaluated pairs' users: their liked test items, and the history of their first pair, that have images."""
    liked_test = liked_rows(dataset, "test", images)
    users = sorted(set(pairs["uid"].astype(int)))
    with_image = set(images["iid"].astype(int))
    liked = [sorted(set(liked_test.loc[liked_test["uid"] == user, "iid"].astype(int))) for user in users]
    history = [
        [int(iid) for iid in pairs.loc[pairs["uid"] == user, "his"].iloc[0] if int(iid) in with_image] for user in users
    ]
    return embedded_references(scorer, dataset, images, users, liked, history)


def holdout_references(
    scorer: ClipScorer, holdout: PersonalHoldout, dataset: RatingDataset, images: pd.DataFrame
) -> HeldOut:
    """The held-out users: their held-out liked items, and the liked training items the generator could see."""
    return embedded_references(scorer, dataset, images, holdout.users, holdout.held_out, holdout.liked)


def arm_personalization(
    held_out: HeldOut, records: list[dict], features: torch.Tensor, seed: int, leave_out_drawn: bool = True
) -> dict:
    """Personalization metrics of one arm's images against the held-out liked items (without the item an image
    was drawn for, when ``leave_out_drawn``); missing, with the reason, when fewer than 10 users can be told apart."""
    needed = 2 if leave_out_drawn else 1  # one is left out per image
    scorable = [index for index, user in enumerate(held_out.users) if len(held_out.liked[index]) >= needed]
    if len(scorable) < 10:
        return {
            "missing": f"needs 10 evaluated users with {needed} or more held-out liked items; {len(scorable)} have them"
        }
    position = {held_out.users[index]: rank for rank, index in enumerate(scorable)}
    kept = [row for row, record in enumerate(records) if record["user"] in position]
    row_of = {iid: index for index, iid in enumerate(held_out.items)}
    return personalization_metrics(
        features[kept],
        [position[records[row]["user"]] for row in kept],
        held_out.features,
        [held_out.liked[index] for index in scorable],
        [held_out.history[index] for index in scorable],
        exclude=[row_of[records[row]["item"]] for row in kept] if leave_out_drawn else None,
        seed=seed,
    )


def summarize_records(records: list[dict]) -> dict:
    """Means of CLIP-T, CLIP-I and alpha over records; a mean over no values is missing."""

    def mean(key: str) -> float | None:
        values = [record[key] for record in records if record.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "clip_t": mean("clip_t"),
        "clip_i": mean("clip_i"),
        "alpha": mean("alpha"),
        "truncated": sum(bool(record["truncated"]) for record in records),
        "images": len(records),
    }

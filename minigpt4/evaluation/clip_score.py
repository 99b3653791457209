"""CLIP scores of generated images: CLIP-T (image against its instruction or caption) and CLIP-I
(image against the user's liked items' images), each 100 x max(cos, 0), with the backbone named.

The model loads through open_clip from a ``local-dir`` folder (``open_clip_config.json`` plus
weights) or from a built-in model name with a checkpoint file. Text longer than the model's context
is truncated and counted; no text ever gets a fallback score. ``score_held_out`` measures a scorer itself on
items it never saw: image-to-text retrieval and zero-shot genre accuracy, each against chance.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minigpt4.config import ClipConfig
from minigpt4.errors import DiffRecError

WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


class ClipScorer:
    """An open_clip model with its preprocessing and tokenizer, scoring images in batches."""

    def __init__(self, config: ClipConfig, device: torch.device | str = "cpu") -> None:
        import open_clip

        path = config.path
        if path.is_dir():
            if not (path / "open_clip_config.json").is_file():
                raise DiffRecError(
                    f"model.clip.path {path}: no open_clip_config.json (expected an open_clip local-dir folder)"
                )
            # open_clip only warns when a folder has no weights; a random CLIP must never score anything.
            if not any((path / name).is_file() for name in WEIGHT_FILES):
                raise DiffRecError(f"model.clip.path {path}: no weights file (one of {', '.join(WEIGHT_FILES)})")
            name = f"local-dir:{path}"
            model, _, self.preprocess = open_clip.create_model_and_transforms(name, device=device)
            self.backbone = f"open_clip {path.name}"
        else:
            if not path.is_file():
                raise DiffRecError(f"model.clip.path not found: {path}")
            if config.model_name is None:
                raise DiffRecError(
                    f"model.clip.path {path} is a checkpoint file; set model.clip.model_name (e.g. ViT-B-32)"
                )
            name = config.model_name
            model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path), device=device)
            self.backbone = f"open_clip {name} ({path.name})"
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.context_length = self.tokenizer.context_length
        self.batch_size = config.batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings, [N, D]."""
        features = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack(
                [self.preprocess(image.convert("RGB")) for image in images[start : start + self.batch_size]]
            )
            features.append(self.model.encode_image(pixels.to(self.device)).float())
        return F.normalize(torch.cat(features), dim=-1)

    def truncated(self, text: str) -> bool:
        """Whether ``text`` is longer than the context (start and end tokens included)."""
        inner = getattr(
            self.tokenizer, "tokenizer", None
        )  # open_clip's HFTokenizer wraps a transformers tokenizer (its count has the special tokens)
        length = len(inner(text).input_ids) if inner is not None else len(self.tokenizer.encode(text)) + 2
        return length > self.context_length

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings, [N, D] (over-long texts truncated by the tokenizer)."""
        features = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size])
            features.append(self.model.encode_text(tokens.to(self.device)).float())
        return F.normalize(torch.cat(features), dim=-1)

    def clip_t(
        self, images: list[Image.Image], texts: list[str], features: torch.Tensor | None = None
    ) -> tuple[list[float], int]:
        """CLIP-T of each (image, text) pair, and how many texts were truncated (``features``: the images'
        ``image_features`` when already computed)."""
        if len(images) != len(texts):
            raise DiffRecError(f"CLIP-T needs one text per image, got {len(images)} images and {len(texts)} texts")
        scores = clip_similarity(
            self.image_features(images) if features is None else features, self.text_features(texts)
        )
        return scores.tolist(), sum(self.truncated(text) for text in texts)

    def clip_i(
        self, images: list[Image.Image], references: list[list[Image.Image]], features: torch.Tensor | None = None
    ) -> list[float | None]:
        """CLIP-I of each image: its mean score against its own reference images (None without references)."""
        if len(images) != len(references):
            raise DiffRecError(
                f"CLIP-I needs references per image, got {len(images)} images and {len(references)} lists"
            )
        generated = self.image_features(images) if features is None else features
        flat = [image for group in references for image in group]
        reference = self.image_features(flat) if flat else None
        scores, start = [], 0
        for row, group in enumerate(references):
            if not group:
                scores.append(None)
                continue
            pair = clip_similarity(
                generated[row : row + 1].expand(len(group), -1), reference[start : start + len(group)]
            )
            scores.append(float(pair.mean()))
            start += len(group)
        return scores


def clip_similarity(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """100 x max(cos, 0) of row-aligned unit vectors."""
    return 100.0 * (first * second).sum(-1).clamp(min=0.0)


def item_genres(items, iid: int) -> list[str]:
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

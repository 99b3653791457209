"""Joint DiffRec training and evaluation (``diffrec train`` / ``diffrec evaluate`` on a ``model.arch: diffrec``
config, and ``train_collm_mf_din.py``): the LLM recommender and the personalized image generator in one
Accelerate run.

Each micro-batch pairs rating prompts (the recommender's Yes/No cross-entropy) with liked (user, item
image, caption) pairs (the flow-matching loss; the preference is the collaborative user embedding or
the LLM's answer-position hidden state, by ``joint.preference``). The loss is their weighted sum, or
with ``joint.schedule: alternate`` the recommender's on even steps and the images' on odd ones.

Training is a task of the engine (``minigpt4.training.engine``): every ``run.checkpoint_every_steps``
``checkpoints/last`` holds the trained weights (``rec/``: peft adapter and CoRA modules; ``image/``:
diffusers LoRA and fusion) beside the state to resume from; valid AUC is logged every
``run.eval_every_steps`` and the last weights are the run's checkpoint.

Processes: Accelerate shards the rating batches, the image pairs are sharded by rank, and evaluation
gathers predictions and per-image scores before any mean. ``run.devices`` instead keeps one process
and places the LLM on one device and the image models on another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from torch.utils.data import DataLoader

from minigpt4.config import Config, FlowMatchingConfig
from minigpt4.data.contract import RatingDataset, load_rating_dataset, subsample
from minigpt4.data.images import liked_rows, load_holdout, load_image_table
from minigpt4.diffrec_model import PREFERENCE_SOURCES, DiffRecModel, ImageBatch, build_diffrec
from minigpt4.diffusion.generate import evaluate_arms
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.ctr import evaluate_all, evaluate_split
from minigpt4.llm.recommender import PromptBatch, PromptRows
from minigpt4.llm.reply import reply_personalization, write_replies
from minigpt4.training.diffusion import (
    ImageSamples,
    build_samples,
    image_holdout,
    pass_batches,
    training_pairs,
)
from minigpt4.training.engine import Engine, MicroBatch, Task, shuffled_batches, step_loop
from minigpt4.training.llm import eval_loader, split_prompt_rows
from minigpt4.training.run_folder import LAST, begin_run, logger


@dataclass
class JointData:
    """Everything a joint run reads: prompt rows of each split, the image training samples and the test pairs to draw."""

    prompts: dict[str, PromptRows]
    image_samples: ImageSamples | None  # None in evaluation-only runs
    image_prompts: PromptRows | None  # the training pairs' prompts, when the LLM gives the preference
    test_pairs: pd.DataFrame
    images: pd.DataFrame  # the dataset's images table


def joint_data(config: Config, model: DiffRecModel, dataset: RatingDataset, progress: bool) -> JointData:
    """Prompts, image samples (with cached encodings) and the liked test pairs with images."""
    images = load_image_table(dataset.root, dataset.n_items)
    prompts = split_prompt_rows(config, dataset, model.rec, model.tokenizer, model.template)

    samples = image_prompts = None
    if config.run.evaluate:
        model.image.holdout = load_holdout(config.run.ckpt / "image", dataset, images)
    else:
        model.image.holdout = image_holdout(config, dataset, images)
        pairs = training_pairs(config, dataset, images, model.image.holdout)
        samples = build_samples(
            config.model.image, pairs, model.image, dataset, images, config.run.eval_batch_size, progress
        )
        if config.model.image.fusion.standardize and config.run.resume_from is None:
            if not model.source.fixed:
                raise DiffRecError(
                    "model.image.fusion.standardize needs fixed preference vectors: set model.joint.preference to collab"
                )
            model.image.fusion.standardize_with(samples.preference.to(model.image_device))
        image_prompts = model.source.training_prompts(model.prompts_of(f"{dataset.root}/train (image pairs)"), pairs)
    test_pairs = subsample(liked_rows(dataset, "test", images), config.model.joint.eval_images, config.run.seed)
    if test_pairs.empty:
        raise DiffRecError(f"{dataset.root}: no liked test pair has an item image; nothing to generate for")
    return JointData(prompts, samples, image_prompts, test_pairs, images)


def train_diffrec(config: Config) -> dict:
    """Train (or, with ``run.evaluate``, only evaluate) the joint model; returns the metrics."""
    run = config.run
    dataset = load_rating_dataset(config.datasets.path)
    PREFERENCE_SOURCES[config.model.joint.preference].check(config.model)
    if config.model.image.clip is None:
        raise DiffRecError(
            "a diffrec run ends by scoring its images and needs a CLIP scorer: set model.image.clip.path"
        )
    started = begin_run(config, placed=True)
    devices = started.devices
    # Everything that can fail on a bad path, image or checkpoint fails before the run folder exists.
    model = build_diffrec(config.model, dataset, devices)
    if run.evaluate:
        if run.ckpt is None:
            raise DiffRecError("run.evaluate is true but run.ckpt is not set (a checkpoint folder of diffrec train)")
        model.load_weights(run.ckpt)
    data = joint_data(config, model, dataset, progress=started.state.is_local_main_process)
    unused = DistributedDataParallelKwargs(find_unused_parameters=config.model.joint.schedule == "alternate")
    accelerator = started.open(
        mixed_precision=run.mixed_precision, device_placement=run.devices is None, kwargs_handlers=[unused]
    )
    run_dir = started.folder
    logger.info(
        "run folder %s; %s + sd3 on %d process(es), LLM on %s, images on %s; rows train/valid/test %d/%d/%d, image pairs train/test %s/%d",
        run_dir,
        config.model.rec.mode,
        accelerator.num_processes,
        devices[0],
        devices[1],
        len(data.prompts["train"]),
        len(data.prompts["valid"]),
        len(data.prompts["test"]),
        len(data.image_samples) if data.image_samples is not None else "-",
        len(data.test_pairs),
    )
    loaders = {name: eval_loader(data.prompts[name], run.eval_batch_size) for name in ("valid", "test")}
    loaders = {
        name: prepare_data_loader(
            loader, devices[0], accelerator.num_processes, accelerator.process_index, put_on_device=True
        )
        for name, loader in loaders.items()
    }
    if run.evaluate:
        model, valid = accelerator.prepare(model), None
        metrics = {"checkpoint": str(run.ckpt)}
    else:
        task = JointTask(model, data, loaders["valid"], config, accelerator)
        fit = Engine(task, step_loop(run, early_stop=False), accelerator, config, run_dir).fit(started.resume_from)
        # The last step is always evaluated, so its valid metrics are the final weights'.
        model, valid = fit.model, task.last_valid
        metrics = {
            "steps_run": fit.steps,
            "train_seconds": fit.train_seconds,
            "train_samples_per_second": fit.samples_per_second,
            "checkpoint": str(run_dir / "checkpoints" / LAST),
            "curve": fit.curve,
        }
    metrics.update(evaluate_diffrec(config, model, data, loaders, accelerator, run_dir, dataset, valid))
    return started.finish(f"diffrec/{config.model.rec.mode}", metrics)


def _image_batch(data: JointData, rows: list[int], flow: FlowMatchingConfig, generator: torch.Generator) -> ImageBatch:
    """The image micro-batch of the given sample positions (captions drawn as ``flow`` says)."""
    samples = data.image_samples
    index = samples.item_index[rows]
    prompt_embeds, pooled = samples.captions(rows, flow, generator)
    return ImageBatch(
        latent_parameters=samples.latent_parameters[index],
        prompt_embeds=prompt_embeds,
        pooled=pooled,
        preference=samples.preference[rows] if samples.preference is not None else None,
        prompts=data.image_prompts.__getitems__(rows) if data.image_prompts is not None else None,
    )


class JointTask(Task):
    """The joint loss of rating prompts and image pairs; valid AUC is logged, the last weights are kept."""

    def __init__(
        self, model: DiffRecModel, data: JointData, valid: DataLoader, config: Config, accelerator: Accelerator
    ) -> None:
        self.model, self.data, self.valid, self.config, self.accelerator = model, data, valid, config, accelerator
        self.name = f"diffrec ({config.model.rec.mode})"
        self.last_valid: dict | None = None

    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> DataLoader:
        """The rating prompts' seeded epoch order, sharded over processes, on the LLM's device."""
        run = self.config.run
        return shuffled_batches(
            self.data.prompts["train"], run.batch_size, run.seed, epoch, accelerator, self.model.rec_device
        )

    def image_rows(self, position: int) -> list[int]:
        """The image pairs of micro-batch ``position``: passes over the pairs follow on by position, apart from
        the rating epochs."""
        count, size, seed = len(self.data.image_samples), self.config.model.joint.image_batch_size, self.config.run.seed
        per_pass = len(pass_batches(count, size, seed, 0, self.accelerator))  # every pass has as many (kept)
        image_pass, offset = divmod(position, per_pass)
        return pass_batches(count, size, seed, image_pass, self.accelerator)[offset]

    def loss(self, model: nn.Module, batch: PromptBatch, where: MicroBatch) -> dict[str, torch.Tensor]:
        """The weighted joint loss (by ``joint.schedule``: both parts, or ratings on even steps and images on odd)."""
        joint = self.config.model.joint
        train_rec = joint.schedule == "sum" or where.step % 2 == 0
        train_image = joint.schedule == "sum" or where.step % 2 == 1
        image_batch = None
        if train_image:
            rows = self.image_rows(where.position)
            image_batch = _image_batch(self.data, rows, self.config.model.image.flow, where.generator)
        loss, parts = model(batch if train_rec else None, image_batch, where.generator)
        return {"loss": loss, **{f"{name}_loss": value for name, value in parts.items()}}

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Valid AUC and UAUC of the recommender."""
        self.last_valid = evaluate_split(self.model.rec, self.valid, accelerator)
        return {"valid_auc": self.last_valid["auc"], "valid_uauc": self.last_valid["uauc"]}


@torch.no_grad()
def evaluate_diffrec(
    config: Config,
    model: nn.Module,
    data: JointData,
    loaders: dict,
    accelerator: Accelerator,
    run_dir: Path,
    dataset: RatingDataset,
    valid: dict | None = None,
) -> dict:
    """AUC/UAUC on valid (unless given), test, warm and cold; CLIP-T, CLIP-I (and the VLM judge) of images for liked test pairs."""
    unwrapped: DiffRecModel = accelerator.unwrap_model(model)
    unwrapped.eval()
    metrics = evaluate_all(unwrapped.rec, loaders, accelerator, progress=True, valid=valid)
    image_config, run = config.model.image, config.run
    pairs = data.test_pairs

    results = evaluate_arms(
        unwrapped.image,
        lambda rows: unwrapped.row_preference(rows, f"{dataset.root} (image rows)"),
        pairs,
        unwrapped.image.holdout,
        dataset,
        data.images,
        image_config,
        run.seed,
        run.eval_batch_size,
        run_dir / "images",
    )
    if accelerator.is_main_process and config.model.joint.replies:
        results["replies"] = write_replies(
            unwrapped.rec, unwrapped.tokenizer, config.model.rec, run.seed, pairs.head(config.model.joint.replies)
        )
    if accelerator.is_main_process and config.model.joint.reply_users:
        holdout = unwrapped.image.holdout
        results["reply_personalization"] = (
            reply_personalization(
                unwrapped.rec,
                unwrapped.tokenizer,
                config.model.rec,
                run.seed,
                holdout,
                dataset,
                config.model.joint.reply_users,
            )
            if holdout is not None
            else {
                "missing": "no held-out users (model.image.holdout.users 0, or a checkpoint without image/holdout.json)"
            }
        )
    metrics["images"] = results
    return metrics

"""Joint DiffRec training and evaluation (``diffrec train`` / ``diffrec evaluate`` on a ``model.arch: diffrec``
config, and ``train_collm_mf_din.py``): the LLM recommender and the personalized image generator in one
Accelerate run.

Each micro-batch pairs rating prompts (the recommender's Yes/No cross-entropy) with liked (user, item
image, caption) pairs (the flow-matching loss; the preference is the collaborative user embedding or
the LLM's answer-position hidden state, by ``joint.preference``). The loss is their weighted sum, or
with ``joint.schedule: alternate`` the recommender's on even steps and the images' on odd ones.

Checkpoints: every ``run.checkpoint_every_steps`` the Accelerate state (optimizer, scheduler, every
process's RNG) and the trained weights (``rec/``: peft adapter and CoRA modules; ``image/``: diffusers
LoRA and fusion) go to ``checkpoints/step-N``, written under a temporary name and renamed once
complete; the newest ``run.keep_checkpoints`` stay. ``run.resume_from: latest`` continues from the
newest complete one under ``run.output_dir``, mid-epoch, with the same data order and noise.

Processes: Accelerate shards the rating batches, the image pairs are sharded by rank, and evaluation
gathers predictions and per-image scores before any mean. ``run.devices`` instead keeps one process
and places the LLM on one device and the image models on another.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from minigpt4.config import Config, DiffRecConfig, FlowMatchingConfig, dump_config
from minigpt4.data.contract import RatingDataset, load_rating_dataset, subsample
from minigpt4.data.images import liked_rows, load_holdout, load_image_table
from minigpt4.diffusion.generate import evaluate_arms
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import PersonalizedSD3
from minigpt4.errors import DiffRecError, require_file
from minigpt4.evaluation.ctr import evaluate_all, evaluate_split
from minigpt4.io import json_safe, read_json
from minigpt4.llm.prompts import PromptTemplate
from minigpt4.llm.recommender import LLMRecommender, PromptBatch, PromptRows, build_llm_recommender, prompt_rows
from minigpt4.llm.reply import reply_personalization, write_replies
from minigpt4.recommenders import load_recommender
from minigpt4.training.diffusion import (
    ImageSamples,
    build_samples,
    image_holdout,
    load_training_weights,
    micro_batch_rows,
    training_pairs,
)
from minigpt4.training.llm import epoch_loader, eval_loader, split_prompt_rows
from minigpt4.training.run_folder import (
    TRAINER_STATE,
    choose_hardware,
    logger,
    open_run_folder,
    resume_folder,
    run_accelerator,
    write_metrics,
)

CHECKPOINT_PREFIX = "step-"


@dataclass
class ImageBatch:
    """One micro-batch of image pairs: cached latent distributions and caption embeddings, and the preference input."""

    latent_parameters: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    preference: torch.Tensor | None  # collaborative preference vectors, or None when the LLM gives them
    prompts: PromptBatch | None  # the pairs' prompts, when the LLM gives the preference


class DiffRecModel(nn.Module):
    """The LLM recommender and the personalized SD3 generator, with the joint loss."""

    def __init__(
        self,
        config: DiffRecConfig,
        rec: LLMRecommender,
        image: PersonalizedSD3,
        tokenizer: PreTrainedTokenizerBase,
        template: PromptTemplate,
    ) -> None:
        super().__init__()
        self.config = config
        self.rec = rec
        self.image = image
        self.tokenizer = tokenizer  # the LLM's, for prompts and replies
        self.template = template

    @property
    def rec_device(self) -> torch.device:
        """Where the LLM lives."""
        return self.rec.llm.device

    @property
    def image_device(self) -> torch.device:
        """Where the SD3 transformer lives."""
        return self.image.transformer.device

    def rating_prompts(self, rows: pd.DataFrame, where: str) -> PromptRows:
        """The recommender's prompts for rating rows (for the image side's LLM preference)."""
        history = self.rec.collab.max_history if self.rec.collab is not None else 0
        return prompt_rows(rows, self.config.rec, self.template, self.tokenizer, history, where)

    def preference(self, prompts: PromptBatch | None, collab_preference: torch.Tensor | None) -> torch.Tensor:
        """The image side's user vectors: the LLM's answer-position hidden states, or the collaborative ones."""
        if self.config.joint.preference == "llm":
            _, hidden = self.rec.score_and_hidden(prompts.to(self.rec_device))
            return hidden.float().to(self.image_device)
        return collab_preference.to(self.image_device)

    def image_loss(self, batch: ImageBatch, generator: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of one image micro-batch."""
        device = self.image_device
        latents = self.image.latents(batch.latent_parameters, generator).to(device)
        preference = self.preference(batch.prompts, batch.preference)
        return self.image(latents, batch.prompt_embeds.to(device), batch.pooled.to(device), preference, generator)

    def forward(
        self, rec_batch: PromptBatch | None, image_batch: ImageBatch | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted joint loss and its parts (a part is absent when its batch is None)."""
        joint = self.config.joint
        parts: dict[str, torch.Tensor] = {}
        if rec_batch is not None:
            parts["rec"] = self.rec(rec_batch.to(self.rec_device))
        if image_batch is not None:
            parts["image"] = self.image_loss(image_batch, generator).to(self.rec_device)
        weights = {"rec": joint.rec_weight, "image": joint.image_weight}
        return sum(weights[name] * loss for name, loss in parts.items()), parts

    def save_weights(self, folder: Path) -> None:
        """``rec/`` (adapter, collaborative modules and the rec config) and ``image/`` (diffusers LoRA, fusion)."""
        (folder / "rec").mkdir(parents=True, exist_ok=True)
        (folder / "image").mkdir(parents=True, exist_ok=True)
        self.rec.save_weights(folder / "rec")
        (folder / "rec" / "config.yaml").write_text(
            yaml.safe_dump({"model": self.config.rec.model_dump(mode="json")}, sort_keys=False)
        )
        self.image.save_weights(folder / "image")

    def load_weights(self, folder: Path) -> None:
        """Load what ``save_weights`` wrote; a missing file or a mismatch is an error naming it."""
        self.rec.load_weights(folder / "rec")
        load_training_weights(self.image, folder / "image")


def build_diffrec(
    config: DiffRecConfig, dataset: RatingDataset, devices: tuple[torch.device, torch.device]
) -> DiffRecModel:
    """The recommender on the first device and the image generator (fresh LoRA and fusion) on the second."""
    rec_device, image_device = devices
    rec, tokenizer, template = build_llm_recommender(config.rec, dataset, rec_device)
    preference_dim = None
    if config.joint.preference == "llm":
        collab, preference_dim = None, rec.hidden_size()
    elif config.image.collab is not None:
        collab = load_recommender(config.image.collab.ckpt, None, dataset.n_users, dataset.n_items).to(image_device)
    else:
        collab = rec.collab  # the recommender's frozen collaborative model gives the preference too
    image = PersonalizedSD3(
        config.image, load_sd3_pipeline(config.image.pipeline, image_device), collab, preference_dim=preference_dim
    )
    return DiffRecModel(config, rec, image, tokenizer, template)


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
            if samples.preference is None:
                raise DiffRecError(
                    "model.image.fusion.standardize needs fixed preference vectors: set model.joint.preference to collab"
                )
            model.image.fusion.standardize_with(samples.preference.to(model.image_device))
        image_prompts = (
            model.rating_prompts(pairs, f"{dataset.root}/train (image pairs)")
            if config.model.joint.preference == "llm"
            else None
        )
    test_pairs = subsample(liked_rows(dataset, "test", images), config.model.joint.eval_images, config.run.seed)
    if test_pairs.empty:
        raise DiffRecError(f"{dataset.root}: no liked test pair has an item image; nothing to generate for")
    return JointData(prompts, samples, image_prompts, test_pairs, images)


def _devices(config: Config, state: PartialState) -> tuple[torch.device, torch.device]:
    """The LLM's and the image models' devices: ``run.devices`` in one process, else the process's device twice."""
    placement = config.run.devices
    if placement is None:
        return state.device, state.device
    if state.num_processes > 1:
        raise DiffRecError(
            "run.devices places the two halves inside one process; with several processes leave it out (each process takes its own device)"
        )
    if config.run.cpu and {placement.llm, placement.image} != {"cpu"}:
        raise DiffRecError(f"run.cpu is true but run.devices names {placement.llm} and {placement.image}")
    return torch.device(placement.llm), torch.device(placement.image)


def train_diffrec(config: Config) -> dict:
    """Train (or, with ``run.evaluate``, only evaluate) the joint model; returns the metrics."""
    run = config.run
    state = PartialState(cpu=run.cpu)
    dataset = load_rating_dataset(config.datasets.path)
    run.resume_from = resume_folder(run.resume_from, run.output_dir, f"{CHECKPOINT_PREFIX}*")
    if config.model.joint.preference == "llm" and config.model.rec.llm.gradient_checkpointing:
        # Both LLM passes of a step (ratings and image pairs) would share the CoRA weights that
        # checkpointing re-reads in backward, so the first pass would be recomputed with the second's.
        raise DiffRecError(
            "joint.preference llm runs the LLM twice per step; turn model.rec.llm.gradient_checkpointing off"
        )
    if config.model.image.clip is None:
        raise DiffRecError(
            "a diffrec run ends by scoring its images and needs a CLIP scorer: set model.image.clip.path"
        )
    devices = _devices(config, state)
    hardware = choose_hardware(config, *devices)
    # Everything that can fail on a bad path, image or checkpoint fails before the run folder exists.
    set_seed(run.seed)
    model = build_diffrec(config.model, dataset, devices)
    if run.evaluate:
        if run.ckpt is None:
            raise DiffRecError("run.evaluate is true but run.ckpt is not set (a checkpoint folder of diffrec train)")
        model.load_weights(run.ckpt)
    elif run.resume_from is not None:
        require_file(run.resume_from / TRAINER_STATE)
    data = joint_data(config, model, dataset, progress=state.is_local_main_process)
    run_dir = open_run_folder(config, state, hardware)
    unused = DistributedDataParallelKwargs(find_unused_parameters=config.model.joint.schedule == "alternate")
    accelerator = run_accelerator(
        cpu=run.cpu,
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(run_dir),
        device_placement=run.devices is None,
        kwargs_handlers=[unused],
    )
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
        model = accelerator.prepare(model)
        metrics = {"checkpoint": str(run.ckpt)}
    else:
        model, metrics = _train(config, model, data, loaders, accelerator, run_dir, devices)
    metrics.update(
        evaluate_diffrec(config, model, data, loaders, accelerator, run_dir, dataset, metrics.pop("valid", None))
    )
    metrics = json_safe(
        {
            "run_dir": str(run_dir),
            "model": f"diffrec/{config.model.rec.mode}",
            "dataset": config.datasets.name,
            **metrics,
            "hardware": hardware,
        }
    )
    if accelerator.is_main_process:
        write_metrics(run_dir, metrics)
    accelerator.end_training()
    return metrics


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


def _checkpoint_hooks(accelerator: Accelerator) -> None:
    """Accelerate saves and loads our trained weights in their own formats, never the frozen base models."""

    def save(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_weights(Path(output_dir))
        weights.clear()

    def load(models: list, input_dir: str) -> None:
        accelerator.unwrap_model(models.pop()).load_weights(Path(input_dir))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def step_checkpoints(folder: Path) -> list[Path]:
    """The complete ``step-N`` checkpoints in a checkpoints folder, oldest first."""
    steps = (path for path in folder.glob(f"{CHECKPOINT_PREFIX}*") if path.name[len(CHECKPOINT_PREFIX) :].isdigit())
    return sorted(steps, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def _last_good(folder: Path) -> str:
    """The newest complete checkpoint, for an error message."""
    found = step_checkpoints(folder)
    return str(found[-1]) if found else "(none yet)"


def save_joint_checkpoint(accelerator: Accelerator, folder: Path, config: Config, progress: dict) -> None:
    """The Accelerate state and our weights into ``folder``, visible only once complete; old ones pruned."""
    partial = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "config.yaml").write_text(dump_config(config))
        (partial / TRAINER_STATE).write_text(json.dumps(json_safe(progress), indent=2))
        partial.rename(folder)
        for old in step_checkpoints(folder.parent)[: -config.run.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _train(
    config: Config,
    model: DiffRecModel,
    data: JointData,
    loaders: dict,
    accelerator: Accelerator,
    run_dir: Path,
    devices: tuple,
) -> tuple[nn.Module, dict]:
    """The step loop: joint loss, periodic valid AUC and checkpoints; returns the prepared model and the training metrics."""
    run, joint = config.run, config.model.joint
    micro_batches = math.ceil(len(data.prompts["train"]) / (run.batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, micro_batches // run.gradient_accumulation_steps)
    total_steps = run.max_steps or run.max_epochs * steps_per_epoch
    checkpoint_every = run.checkpoint_every_steps or run.eval_every_steps
    params = [param for _, param in sorted(model.named_parameters()) if param.requires_grad]
    logger.info(
        "%d trainable tensors, %d parameters; %d optimizer steps (%d per epoch)",
        len(params),
        sum(p.numel() for p in params),
        total_steps,
        steps_per_epoch,
    )
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)
    # Not prepared: a prepared scheduler steps once per process, which would tie the schedule to the process count.
    scheduler = get_cosine_schedule_with_warmup(optimizer, run.warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    _checkpoint_hooks(accelerator)
    unwrapped: DiffRecModel = accelerator.unwrap_model(model)
    checkpoints = run_dir / "checkpoints"
    # ``sums`` holds the loss sums since the last curve point, so a resumed run's curve matches too.
    progress = {"step": 0, "micro": 0, "epoch": 0, "batch": 0, "sums": {}, "curve": []}
    if run.resume_from is not None:
        accelerator.load_state(str(run.resume_from))
        progress = read_json(run.resume_from / TRAINER_STATE, dict)
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            run.resume_from,
            progress["step"],
            progress["epoch"],
            progress["batch"],
        )
    accelerator.init_trackers(
        "tensorboard", config={"mode": config.model.rec.mode, "preference": joint.preference, "lr": run.lr}
    )
    start, stop, valid = time.perf_counter(), False, None
    sums = progress["sums"]
    bar = tqdm(
        total=total_steps,
        initial=progress["step"],
        desc=f"train diffrec ({config.model.rec.mode})",
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    while progress["step"] < total_steps and not stop:
        loader = epoch_loader(data.prompts["train"], config, progress["epoch"], accelerator, devices[0])
        if progress["batch"]:
            loader = accelerator.skip_first_batches(loader, progress["batch"])
        for rec_batch in loader:
            step, position = progress["step"], progress["micro"]
            train_rec = joint.schedule == "sum" or step % 2 == 0
            train_image = joint.schedule == "sum" or step % 2 == 1
            # Noise, timesteps and captions are seeded by (seed, micro-batch, process): a resumed run draws the same.
            generator = torch.Generator().manual_seed(
                run.seed * 100_003 + position * accelerator.num_processes + accelerator.process_index
            )
            image_batch = None
            if train_image:
                rows = micro_batch_rows(
                    len(data.image_samples),
                    joint.image_batch_size,
                    position,
                    run.seed,
                    accelerator.process_index,
                    accelerator.num_processes,
                )
                image_batch = _image_batch(data, rows, config.model.image.flow, generator)
            with accelerator.accumulate(model):
                loss, parts = model(rec_batch if train_rec else None, image_batch, generator)
                if not torch.isfinite(loss):
                    raise DiffRecError(
                        f"loss became {loss.item()} at step {step} ({', '.join(f'{k} {v.item():.4g}' for k, v in parts.items())}); training stopped, the last good checkpoint is {_last_good(checkpoints)}"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(params, run.max_grad_norm)
                    if not torch.isfinite(norm):
                        raise DiffRecError(
                            f"gradient norm became {norm.item()} at step {step}; training stopped, the last good checkpoint is {_last_good(checkpoints)}"
                        )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress["batch"] += 1
            progress["micro"] += 1
            for name, value in parts.items():
                total, count = sums.get(name, (0.0, 0))
                sums[name] = [total + value.item(), count + 1]
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            progress["step"] += 1
            bar.update()
            step = progress["step"]
            if step % run.eval_every_steps == 0 or step == total_steps:
                point = {
                    "step": step,
                    "seconds": round(time.perf_counter() - start, 3),
                    **{f"{name}_loss": total / count for name, (total, count) in sums.items()},
                }
                valid = evaluate_split(unwrapped.rec, loaders["valid"], accelerator)
                model.train()
                point.update(valid_auc=valid["auc"], valid_uauc=valid["uauc"])
                progress["curve"].append(point)
                accelerator.log(
                    {f"train/{key}": value for key, value in point.items() if key.endswith("_loss")}
                    | {"valid/auc": valid["auc"]},
                    step=step,
                )
                logger.info(
                    "step %d: %s",
                    step,
                    json.dumps(json_safe({k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()})),
                )
                bar.set_postfix(
                    {key: f"{value:.4f}" for key, value in point.items() if key.endswith(("_loss", "_auc"))}
                )
                sums.clear()
            if step % checkpoint_every == 0 or step == total_steps:
                save_joint_checkpoint(accelerator, checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}", config, progress)
            if step >= total_steps:
                stop = True
                break
        else:
            progress["epoch"], progress["batch"] = progress["epoch"] + 1, 0
    bar.close()
    seconds = time.perf_counter() - start
    # The last step is always evaluated, so its valid metrics are the final weights' (``valid`` below).
    return model, {
        "steps_run": progress["step"],
        "train_seconds": round(seconds, 3),
        "checkpoint": str(step_checkpoints(checkpoints)[-1]),
        "curve": progress["curve"],
        "valid": valid,
    }


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

    def preference(rows: pd.DataFrame) -> torch.Tensor:
        prompts = None
        if config.model.joint.preference == "llm":
            prompts = unwrapped.rating_prompts(
                rows.reset_index(drop=True), f"{dataset.root} (image rows)"
            ).__getitems__(list(range(len(rows))))
        collab = unwrapped.image.preference(rows) if unwrapped.image.collab is not None else None
        return unwrapped.preference(prompts, collab)

    results = evaluate_arms(
        unwrapped.image,
        preference,
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

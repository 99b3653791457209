"""LLM recommender training and evaluation under Accelerate (``diffrec train`` / ``diffrec evaluate`` on a
``model.arch: llmrec`` config): a task of the training engine (``minigpt4.training.engine``), evaluated on
valid AUC every ``run.eval_every_steps`` with early stopping; ``checkpoints/best`` holds the LoRA adapter,
the collaborative modules and ``config.yaml`` of the best evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from minigpt4.config import Config, dump_config
from minigpt4.data.contract import RatingDataset, load_rating_dataset, subsample
from minigpt4.data.tensors import whole_batch
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.ctr import evaluate_all, evaluate_split
from minigpt4.io import log_text
from minigpt4.llm.prompts import PromptTemplate
from minigpt4.llm.recommender import LLMRecommender, PromptBatch, PromptRows, build_llm_recommender, prompt_rows
from minigpt4.training.engine import Engine, MicroBatch, Task, shuffled_batches, step_loop
from minigpt4.training.run_folder import BEST, begin_run, logger


def split_prompt_rows(
    config: Config,
    dataset: RatingDataset,
    model: LLMRecommender,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
) -> dict[str, PromptRows]:
    """Tokenized prompts of train, valid and test (subsampled as ``run.*_rows`` say)."""
    run, history = config.run, model.collab.max_history if model.collab is not None else 0
    rec_config = model.config  # the llmrec section, on its own or inside a joint model
    limits = {"train": run.train_rows, "valid": run.valid_rows, "test": run.test_rows}
    return {
        name: prompt_rows(
            subsample(dataset.splits[name], limits[name], run.seed),
            rec_config,
            template,
            tokenizer,
            history,
            f"{dataset.root}/{name}",
        )
        for name in limits
    }


def train_llm(config: Config) -> dict:
    """Train (or, with ``run.evaluate``, only evaluate) an LLM recommender; returns the metrics."""
    run, started = config.run, begin_run(config)
    dataset = load_rating_dataset(config.datasets.path)
    # Everything that can fail on a bad path or checkpoint fails before the run folder exists.
    model, tokenizer, template = build_llm_recommender(config.model, dataset, started.state.device)
    if run.evaluate:
        if run.ckpt is None:
            raise DiffRecError("run.evaluate is true but run.ckpt is not set (a checkpoint folder of diffrec train)")
        model.load_weights(run.ckpt)
    rows = split_prompt_rows(config, dataset, model, tokenizer, template)
    accelerator, run_dir = started.open(mixed_precision=run.mixed_precision), started.folder
    logger.info(
        "run folder %s; %s with %s on %d process(es), %s; rows train/valid/test %d/%d/%d",
        run_dir,
        config.model.mode,
        type(model.llm).__name__,
        accelerator.num_processes,
        accelerator.device,
        len(rows["train"]),
        len(rows["valid"]),
        len(rows["test"]),
    )
    eval_loaders = {name: eval_loader(rows[name], run.eval_batch_size) for name in ("valid", "test")}
    prepared = accelerator.prepare(*eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, prepared))
    if run.evaluate:
        model = accelerator.prepare(model)
        metrics = {"checkpoint": str(run.ckpt), **evaluate_all(model, eval_loaders, accelerator, progress=True)}
    else:
        task = LLMTask(model, rows["train"], eval_loaders["valid"], config)
        fit = Engine(task, step_loop(run), accelerator, config, run_dir).fit(started.resume_from)
        best_dir = run_dir / "checkpoints" / BEST
        if not best_dir.is_dir():
            raise DiffRecError(
                "no evaluation produced a valid AUC (does the valid split hold both labels?); nothing to report"
            )
        model.load_weights(best_dir)
        # The best checkpoint's valid figures are those of its evaluation: only the test split is scored again.
        valid = task.record.get("best_valid")
        metrics = evaluate_all(fit.model, eval_loaders, accelerator, progress=True, valid=valid)
        metrics.update(
            best_step=fit.best_step,
            steps_run=fit.steps,
            train_seconds=fit.train_seconds,
            evaluation_seconds=fit.evaluation_seconds,
            train_samples_per_second=fit.samples_per_second,
            checkpoint=str(best_dir),
            curve=fit.curve,
        )
        logger.info("best step %d: %s", fit.best_step, log_text({k: metrics[k] for k in ("valid", "test")}))
    return started.finish(f"llmrec/{config.model.mode}", metrics)


class LLMTask(Task):
    """The LLM recommender's Yes/No cross-entropy on rating prompts; valid AUC picks the best checkpoint."""

    select = "valid_auc"

    def __init__(self, model: LLMRecommender, rows: PromptRows, valid: DataLoader, config: Config) -> None:
        self.name, self.model, self.rows, self.valid, self.config = config.model.mode, model, rows, valid, config
        self.latest: dict | None = None  # the last evaluation's valid figures
        self.record: dict = {}  # best_valid: the best evaluation's, so the end need not score valid again

    def epoch_batches(self, epoch: int, accelerator: Accelerator) -> DataLoader:
        """The epoch's seeded order, sharded over processes."""
        return shuffled_batches(self.rows, self.config.run.batch_size, self.config.run.seed, epoch, accelerator)

    def loss(self, model: nn.Module, batch: PromptBatch, where: MicroBatch) -> dict[str, torch.Tensor]:
        """Cross-entropy of the answer token."""
        return {"loss": model(batch)}

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Valid AUC and UAUC."""
        self.latest = evaluate_split(model, self.valid, accelerator, "valid")
        return {"valid_auc": self.latest["auc"], "valid_uauc": self.latest["uauc"]}

    def improved(self, figures: dict[str, float], best: dict[str, float] | None) -> bool:
        """A better valid AUC; its valid figures are kept."""
        if not super().improved(figures, best):
            return False
        self.record["best_valid"] = self.latest
        return True

    def state_dict(self) -> dict:
        """The best evaluation's valid figures."""
        return self.record

    def load_state_dict(self, state: dict) -> None:
        """Restore them."""
        self.record = state

    def save_weights(self, folder: Path) -> None:
        """The adapter, collaborative modules and the config they were built from."""
        self.model.save_weights(folder)
        (folder / "config.yaml").write_text(dump_config(self.config))


def eval_loader(rows: PromptRows, batch_size: int) -> DataLoader:
    """Batches of similar prompt lengths (less padding); predictions are put back in row order afterwards."""
    by_length = sorted(range(len(rows)), key=lambda row: len(rows.input_ids[row]))
    return DataLoader(rows, batch_size=batch_size, sampler=by_length, collate_fn=whole_batch)

"""The ``datasets`` and ``run`` sections, and which run keys each trainer reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from minigpt4.config.base import Section


class DatasetConfig(Section):
    """A processed dataset folder (see ``dataset/README.md`` for the contract)."""

    name: str
    path: Path
    # ratings: the CTR splits; implicit: the full-ranking shape (implicit/ in the folder), models trained with BPR;
    # sequence: per-user sequences with leave-one-out targets (sequences/ in the folder), next-item cross-entropy.
    shape: Literal["ratings", "implicit", "sequence"] = "ratings"
    modalities: list[str] | None = None  # implicit: the feature files to read (None: every one the dataset has)


class DevicePlacement(Section):
    """Where each half of a joint model lives in a single process (the paper's two-GPU setup)."""

    llm: str = "cuda:0"
    image: str = "cuda:1"


class RunConfig(Section):
    """Training and evaluation settings."""

    seed: int = 2023
    cpu: bool = False
    batch_size: int = Field(1024, gt=0)
    eval_batch_size: int = Field(2048, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_epochs: int = Field(200, gt=0)
    patience: int = Field(20, gt=0)
    eval_every: int = Field(1, gt=0)
    output_dir: Path = Path("../runs/default")
    evaluate: bool = False
    ckpt: Path | None = None
    # Step-based LLM training (``diffrec train``); the collaborative pre-training ignores these.
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; None: max_epochs over the training rows
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_steps: int = Field(0, ge=0)
    eval_every_steps: int = Field(100, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: bf16 where it is native on the device, else no. Also leave-one-out and full-ranking training (bf16 only);
    # rating-shape pre-training is fp32 (auto means no there).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    train_rows: int | None = Field(None, gt=0)  # a seeded random subsample of each split, for budgets
    valid_rows: int | None = Field(None, gt=0)
    test_rows: int | None = Field(None, gt=0)
    resume_from: Path | None = (
        None  # a checkpoint folder of an earlier run (``.../checkpoints/last`` for pretrain on sequences); ``latest``: the newest one under output_dir
    )
    checkpoint_every_steps: int | None = Field(
        None, gt=0
    )  # checkpoints/last every N steps; None: every eval_every_steps
    devices: DevicePlacement | None = None  # one process: the LLM on one device, the image models on another
    # Implicit full-ranking runs (``datasets.shape: implicit``).
    l2_reg: float = Field(
        1e-4, ge=0
    )  # BPR's L2 (MF/LightGCN: the batch's own rows; DiffMM/MDMNS/GenRec: the whole id tables)
    ranking_ks: list[int] = Field(default_factory=lambda: [10, 20, 50])
    select_metric: str = "recall@20"  # sequence runs: hr|ndcg@K
    paper_parity: bool = (
        False  # implicit: select the epoch by test select_metric, validation ignored; sequence: DiffuRec's evaluation
    )
    # Leave-one-out runs (``datasets.shape: sequence``).
    mask_history: bool = True  # rank only items outside the user's history
    lr_step_epochs: int | None = Field(None, gt=0)  # StepLR: multiply the learning rate by lr_step_gamma every N epochs
    lr_step_gamma: float = Field(0.1, gt=0, le=1)
    group_by_length: bool = False  # batch training prefixes of similar length (padding-invariant models only)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads a bare ``no`` (``mixed_precision: no``, ``--options run.mixed_precision=no``) as false."""
        return "no" if value is False else value


_COMMON = {"seed", "cpu", "output_dir", "evaluate", "ckpt", "batch_size", "eval_batch_size", "resume_from"}
_EPOCHS = _COMMON | {"lr", "weight_decay", "max_epochs", "patience", "eval_every", "mixed_precision"}
_RANKING = _EPOCHS | {"ranking_ks", "select_metric", "paper_parity"}
_STEPS = _COMMON | {
    "lr", "weight_decay", "max_epochs", "max_steps", "gradient_accumulation_steps", "warmup_steps", "eval_every_steps",
    "checkpoint_every_steps", "max_grad_norm", "mixed_precision", "train_rows", "test_rows",
}  # fmt: skip
# The run keys each trainer reads; any other key set to a value of its own is an error naming it.
RUN_KEYS: dict[str, set[str]] = {
    "ratings": _EPOCHS,
    "implicit": _RANKING | {"l2_reg"},
    "sequence": _RANKING | {"mask_history", "lr_step_epochs", "lr_step_gamma", "group_by_length"},
    "llmrec": _STEPS | {"patience", "valid_rows"},
    "sd3": _STEPS,
    "diffrec": _STEPS | {"valid_rows", "devices"},
}
TRAINERS = {
    "ratings": "rating-shape pre-training",
    "implicit": "full-ranking training (datasets.shape implicit)",
    "sequence": "leave-one-out training (datasets.shape sequence)",
    "llmrec": "LLM recommender training",
    "sd3": "image training",
    "diffrec": "joint training",
}


def trainer_of(arch: str, shape: str) -> str:
    """The trainer a model arch and data shape select (a key of ``RUN_KEYS``)."""
    return arch if arch in ("llmrec", "sd3", "diffrec") else shape


def ignored_run_keys(run: RunConfig, trainer: str) -> list[str]:
    """The run keys set away from their defaults that ``trainer`` does not read."""
    defaults = RunConfig()
    return [
        key
        for key in RunConfig.model_fields
        if key not in RUN_KEYS[trainer] and getattr(run, key) != getattr(defaults, key)
    ]

"""YAML run configuration (``model``, ``datasets``, ``run`` sections) validated by pydantic.

Unknown keys are errors naming the closest valid key, ``--options a.b=value`` overrides any key,
and relative paths resolve against ``DIFFREC_DATA_ROOT`` (datasets) or the config file's folder.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minigpt4.errors import DiffRecError

DATA_ROOT_ENV = "DIFFREC_DATA_ROOT"


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MFConfig(Section):
    """Matrix factorisation: the dot product of user and item embeddings."""

    arch: Literal["mf"] = "mf"
    embedding_size: int = Field(256, gt=0)
    init_std: float = Field(0.1, gt=0)


class LightGCNConfig(Section):
    """LightGCN: embeddings smoothed over the user-item graph of training positives (or all interactions)."""

    arch: Literal["lightgcn"] = "lightgcn"
    embedding_size: int = Field(256, gt=0)
    n_layers: int = Field(2, ge=0)
    graph: Literal["positives", "interactions"] = "positives"  # which training rows become edges
    init_std: float = Field(0.1, gt=0)


class SASRecConfig(Section):
    """SASRec: self-attention over the user's recent positive items, matched to the target item."""

    arch: Literal["sasrec"] = "sasrec"
    embedding_size: int = Field(64, gt=0)
    max_history: int = Field(20, gt=0)
    num_blocks: int = Field(2, gt=0)
    num_heads: int = Field(1, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    init_std: float = Field(0.1, gt=0)


class DINConfig(Section):
    """DIN: target-aware attention pooling of the history, then an MLP."""

    arch: Literal["din"] = "din"
    embedding_size: int = Field(64, gt=0)
    max_history: int = Field(20, gt=0)
    attention_hidden: list[int] = Field(default_factory=lambda: [80, 40])
    mlp_hidden: list[int] = Field(default_factory=lambda: [200, 80])
    use_user_embedding: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.1, gt=0)


MODEL_CONFIGS: dict[str, type[Section]] = {
    "mf": MFConfig,
    "lightgcn": LightGCNConfig,
    "sasrec": SASRecConfig,
    "din": DINConfig,
}
ModelConfig = Annotated[Union[MFConfig, LightGCNConfig, SASRecConfig, DINConfig], Field(discriminator="arch")]


class DatasetConfig(Section):
    """A processed dataset folder (see ``dataset/README.md`` for the contract)."""

    name: str
    path: Path


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


class Config(Section):
    """A whole run: what to train, on which data, and how."""

    model: ModelConfig
    datasets: DatasetConfig
    run: RunConfig = Field(default_factory=RunConfig)


def _check_keys(section: type[BaseModel], data: Any, where: str) -> None:
    """Reject unknown keys recursively, naming the closest valid key."""
    if not isinstance(data, dict):
        return
    fields = section.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"did you mean '{where}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise DiffRecError(f"unknown key '{where}{key}'; {hint}")
        child = _section_class(section, key, value)
        if child is not None:
            _check_keys(child, value, f"{where}{key}.")


def _section_class(section: type[BaseModel], key: str, value: Any) -> type[BaseModel] | None:
    """The config class of a nested section, resolving the model by its ``arch`` key."""
    if section is Config and key == "model":
        arch = value.get("arch") if isinstance(value, dict) else None
        if arch not in MODEL_CONFIGS:
            close = difflib.get_close_matches(str(arch), list(MODEL_CONFIGS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DiffRecError(f"model.arch must be one of {', '.join(MODEL_CONFIGS)}, got {arch!r}{hint}")
        return MODEL_CONFIGS[arch]
    annotation = section.model_fields[key].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def apply_options(data: dict, options: list[str]) -> dict:
    """Override keys from ``a.b=value`` strings; values are parsed as YAML scalars or lists."""
    for option in options:
        key, sep, raw = option.partition("=")
        if not sep or not key:
            raise DiffRecError(f"--options expects key=value, got {option!r}")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DiffRecError(f"--options {key}: '{part}' is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw else None
    return data


def _resolve(path: Path | None, base: Path) -> Path | None:
    """Make a relative path absolute against ``base``."""
    if path is None or path.is_absolute():
        return path
    return (base / path).resolve()


def load_config(path: str | Path, options: list[str] | None = None) -> Config:
    """Read, override, validate and resolve a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise DiffRecError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DiffRecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise DiffRecError(f"{path}: expected a mapping with model, datasets and run sections")
    apply_options(data, options or [])
    try:
        _check_keys(Config, data, "")
        config = Config.model_validate(data)
    except DiffRecError as err:
        raise DiffRecError(f"{path}: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        # Drop the union tag pydantic inserts after 'model' (model.mf.x -> model.x).
        loc = [part for index, part in enumerate(first["loc"]) if not (index == 1 and first["loc"][0] == "model")]
        where = ".".join(str(part) for part in loc)
        raise DiffRecError(f"{path}: key '{where}': {first['msg']} (got {first.get('input')!r})") from None
    config_dir = path.resolve().parent
    data_root = os.environ.get(DATA_ROOT_ENV)
    config.datasets.path = _resolve(config.datasets.path, Path(data_root) if data_root else config_dir)
    config.run.output_dir = _resolve(config.run.output_dir, config_dir)
    config.run.ckpt = _resolve(config.run.ckpt, config_dir)
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML text, for the run folder."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

"""YAML run configuration (``model``, ``datasets``, ``run`` sections) validated by pydantic.

Unknown keys are errors naming the closest valid key, a ``run`` key the chosen trainer does not read is an
error naming it, ``--options a.b=value`` overrides any key, and relative paths resolve against
``DIFFREC_DATA_ROOT`` (datasets) or the config file's folder. The sections live beside this module: ``collab``
(collaborative models), ``llm`` (the LLM recommender), ``images`` (the image generator and the joint
model) and ``run`` (datasets, run settings and the keys each trainer reads).
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from minigpt4.config.base import Section
from minigpt4.config.collab import (
    DATA_SHAPES,
    CollaborativeConfig,
    DiffMMConfig,
    DiffuRecConfig,
    DINConfig,
    GenRecConfig,
    GraphDiffusionConfig,
    LightGCNConfig,
    MDMNSConfig,
    MFConfig,
    PopularityConfig,
    SASRecConfig,
)
from minigpt4.config.images import (
    SD3_ATTENTION,
    ClipConfig,
    DiffRecConfig,
    DiffusionLoRAConfig,
    FlowMatchingConfig,
    FusionConfig,
    HoldoutConfig,
    JointConfig,
    PipelineConfig,
    SamplingConfig,
    SD3Config,
    VLMJudgeConfig,
)
from minigpt4.config.llm import (
    ATTENTION_PROJECTIONS,
    CollabConfig,
    CoLLMConfig,
    CoRAConfig,
    LLMConfig,
    LLMRecConfig,
    LoRAConfig,
    PromptConfig,
    ReplyConfig,
)
from minigpt4.config.run import TRAINERS, DatasetConfig, DevicePlacement, RunConfig, ignored_run_keys, trainer_of
from minigpt4.errors import DiffRecError
from minigpt4.hardware import resolve_dtype_name, resolve_mixed_precision
from minigpt4.io import read_yaml

DATA_ROOT_ENV = "DIFFREC_DATA_ROOT"

__all__ = [
    "ATTENTION_PROJECTIONS",
    "ClipConfig",
    "CoLLMConfig",
    "CoRAConfig",
    "CollabConfig",
    "CollaborativeConfig",
    "Config",
    "DATA_ROOT_ENV",
    "DATA_SHAPES",
    "DINConfig",
    "DatasetConfig",
    "DevicePlacement",
    "DiffMMConfig",
    "DiffRecConfig",
    "DiffuRecConfig",
    "DiffusionLoRAConfig",
    "FlowMatchingConfig",
    "FusionConfig",
    "GenRecConfig",
    "GraphDiffusionConfig",
    "HoldoutConfig",
    "JointConfig",
    "LLMConfig",
    "LLMRecConfig",
    "LightGCNConfig",
    "LoRAConfig",
    "MDMNSConfig",
    "MFConfig",
    "MODEL_CONFIGS",
    "ModelConfig",
    "PipelineConfig",
    "PopularityConfig",
    "PromptConfig",
    "ReplyConfig",
    "RunConfig",
    "SASRecConfig",
    "SD3Config",
    "SD3_ATTENTION",
    "SamplingConfig",
    "VLMJudgeConfig",
    "apply_options",
    "dump_config",
    "load_config",
    "register_model_config",
    "resolve_precision",
]

MODEL_CONFIGS: dict[str, type[Section]] = {
    "mf": MFConfig,
    "lightgcn": LightGCNConfig,
    "sasrec": SASRecConfig,
    "din": DINConfig,
    "mostpop": PopularityConfig,
    "diffmm": DiffMMConfig,
    "mdmns": MDMNSConfig,
    "genrec": GenRecConfig,
    "diffurec": DiffuRecConfig,
    "llmrec": LLMRecConfig,
    "sd3": SD3Config,
    "diffrec": DiffRecConfig,
}

ModelConfig = Annotated[CollaborativeConfig | LLMRecConfig | SD3Config | DiffRecConfig, Field(discriminator="arch")]


def register_model_config(section: type[Section], shapes: set[str]) -> str:
    """Make a new collaborative model's config section valid as ``model`` of a run config, trained on the data
    ``shapes`` (ratings, implicit, sequence); returns its arch. ``minigpt4.recommenders.register_recommender``
    calls this: register a model there."""
    arch_field = section.model_fields.get("arch")
    arch = arch_field.default if arch_field is not None else None
    if not isinstance(arch, str) or typing.get_args(arch_field.annotation) != (arch,):
        raise DiffRecError(f"{section.__name__} needs a field arch: Literal['name'] = 'name'")
    shape_names = typing.get_args(DatasetConfig.model_fields["shape"].annotation)
    if not shapes or set(shapes) - set(shape_names):
        raise DiffRecError(
            f"{section.__name__}: data shapes must be some of {', '.join(shape_names)}, got {sorted(shapes)}"
        )
    if arch in MODEL_CONFIGS and MODEL_CONFIGS[arch] is not section:
        raise DiffRecError(f"model.arch {arch} is already registered to {MODEL_CONFIGS[arch].__name__}")
    MODEL_CONFIGS[arch] = section
    DATA_SHAPES[arch] = set(shapes)
    rebuild_model_union()
    return arch


def rebuild_model_union() -> None:
    """Make ``Config.model`` accept exactly the sections of ``MODEL_CONFIGS`` (after it changed)."""
    union = typing.Union[tuple(MODEL_CONFIGS.values())]  # noqa: UP007 (a union of a runtime tuple)
    Config.model_fields["model"].annotation = Annotated[union, Field(discriminator="arch")]
    Config.model_rebuild(force=True)


class Config(Section):
    """A whole run: what to train, on which data, and how."""

    model: ModelConfig
    datasets: DatasetConfig
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _standalone_image_model_needs_collab(self) -> Config:
        """An sd3 model on its own reads the preference from its collaborative checkpoint."""
        if isinstance(self.model, SD3Config) and self.model.collab is None:
            raise ValueError(
                "model.collab.ckpt is required: the collaborative checkpoint whose user embedding is the preference"
            )
        return self

    @model_validator(mode="after")
    def _data_shape_fits_model(self) -> Config:
        """Each collaborative arch trains on its own data shapes; the selection metric must be one the shape reports."""
        arch, shape = self.model.arch, self.datasets.shape
        if arch in DATA_SHAPES and shape not in DATA_SHAPES[arch]:
            raise ValueError(
                f"model.arch {arch} trains on datasets.shape {' or '.join(sorted(DATA_SHAPES[arch]))}, not {shape}"
            )
        if arch in DATA_SHAPES and shape == "ratings" and self.run.mixed_precision not in ("auto", "no"):
            raise ValueError(
                f"run.mixed_precision {self.run.mixed_precision}: {arch} on datasets.shape ratings trains in fp32 (leave-one-out, full-ranking, LLM and image training use it)"
            )
        if shape == "ratings":
            return self
        if self.run.mixed_precision == "fp16":
            raise ValueError(
                f"run.mixed_precision fp16 needs a loss scaler that {shape}-shape training does not have: use bf16 or no"
            )
        names = ("hr", "ndcg") if shape == "sequence" else ("recall", "ndcg", "precision")
        metric, _, k = self.run.select_metric.partition("@")
        if metric not in names or not k.isdigit() or int(k) not in self.run.ranking_ks:
            raise ValueError(
                f"run.select_metric {self.run.select_metric!r} must be {'|'.join(names)}@K with K in run.ranking_ks {self.run.ranking_ks}"
            )
        return self

    @model_validator(mode="after")
    def _run_keys_fit_trainer(self) -> Config:
        """A run key the chosen trainer does not read would silently do nothing: it is an error instead."""
        trainer = trainer_of(self.model.arch, self.datasets.shape)
        ignored = ignored_run_keys(self.run, trainer)
        if ignored:
            raise ValueError(
                f"run.{ignored[0]} is not read by {TRAINERS[trainer]} (model.arch {self.model.arch}); remove it"
            )
        return self


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
        if not isinstance(arch, str) or arch not in MODEL_CONFIGS:
            close = difflib.get_close_matches(str(arch), list(MODEL_CONFIGS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DiffRecError(f"model.arch must be one of {', '.join(MODEL_CONFIGS)}, got {arch!r}{hint}")
        return MODEL_CONFIGS[arch]
    annotation = section.model_fields[key].annotation
    # ``X | None`` sections are checked as X.
    candidates = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    sections = [arg for arg in candidates if isinstance(arg, type) and issubclass(arg, BaseModel)]
    return sections[0] if len(sections) == 1 else None


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
    data = read_yaml(path) or {}
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
        if not loc:  # a check across sections: its message names the keys
            raise DiffRecError(f"{path}: {first['msg'].removeprefix('Value error, ')}") from None
        where = ".".join(str(part) for part in loc)
        raise DiffRecError(f"{path}: key '{where}': {first['msg']} (got {first.get('input')!r})") from None
    config_dir = path.resolve().parent
    data_root = os.environ.get(DATA_ROOT_ENV)
    config.datasets.path = _resolve(config.datasets.path, Path(data_root) if data_root else config_dir)
    config.run.output_dir = _resolve(config.run.output_dir, config_dir)
    config.run.ckpt = _resolve(config.run.ckpt, config_dir)
    if config.run.resume_from is not None and config.run.resume_from.name != "latest":
        config.run.resume_from = _resolve(config.run.resume_from, config_dir)
    model = config.model
    for part in (model.rec, model.image) if isinstance(model, DiffRecConfig) else (model,):
        _resolve_model_paths(part, config_dir)
    return config


def _resolve_model_paths(model: Section, config_dir: Path) -> None:
    """Make an LLM or image model section's paths absolute against the config's folder."""
    collab = getattr(model, "collab", None)
    if collab is not None:
        collab.ckpt = _resolve(collab.ckpt, config_dir)
    if isinstance(model, LLMRecConfig):
        model.llm.path = _resolve(model.llm.path, config_dir)
        model.prompt.template = _resolve(model.prompt.template, config_dir)
        model.reply.template = _resolve(model.reply.template, config_dir)
        model.collm.stage1 = _resolve(model.collm.stage1, config_dir)
    if isinstance(model, SD3Config):
        model.pipeline.path = _resolve(model.pipeline.path, config_dir)
        for section in (model.clip, model.judge):
            if section is not None:
                section.path = _resolve(section.path, config_dir)


def resolve_precision(config: Config, llm_device: Any, image_device: Any = None) -> dict[str, dict[str, str]]:
    """Replace each ``auto`` dtype and ``run.mixed_precision`` by what the devices run fast (in place);
    returns ``{key: {"requested": ..., "resolved": ...}}`` for the log and metrics.json."""
    image_device = llm_device if image_device is None else image_device
    model, run = config.model, config.run
    sections: list[tuple[str, Any, Any]] = []
    if isinstance(model, DiffRecConfig):
        sections = [
            ("model.rec.llm", model.rec.llm, llm_device),
            ("model.image.pipeline", model.image.pipeline, image_device),
        ]
    elif isinstance(model, LLMRecConfig):
        sections = [("model.llm", model.llm, llm_device)]
    elif isinstance(model, SD3Config):
        sections = [("model.pipeline", model.pipeline, image_device)]
    chosen = {}
    for where, section, device in sections:
        chosen[f"{where}.dtype"] = {"requested": section.dtype, "resolved": resolve_dtype_name(section.dtype, device)}
        section.dtype = chosen[f"{where}.dtype"]["resolved"]
    requested = run.mixed_precision
    if model.arch in DATA_SHAPES and config.datasets.shape == "ratings":
        run.mixed_precision = "no"  # rating-shape pre-training is fp32 only
    else:
        run.mixed_precision = resolve_mixed_precision(requested, llm_device)
    chosen["run.mixed_precision"] = {"requested": requested, "resolved": run.mixed_precision}
    return chosen


def dump_config(config: BaseModel) -> str:
    """A resolved config (the run's, or a trainer's own settings) as YAML text, for the run folder."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

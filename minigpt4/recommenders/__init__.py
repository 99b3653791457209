"""Collaborative models behind one interface (``CollaborativeModel``), and their checkpoints.

A checkpoint is a folder with ``model.safetensors`` and ``config.json`` (the model section of the run
config plus the id counts); loading checks both against each other and fails on any mismatch.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from minigpt4.config import MODEL_CONFIGS, ModelConfig, register_model_config
from minigpt4.config.base import Section
from minigpt4.data.contract import catalogue_size
from minigpt4.errors import DiffRecError, first_line
from minigpt4.io import atomic_folder, read_json, read_safetensors
from minigpt4.recommenders.base import CollaborativeModel
from minigpt4.recommenders.diffmm import DiffMM
from minigpt4.recommenders.diffurec import DiffuRec
from minigpt4.recommenders.din import DIN
from minigpt4.recommenders.genrec import GenRec
from minigpt4.recommenders.lightgcn import LightGCN
from minigpt4.recommenders.mdmns import MDMNS
from minigpt4.recommenders.mf import MatrixFactorization
from minigpt4.recommenders.popularity import MostPopular
from minigpt4.recommenders.sasrec import SASRec

__all__ = [
    "CollaborativeModel",
    "build_recommender",
    "graph_edges",
    "load_plugins",
    "load_recommender",
    "register_recommender",
    "registration",
    "save_recommender",
]


def graph_edges(train: pd.DataFrame, positives_only: bool = True) -> torch.Tensor:
    """(user, item) edges of the training positives (or of every training interaction), [2, E]."""
    rows = train[train["label"] == 1] if positives_only else train
    pairs = rows[["uid", "iid"]].drop_duplicates()
    return torch.as_tensor(pairs.to_numpy().T.copy(), dtype=torch.long)


FEATURE_PREFIX = "feature_"  # item feature buffers in a checkpoint: feature_<modality>
INPUTS = ("edges", "features")  # what a model may need beyond its config and id counts


@dataclass(frozen=True)
class Registration:
    """How a collaborative model is built: its class, called as ``model(config, n_users, n_items, *inputs)``
    with the training ``edges`` ((uid, iid) pairs, 1-based, [2, E]) and/or the item ``features`` (modality ->
    [n_items, dim]) where ``inputs`` names them."""

    model: type[CollaborativeModel]
    inputs: tuple[str, ...] = ()


RECOMMENDERS: dict[str, Registration] = {
    "mf": Registration(MatrixFactorization),
    "lightgcn": Registration(LightGCN, ("edges",)),
    "sasrec": Registration(SASRec),
    "din": Registration(DIN),
    "mostpop": Registration(MostPopular, ("edges",)),
    "diffmm": Registration(DiffMM, ("edges", "features")),
    "mdmns": Registration(MDMNS, ("edges", "features")),
    "genrec": Registration(GenRec, ("edges", "features")),
    "diffurec": Registration(DiffuRec),
}


def register_recommender(
    config: type[Section], model: type[CollaborativeModel], shapes: set[str], inputs: tuple[str, ...] = ()
) -> str:
    """Add a collaborative model: its config section (with ``arch: Literal["name"]``), its class, the data shapes
    it trains on (ratings, implicit, sequence) and the extra inputs its constructor takes (edges, features).
    Returns the arch, now valid in configs, checkpoints and every trainer of those shapes."""
    if not issubclass(model, CollaborativeModel) or set(inputs) - set(INPUTS):
        raise DiffRecError(f"{model.__name__}: a CollaborativeModel whose inputs are some of {INPUTS}, got {inputs}")
    arch = register_model_config(config, shapes)
    RECOMMENDERS[arch] = Registration(model, tuple(inputs))
    return arch


def registration(arch: str) -> Registration:
    """The registration of a collaborative ``arch`` (an error naming the known ones otherwise)."""
    if arch not in RECOMMENDERS:
        raise DiffRecError(f"no recommender registered for model.arch {arch!r} (known: {', '.join(RECOMMENDERS)})")
    return RECOMMENDERS[arch]


def load_plugins() -> None:
    """Import the modules of the ``diffrec.recommenders`` entry points (installed packages that register models)."""
    for entry in importlib.metadata.entry_points(group="diffrec.recommenders"):
        try:
            entry.load()
        except Exception as err:  # a broken plugin is named, not a traceback from inside the CLI
            raise DiffRecError(
                f"entry point diffrec.recommenders:{entry.name} ({entry.value}): {first_line(err)}"
            ) from None


def build_recommender(
    config: ModelConfig,
    n_users: int,
    n_items: int,
    edges: torch.Tensor | None = None,
    features: dict[str, torch.Tensor] | None = None,
) -> CollaborativeModel:
    """A freshly initialised model of ``config.arch``, given the ``edges`` and ``features`` its registration
    names as inputs."""
    entry = registration(config.arch)
    if "edges" in entry.inputs and edges is None:
        raise DiffRecError(f"{config.arch} needs the training graph (edges)")
    given = {"edges": edges, "features": features or {}}
    return entry.model(config, n_users, n_items, *(given[name] for name in entry.inputs))


def save_recommender(model: CollaborativeModel, config: ModelConfig, folder: Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` atomically (a temp folder, then a rename)."""
    with atomic_folder(folder) as partial:
        write_recommender(model, config, partial, extra)
    return folder


def write_recommender(model: CollaborativeModel, config: ModelConfig, folder: Path, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` into an existing folder (the caller makes it atomic)."""
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    info = {
        "model": config.model_dump(mode="json"),
        "n_users": model.n_users,
        "n_items": model.n_items,
        **(extra or {}),
    }
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(info, indent=2))


def load_recommender(
    folder: Path, expected: ModelConfig | None = None, n_users: int | None = None, n_items: int | None = None
) -> CollaborativeModel:
    """Load a checkpoint folder; a missing file, or a config or id-count mismatch, is an error."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise DiffRecError(f"checkpoint file missing: {path}")
    info = read_json(config_path, dict)
    section = info.get("model")
    arch = section.get("arch") if isinstance(section, dict) else None
    if not isinstance(arch, str) or arch not in MODEL_CONFIGS:
        raise DiffRecError(f"{config_path}: key 'model.arch': unknown model arch {arch!r}")
    for key in ("n_users", "n_items"):
        catalogue_size(info, key, str(config_path))
    try:
        config = MODEL_CONFIGS[arch].model_validate(section)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in ("model", *first["loc"]))
        raise DiffRecError(f"{config_path}: key '{where}': {first['msg']} (got {first.get('input')!r:.40})") from None
    if expected is not None and expected != config:
        raise DiffRecError(
            f"{config_path}: checkpoint model config {config.model_dump()} differs from the run's {expected.model_dump()}"
        )
    for name, want in (("n_users", n_users), ("n_items", n_items)):
        if want is not None and info[name] != want:
            raise DiffRecError(f"{config_path}: checkpoint has {name}={info[name]} but the dataset has {want}")
    state = read_safetensors(weights_path)
    features = {key[len(FEATURE_PREFIX) :]: value for key, value in state.items() if key.startswith(FEATURE_PREFIX)}
    build = (config, info["n_users"], info["n_items"], state.get("graph_edges"), features)
    unbuildable = (RuntimeError, ValueError, TypeError, OverflowError, AssertionError, IndexError)
    try:  # on the meta device first: a config that cannot describe these weights costs no memory to find out
        with torch.device("meta"):
            shapes = {key: tuple(value.shape) for key, value in build_recommender(*build).state_dict().items()}
    except unbuildable:  # graph and multimodal models build from the saved CPU edges and features, which meta
        shapes = {}  # tensors cannot mix with: the real build below reports what is wrong
    wrong = [key for key, shape in shapes.items() if key in state and tuple(state[key].shape) != shape]
    if wrong:
        raise DiffRecError(
            f"{weights_path}: tensor '{wrong[0]}' has shape {tuple(state[wrong[0]].shape)}, but {config_path} describes {shapes[wrong[0]]}"
        )
    try:
        model = build_recommender(*build)
    except unbuildable as err:
        raise DiffRecError(f"{config_path}: cannot build a {arch} of this config ({first_line(err)})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DiffRecError(f"{weights_path}: weights do not match the {arch} config ({first_line(err)})") from None
    return model

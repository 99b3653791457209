"""Shared fixtures: a tiny synthetic dataset in the contract's layout (and a copy with a rendered card per
item), config files for it, a tiny LLM, an MF checkpoint and the tiny SD3 / open_clip / VLM folders of
``diffrec models make-tiny``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, settings
from tqdm import auto as tqdm_auto
from tqdm import std as tqdm_std
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from minigpt4.cli import main
from minigpt4.config import load_config
from minigpt4.data.build import assemble_dataset, ratio_split
from minigpt4.data.contract import save_rating_dataset
from minigpt4.data.images import render_item_cards
from minigpt4.llm.loading import bundled_smollm2_folder
from minigpt4.training.joint import train_diffrec
from minigpt4.training.pretrain import pretrain

PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
# The fuzz tests' budgets: `ci` (the default) is a fixed, fast set of examples; `long` is the recorded run
# (pytest tests/test_fuzz.py --hypothesis-profile=long).
_FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=40, derandomize=True, **_FUZZ)
settings.register_profile("long", max_examples=10_000, **_FUZZ)
settings.load_profile("ci")
SHARED_DATA = Path(os.environ.get("DIFFREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def kill_when(command: list[str], ready: Callable[[], bool], what: str = "its first checkpoint") -> None:
    """Run ``command`` from the repository root and SIGKILL it as soon as ``ready()`` holds (a checkpoint on disk)."""
    process = subprocess.Popen(
        command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended before {what}"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="session", autouse=True)
def process_local_progress_lock() -> None:
    """tqdm's default lock is a multiprocessing lock that forked processes share: a forked test run killed while
    holding it (mutation testing kills the runs that overstay) blocks every later one at its first progress
    bar. Tests draw bars from one process, so a thread lock of the process's own serves."""
    for bar in (tqdm_std.tqdm, tqdm_auto.tqdm):
        bar.set_lock(threading.RLock())


@pytest.fixture(scope="session", autouse=True)
def bf16_not_native():
    """Every test, and every process a test starts, sees a CPU without native bf16, so ``auto`` means
    float32 on any machine and figures do not depend on where the suite runs; tests of ``auto`` set
    the answer they need."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFREC_NATIVE_BF16", "0")
        yield


def synthetic_ratings(
    n_users: int = 40, n_items: int = 30, per_user: int = 15, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ratings driven by 2-d latent tastes (so models can learn something) and an items table."""
    rng = np.random.default_rng(seed)
    users, items = rng.normal(size=(n_users, 2)), rng.normal(size=(n_items, 2))
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, size=per_user, replace=False):
            rating = int(np.clip(np.round(3 + 1.5 * users[u] @ items[i] + rng.normal(scale=0.5)), 1, 5))
            rows.append((f"u{u}", f"i{i}", rating, int(1_000_000 + rng.integers(0, 100_000))))
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    titles = pd.DataFrame({"item": [f"i{i}" for i in range(n_items)], "title": [f"Item {i}" for i in range(n_items)]})
    return ratings, titles


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dataset folder (40 users, 30 items, 600 rows) in the contract's layout."""
    ratings, items = synthetic_ratings()
    splits, items, meta = assemble_dataset(
        ratings, items, 4, lambda ts: ratio_split(ts, (0.7, 0.15, 0.15)), {"name": "tiny", "source": "synthetic"}
    )
    return save_rating_dataset(tmp_path_factory.mktemp("data") / "tiny", splits, items, meta)


@contextlib.contextmanager
def registry_snapshot() -> Iterator[None]:
    """The collaborative-model registries restored on exit, so a registration made inside does not leak."""
    from minigpt4 import config as config_module
    from minigpt4 import recommenders

    configs, shapes = dict(config_module.MODEL_CONFIGS), {k: set(v) for k, v in config_module.DATA_SHAPES.items()}
    models, modules = dict(recommenders.RECOMMENDERS), set(sys.modules)
    try:
        yield
    finally:
        for table, saved in ((config_module.MODEL_CONFIGS, configs), (config_module.DATA_SHAPES, shapes)):
            table.clear()
            table.update(saved)
        recommenders.RECOMMENDERS.clear()
        recommenders.RECOMMENDERS.update(models)
        config_module.rebuild_model_union()
        examples = Path(__file__).resolve().parents[1] / "examples"
        for name in set(sys.modules) - modules:  # an example model's module is imported afresh by the next test
            if Path(getattr(sys.modules[name], "__file__", None) or "/").parent == examples:
                del sys.modules[name]


def assert_cora_reads_the_user_vector(model, batch) -> None:
    """A trained CoRA model's scores move when the collaborative model's vector of one row's user moves, for that
    user's rows only: the per-sample weights are generated from this collaborative model's user side."""
    original = model.collab.user_embeddings
    target = batch.rating.uid[0]

    def shifted(rating):
        vectors = original(rating)
        return vectors + 3.0 * (rating.uid == target)[:, None].to(vectors.dtype)

    model.eval()
    with torch.no_grad():
        before = model.score(batch)
        model.collab.user_embeddings = shifted
        try:
            after = model.score(batch)
        finally:
            del model.collab.user_embeddings
    changed = (before - after).abs() > 1e-6
    assert changed[0] and not changed[batch.rating.uid != target].any()


def write_config(
    folder: Path, dataset: Path, arch: str = "mf", model: dict | None = None, run: dict | None = None
) -> Path:
    """A config file for ``dataset`` with small, fast settings."""
    config = {
        "model": {"arch": arch, "embedding_size": 8, **(model or {})},
        "datasets": {"name": "tiny", "path": str(dataset)},
        "run": {
            "cpu": True,
            "batch_size": 64,
            "lr": 0.01,
            "max_epochs": 3,
            "patience": 5,
            "output_dir": str(folder / "runs"),
            **(run or {}),
        },
    }
    path = folder / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer, as a Hugging Face folder."""
    smollm2 = bundled_smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llm") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def mf_checkpoint(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MF checkpoint trained on the tiny dataset."""
    folder = tmp_path_factory.mktemp("mf")
    return Path(pretrain(load_config(write_config(folder, tiny_dataset, "mf", run={"max_epochs": 2})))["checkpoint"])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD3.5-shaped pipeline, open_clip model and VLM judge, written by ``diffrec models make-tiny``."""
    folder = tmp_path_factory.mktemp("models")
    assert main(["models", "make-tiny", str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def card_dataset(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny rating dataset with a rendered card per item as its images table."""
    root = tmp_path_factory.mktemp("cards") / "tiny"
    shutil.copytree(tiny_dataset, root)
    render_item_cards(root, size=64)
    return root


def joint_config(
    folder: Path,
    dataset: Path,
    llm: Path,
    models: Path,
    collab: Path,
    run: dict | None = None,
    joint_section: dict | None = None,
) -> Path:
    """A diffrec config on the tiny LLM, tiny SD3 and tiny CLIP, sized for seconds."""
    config = {
        "model": {
            "arch": "diffrec",
            "rec": {
                "mode": "cora", "llm": {"path": str(llm), "max_length": 128},
                "prompt": {"template": str(PROMPTS / "tallrec_movie.txt"), "max_history": 5},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "cora": {"rank": 8, "alpha": 16, "queries": 4, "width": 16, "heads": 2},
                "collab": {"ckpt": str(collab)}, "reply": {"template": str(PROMPTS / "reply_movie.txt"), "max_new_tokens": 6},
            },
            "image": {
                "pipeline": {"path": str(models / "sd3"), "max_sequence_length": 4}, "lora": {"r": 4, "alpha": 8},
                "fusion": {"tokens": 2, "hidden": 16},
                "sampling": {"steps": 2, "guidance_scale": 1.0}, "clip": {"path": str(models / "clip")},
                "holdout": {"users": 10, "items": 1}, "flow": {"caption": "a poster for {title}", "resolution": 64, "generic_rate": 0.5},
            },
            "joint": {"image_batch_size": 2, "eval_images": 4, "replies": 2, "reply_users": 10, **(joint_section or {})},
        },
        "datasets": {"name": "tiny", "path": str(dataset)},
        "run": {
            "cpu": True, "seed": 7, "batch_size": 4, "eval_batch_size": 16, "lr": 5e-3, "max_steps": 6, "eval_every_steps": 3,
            "checkpoint_every_steps": 2, "train_rows": 32, "valid_rows": 32, "test_rows": 32,
            "output_dir": str(folder / "runs"), **(run or {}),
        },
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "diffrec.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def trained_joint(tmp_path_factory, card_dataset, tiny_llm, tiny_models, mf_checkpoint) -> dict:
    """One uninterrupted joint run, its config file and metrics."""
    folder = tmp_path_factory.mktemp("joint")
    path = joint_config(folder, card_dataset, tiny_llm, tiny_models, mf_checkpoint)
    return {"path": path, "metrics": train_diffrec(load_config(path))}

"""Shared fixtures: a tiny synthetic dataset in the contract's layout and config files for it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from minigpt4.data.build import assemble_dataset, ratio_split
from minigpt4.data.contract import save_rating_dataset

SHARED_DATA = Path(os.environ.get("DIFFREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def synthetic_ratings(n_users: int = 40, n_items: int = 30, per_user: int = 15, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
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
    splits, items, meta = assemble_dataset(ratings, items, 4, lambda ts: ratio_split(ts, (0.7, 0.15, 0.15)), {"name": "tiny", "source": "synthetic"})
    return save_rating_dataset(tmp_path_factory.mktemp("data") / "tiny", splits, items, meta)


def write_config(folder: Path, dataset: Path, arch: str = "mf", model: dict | None = None, run: dict | None = None) -> Path:
    """A config file for ``dataset`` with small, fast settings."""
    config = {
        "model": {"arch": arch, "embedding_size": 8, **(model or {})},
        "datasets": {"name": "tiny", "path": str(dataset)},
        "run": {"cpu": True, "batch_size": 64, "lr": 0.01, "max_epochs": 3, "patience": 5, "output_dir": str(folder / "runs"), **(run or {})},
    }
    path = folder / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path

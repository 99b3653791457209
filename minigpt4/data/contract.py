"""The processed-dataset contract: Parquet ``train``/``valid``/``test``/``items`` tables plus ``meta.json``.

Rating rows carry ``uid, iid, label, timestamp, his, his_title, title, not_cold`` (``rating`` where the
source has one). Ids are dense from 1; 0 is padding only. ``his`` lists the user's earlier positive
items in time order and ``his_title`` their titles, always of the same length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from minigpt4.errors import DiffRecError
from minigpt4.io import read_json

SPLITS = ("train", "valid", "test")
RATING_COLUMNS = ("uid", "iid", "label", "timestamp", "his", "his_title", "title", "not_cold")
ITEM_COLUMNS = ("iid", "title")


@dataclass
class RatingDataset:
    """A loaded, validated dataset folder."""

    root: Path
    meta: dict
    splits: dict[str, pd.DataFrame]
    items: pd.DataFrame

    @property
    def n_users(self) -> int:
        """Number of users; valid ids are 1..n_users."""
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        """Number of items; valid ids are 1..n_items."""
        return int(self.meta["n_items"])


def save_rating_dataset(root: str | Path, splits: dict[str, pd.DataFrame], items: pd.DataFrame, meta: dict) -> Path:
    """Write a dataset folder; tables are validated first so a bad build never lands on disk."""
    root = Path(root)
    for name in SPLITS:
        validate_ratings(splits[name], f"{name} table", int(meta["n_users"]), int(meta["n_items"]))
    validate_items(items, "items table", int(meta["n_items"]))
    root.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        splits[name].reset_index(drop=True).to_parquet(root / f"{name}.parquet", index=False)
    items.reset_index(drop=True).to_parquet(root / "items.parquet", index=False)
    counts = {name: len(splits[name]) for name in SPLITS}
    (root / "meta.json").write_text(json.dumps({**meta, "rows": counts}, indent=2, default=str))
    return root


def load_rating_dataset(root: str | Path) -> RatingDataset:
    """Read and validate a dataset folder, failing on the first problem with file, column and row."""
    root = Path(root)
    if not root.is_dir():
        raise DiffRecError(f"dataset folder not found: {root} (prepare it with `diffrec data ...`)")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DiffRecError(
            f"{meta_path}: missing (a dataset folder holds train/valid/test/items .parquet and meta.json)"
        )
    meta = read_json(meta_path, dict)
    for key in ("n_users", "n_items"):
        if not isinstance(meta.get(key), int):
            raise DiffRecError(f"{meta_path}: key '{key}' must be an integer")
    splits = {name: read_table(root / f"{name}.parquet") for name in SPLITS}
    for name, frame in splits.items():
        validate_ratings(frame, str(root / f"{name}.parquet"), meta["n_users"], meta["n_items"])
    items = read_table(root / "items.parquet")
    validate_items(items, str(root / "items.parquet"), meta["n_items"])
    return RatingDataset(root=root, meta=meta, splits=splits, items=items)


def read_table(path: Path) -> pd.DataFrame:
    """Read one Parquet table or fail naming it."""
    if not path.is_file():
        raise DiffRecError(f"{path}: missing (a dataset folder holds train/valid/test/items .parquet and meta.json)")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DiffRecError(f"{path}: not a readable Parquet file ({err})") from None


def fail_at(where: str, column: str, bad: np.ndarray, what: str) -> None:
    """Raise naming the first row where ``bad`` holds, if any."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DiffRecError(f"{where}: column '{column}', row {row}: {what} ({int(bad.sum())} bad rows)")


def validate_ratings(frame: pd.DataFrame, where: str, n_users: int, n_items: int) -> None:
    """Check columns, id ranges, labels and history alignment of one rating table."""
    missing = [c for c in RATING_COLUMNS if c not in frame.columns]
    if missing:
        raise DiffRecError(f"{where}: missing column '{missing[0]}' (has: {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise DiffRecError(f"{where}: no rows (an empty split cannot be trained or evaluated)")
    label = frame["label"].to_numpy(dtype=float)
    fail_at(where, "label", np.isnan(label), "label is NaN")
    fail_at(where, "label", ~np.isin(label, (0.0, 1.0)), "label must be 0 or 1")
    for column, upper in (("uid", n_users), ("iid", n_items)):
        ids = frame[column].to_numpy()
        fail_at(where, column, (ids < 1) | (ids > upper), f"id out of range 1..{upper}")
    his_len = frame["his"].map(len).to_numpy()
    title_len = frame["his_title"].map(len).to_numpy()
    fail_at(where, "his_title", his_len != title_len, "'his' and 'his_title' have different lengths")
    if his_len.sum():
        flat = np.concatenate(frame["his"].to_numpy())
        owner = np.repeat(np.arange(len(frame)), his_len)
        bad_rows = np.zeros(len(frame), dtype=bool)
        bad_rows[owner[(flat < 1) | (flat > n_items)]] = True
        fail_at(where, "his", bad_rows, f"history item id out of range 1..{n_items}")


def validate_items(frame: pd.DataFrame, where: str, n_items: int) -> None:
    """Check the items table: one row per item id 1..n_items with a title."""
    missing = [c for c in ITEM_COLUMNS if c not in frame.columns]
    if missing:
        raise DiffRecError(f"{where}: missing column '{missing[0]}' (has: {', '.join(map(str, frame.columns))})")
    ids = frame["iid"].to_numpy()
    fail_at(where, "iid", (ids < 1) | (ids > n_items), f"id out of range 1..{n_items}")
    fail_at(where, "iid", frame["iid"].duplicated().to_numpy(), "duplicate item id")


def subsample(frame: pd.DataFrame, rows: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset of ``rows`` rows (all when None or larger), in the table's order."""
    if rows is None or rows >= len(frame):
        return frame.reset_index(drop=True)
    return frame.sample(n=rows, random_state=seed).sort_index().reset_index(drop=True)

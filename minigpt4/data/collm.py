"""Importer for CoLLM's published splits (``train_ood2.pkl``, ``valid_ood2.pkl``, ``test_ood2.pkl``)."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from minigpt4.data.contract import RATING_COLUMNS, SPLITS, fail_at, id_lists, list_column, validate_ratings
from minigpt4.data.restricted_pickle import load_restricted_pickle
from minigpt4.errors import DiffRecError


def read_collm_split(path: Path) -> pd.DataFrame:
    """One CoLLM split, with the leading dummy history entry (item 0, empty title) removed."""
    frame = load_restricted_pickle(path)
    if not isinstance(frame, pd.DataFrame):
        raise DiffRecError(f"{path}: expected a pickled pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in RATING_COLUMNS if c not in frame.columns]
    if missing:
        raise DiffRecError(f"{path}: missing column '{missing[0]}' (has: {', '.join(map(str, frame.columns))})")
    frame = frame.reset_index(drop=True)
    _, lengths = id_lists(frame, "his", str(path), None, lowest=0)
    list_column(frame, "his_title", str(path), "titles")
    misaligned = lengths != frame["his_title"].map(len).to_numpy()
    fail_at(str(path), "his_title", misaligned, "'his' and 'his_title' have different lengths")
    # CoLLM starts every history with a padding item 0 and an empty title; the contract keeps 0 for padding only.
    frame["his"] = [np.asarray([i for i in his if i != 0], dtype=np.int64) for his in frame["his"]]
    frame["his_title"] = [
        list(titles)[len(titles) - len(his) :] for his, titles in zip(frame["his"], frame["his_title"])
    ]
    frame = frame[list(RATING_COLUMNS)]
    validate_ratings(frame, str(path), None, None)  # types and ids here; the catalogue comes from all three splits
    return frame


def import_collm(folder: Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """CoLLM's splits as contract tables; ids are kept as published (dense from 1)."""
    folder = Path(folder)
    splits = {name: read_collm_split(folder / f"{name}_ood2.pkl") for name in SPLITS}
    rows = pd.concat(splits.values(), ignore_index=True)
    # Items seen only inside histories get their title from there.
    in_histories = pd.DataFrame(
        {"iid": list(chain.from_iterable(rows["his"])), "title": list(chain.from_iterable(rows["his_title"]))}
    )
    items = (
        pd.concat([rows[["iid", "title"]], in_histories])
        .drop_duplicates("iid")
        .sort_values("iid")
        .reset_index(drop=True)
    )
    meta = {
        "source": str(folder),
        "name": "collm-ml-1m" if "ml-1m" in folder.name else f"collm-{folder.name}",
        "n_users": int(rows["uid"].max()),
        "n_items": int(items["iid"].max()),
        "label_rule": "label = rating > 3 (as published by CoLLM)",
        "split_rule": "CoLLM's time-ordered ood2 split (as published)",
        "history_rule": "his = the user's earlier positive items in time order (CoLLM's leading 0 removed)",
        "cold_rule": "not_cold = user and item both appear in train (as published)",
    }
    return splits, items, meta

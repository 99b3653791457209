"""Importer for CoLLM's published splits (``train_ood2.pkl``, ``valid_ood2.pkl``, ``test_ood2.pkl``).

Each pickle's own columns are checked before anything is converted: a DataFrame with every contract column
once and at least one row; integer ids from 1; labels and ``not_cold`` 0 or 1; finite timestamps; titles
that UTF-8 can hold; ``his`` a flat list of integer ids (CoLLM's padding 0 included) aligned with
``his_title``. Across the three splits, user and item ids must be dense from 1 (as published), and every
history item must be one of the catalogue's rated items.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from minigpt4.data.contract import RATING_COLUMNS, SPLITS, fail_at, id_lists, validate_ratings
from minigpt4.data.restricted_pickle import load_restricted_pickle
from minigpt4.errors import DiffRecError


def read_collm_split(path: Path) -> pd.DataFrame:
    """One CoLLM split, checked at its own columns, with the leading dummy history entry (item 0, empty title)
    removed."""
    frame = load_restricted_pickle(path)
    if not isinstance(frame, pd.DataFrame):
        raise DiffRecError(f"{path}: expected a pickled pandas DataFrame, got {type(frame).__name__}")
    frame = frame.reset_index(drop=True)
    validate_ratings(frame, str(path), None, None, history_lowest=0)
    frame = frame.loc[:, list(RATING_COLUMNS)].copy()
    # CoLLM starts every history with a padding item 0 and an empty title; the contract keeps 0 for padding only.
    histories = [np.asarray(his, dtype=np.int64) for his in frame["his"]]
    frame["his"] = [his[his != 0] for his in histories]
    frame["his_title"] = [
        [title for title, item in zip(titles, his) if item != 0] for titles, his in zip(frame["his_title"], histories)
    ]
    for column in ("uid", "iid", "label", "not_cold"):
        frame[column] = pd.to_numeric(frame[column]).astype(np.int64)
    frame["timestamp"] = pd.to_numeric(frame["timestamp"])
    return frame


def _dense_catalogue(splits: dict[str, pd.DataFrame], paths: dict[str, Path], column: str, name: str) -> int:
    """The number of ids in ``column`` across the splits, which must run 1..n with none left out; an id above
    n is named at its first file and row."""
    ids = np.unique(np.concatenate([frame[column].to_numpy() for frame in splits.values()]))
    n = len(ids)
    if ids[-1] != n:
        outside = int(ids[ids > n][0])
        for split, frame in splits.items():
            fail_at(
                str(paths[split]),
                column,
                frame[column].to_numpy() == outside,
                f"{name} {outside} lies outside the catalogue 1..{n} ({n} distinct ids, which must be dense from 1)",
            )
    return n


def import_collm(folder: Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """CoLLM's splits as contract tables; ids are kept as published (dense from 1)."""
    folder = Path(folder)
    paths = {name: folder / f"{name}_ood2.pkl" for name in SPLITS}
    splits = {name: read_collm_split(path) for name, path in paths.items()}
    n_users = _dense_catalogue(splits, paths, "uid", "user id")
    n_items = _dense_catalogue(splits, paths, "iid", "item id")
    for name, frame in splits.items():  # the catalogue is the rated items: a history item must be one of them
        id_lists(frame, "his", str(paths[name]), n_items, name="history item id")
    rows = pd.concat(splits.values(), ignore_index=True)
    # Items seen only inside histories get their title from there (every history item is also rated somewhere).
    in_histories = pd.DataFrame(
        {"iid": list(chain.from_iterable(rows["his"])), "title": list(chain.from_iterable(rows["his_title"]))}
    )
    items = (
        pd.concat([rows[["iid", "title"]], in_histories.astype({"iid": np.int64, "title": object})])
        .drop_duplicates("iid")
        .sort_values("iid")
        .reset_index(drop=True)
    )
    meta = {
        "source": str(folder),
        "name": "collm-ml-1m" if "ml-1m" in folder.name else f"collm-{folder.name}",
        "n_users": n_users,
        "n_items": n_items,
        "label_rule": "label = rating > 3 (as published by CoLLM)",
        "split_rule": "CoLLM's time-ordered ood2 split (as published)",
        "history_rule": "his = the user's earlier positive items in time order (CoLLM's leading 0 removed)",
        "cold_rule": "not_cold = user and item both appear in train (as published)",
    }
    return splits, items, meta

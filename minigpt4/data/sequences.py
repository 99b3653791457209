"""The sequence shape of the data contract, as DiffuRec uses it: each user's chronological items with
leave-one-out targets (the last item is the test target, the one before it the validation target).

On disk, inside a dataset folder: ``sequences/sequences.parquet`` (columns ``uid``, ``train``: the item ids
before the two targets in time order, ``valid``, ``test``; ids dense from 1, 0 is padding) and
``sequences/meta.json``. ``import_diffurec_pickle`` reads DiffuRec's published ``dataset.pkl`` (a dict of
``train``/``val``/``test`` user -> item lists with ``umap``/``smap``, 0-based users, through the
restricted unpickler); ``derive_sequences`` builds the same shape from a rating dataset's positive rows,
ids unchanged so a model trained on it can sit behind the LLM on the rating rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from minigpt4.data.contract import (
    SPLITS,
    Catalogue,
    catalogue_size,
    fail_at,
    id_column,
    id_lists,
    load_rating_dataset,
    read_meta,
    read_table,
    require_columns,
    require_rows,
)
from minigpt4.data.restricted_pickle import load_restricted_pickle
from minigpt4.errors import DiffRecError
from minigpt4.io import atomic_folder

FOLDER = "sequences"
COLUMNS = ("uid", "train", "valid", "test")


@dataclass
class SequenceDataset(Catalogue):
    """Users' training sequences stored flat (``items[starts[u]:ends[u]]`` is row u's sequence) with their targets."""

    root: Path
    meta: dict
    uid: np.ndarray  # [U] user ids of the rows
    items: np.ndarray  # every row's training sequence, concatenated
    starts: np.ndarray  # [U] where each row's sequence begins in ``items``
    valid: np.ndarray  # [U] validation target per row
    test: np.ndarray  # [U] test target per row

    @property
    def ends(self) -> np.ndarray:
        """Where each row's training sequence ends in ``items`` (exclusive)."""
        return np.append(self.starts[1:], len(self.items))

    def training_prefixes(self) -> tuple[np.ndarray, np.ndarray]:
        """DiffuRec's training set, one sample per prefix: for every position of ``items`` that does not start
        its row, (where the row starts, the position); the history is ``items[start:position]`` and the
        target ``items[position]``."""
        is_start = np.zeros(len(self.items), dtype=bool)
        is_start[self.starts] = True
        targets = np.flatnonzero(~is_start)
        return self.starts[np.searchsorted(self.starts, targets, side="right") - 1], targets

    def evaluation_inputs(self, split: str, max_len: int) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """Left-padded histories [U, max_len], targets [U] and every history item per row (users x item ids,
        column 0 is padding) for ``split``: validation reads the training sequence, test also the
        validation item."""
        if split == "valid":
            items, starts, ends = self.items, self.starts, self.ends
        elif split == "test":
            lengths = self.ends - self.starts + 1
            ends = np.cumsum(lengths)
            starts = ends - lengths
            items = np.empty(ends[-1], dtype=np.int64)
            mask = np.ones(len(items), dtype=bool)
            mask[ends - 1] = False
            items[mask], items[ends - 1] = self.items, self.valid
        else:
            raise DiffRecError(f"split must be valid or test, got {split!r}")
        rows = np.repeat(np.arange(len(starts)), ends - starts)
        seen = sp.csr_matrix(
            (np.ones(len(items), dtype=np.float32), (rows, items)), shape=(len(starts), self.n_items + 1)
        )
        seen.data[:] = 1.0
        targets = self.valid if split == "valid" else self.test
        return left_padded(items, starts, ends, max_len), targets, seen


def left_padded(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """``items[start:end]`` of each row, its last ``max_len`` entries left-padded with 0, [N, max_len] (one gather, no loop)."""
    index = ends[:, None] - max_len + np.arange(max_len)[None, :]
    return np.where(index >= starts[:, None], items[np.clip(index, 0, None)], 0).astype(np.int64)


def _frame_from_lists(uid: np.ndarray, train: list[list[int]], valid: list[int], test: list[int]) -> pd.DataFrame:
    """The sequences table from per-user lists."""
    return pd.DataFrame(
        {
            "uid": uid.astype(np.int64),
            "train": [np.asarray(seq, dtype=np.int64) for seq in train],
            "valid": np.asarray(valid, dtype=np.int64),
            "test": np.asarray(test, dtype=np.int64),
        }
    )


def import_diffurec_pickle(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The sequences table and meta of DiffuRec's ``dataset.pkl`` (user u becomes uid u + 1; item ids are kept),
    checked as a source: dicts keyed by the users 0..n-1, one validation and one test item per user, item ids
    within ``smap``'s catalogue."""
    path = Path(path)
    raw = load_restricted_pickle(path)
    if not isinstance(raw, dict) or not {"train", "val", "test", "smap"} <= set(raw):
        raise DiffRecError(f"{path}: expected a dict with keys train, val, test, umap, smap (DiffuRec's dataset.pkl)")
    wrong = [key for key in ("train", "val", "test", "smap") if not isinstance(raw[key], dict)]
    if wrong:
        raise DiffRecError(f"{path}: '{wrong[0]}' must be a dict, found {type(raw[wrong[0]]).__name__}")
    if not raw["train"] or not raw["smap"]:
        raise DiffRecError(f"{path}: '{'train' if not raw['train'] else 'smap'}' is empty")
    if not all(isinstance(user, int) and not isinstance(user, bool) for user in raw["train"]):
        raise DiffRecError(f"{path}: 'train' must be keyed by integer user ids")
    users = sorted(raw["train"])
    if users != list(range(len(users))):
        raise DiffRecError(f"{path}: 'train' users must be 0..{len(users) - 1}")
    for key in ("val", "test"):
        missing = [user for user in users if not isinstance(raw[key].get(user), list) or len(raw[key][user]) != 1]
        if missing:
            raise DiffRecError(
                f"{path}: '{key}' must hold exactly one item per user; user {missing[0]} has {raw[key].get(missing[0])!r:.40}"
            )
    frame = pd.DataFrame(
        {
            "uid": np.arange(1, len(users) + 1),
            "train": [raw["train"][u] for u in users],
            "valid": [raw["val"][u][0] for u in users],
            "test": [raw["test"][u][0] for u in users],
        }
    )
    n_items = len(raw["smap"])
    where = f"{path} (rows are users 0..{len(users) - 1}; 'smap' names {n_items} items)"
    _, lengths = id_lists(frame, "train", where, n_items)
    fail_at(where, "train", lengths < 1, "empty training sequence")
    for column in ("valid", "test"):
        frame[column] = id_column(frame, column, where, n_items, "item id")
    meta = {
        "source": f"DiffuRec dataset.pkl ({path.parent.name})",
        "n_users": len(users),
        "n_items": n_items,
        "split": "leave-one-out as published",
    }
    return _frame_from_lists(frame["uid"].to_numpy(), list(frame["train"]), frame["valid"], frame["test"]), meta


def derive_sequences(root: str | Path, min_length: int = 3) -> dict:
    """Write ``root/sequences`` from the rating dataset in ``root``: each user's positive items (label 1) of
    every split in time order, the last one the test target, the one before it the validation target.
    Users with fewer than ``min_length`` positives are left out."""
    if min_length < 3:
        raise DiffRecError(
            f"--min-length {min_length}: at least 3 (one item to train on, a validation and a test target)"
        )
    dataset = load_rating_dataset(root)
    rows = pd.concat([dataset.splits[split] for split in SPLITS])
    rows = rows.loc[rows["label"] == 1, ["uid", "iid", "timestamp"]].sort_values(["uid", "timestamp"], kind="stable")
    grouped = rows.groupby("uid")["iid"].apply(list)
    grouped = grouped[grouped.map(len) >= min_length]
    if grouped.empty:
        raise DiffRecError(f"{root}: no user has {min_length} positive rows; nothing to build sequences from")
    frame = _frame_from_lists(
        grouped.index.to_numpy(),
        [seq[:-2] for seq in grouped],
        [seq[-2] for seq in grouped],
        [seq[-1] for seq in grouped],
    )
    meta = {
        "source": f"positive rows (label 1) of the rating dataset {dataset.meta.get('name', Path(root).name)}, per user in time order",
        "n_users": dataset.n_users, "n_items": dataset.n_items, "split": "leave-one-out", "min_length": min_length,
    }  # fmt: skip
    save_sequence_dataset(root, frame, meta)
    return meta | {"users": len(frame)}


def save_sequence_dataset(root: str | Path, frame: pd.DataFrame, meta: dict) -> Path:
    """Write the sequence shape into ``root/sequences``, checked first (as ``load_sequence_dataset`` checks it)
    and written whole."""
    folder = Path(root) / FOLDER
    check_sequences(frame, f"{folder / 'sequences.parquet'} (not written)", meta)
    with atomic_folder(folder) as partial:
        frame[list(COLUMNS)].to_parquet(partial / "sequences.parquet", index=False)
        counts = {"users": len(frame), "train_items": int(frame["train"].map(len).sum())}
        (partial / "meta.json").write_text(json.dumps({**meta, **counts}, indent=2))
    return Path(root)


def check_sequences(frame: pd.DataFrame, where: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The sequences table's columns, ids within ``meta``'s catalogue and non-empty training sequences; returns
    every training item concatenated and each row's length."""
    require_columns(frame, COLUMNS, where)
    require_rows(frame, where)
    for key in ("n_users", "n_items"):
        catalogue_size(meta, key, f"{where} (its meta)")
    id_column(frame, "uid", where, int(meta["n_users"]))
    items, lengths = id_lists(frame, "train", where, int(meta["n_items"]))
    fail_at(where, "train", lengths < 1, "empty training sequence")
    for column in ("valid", "test"):
        id_column(frame, column, where, int(meta["n_items"]), "item id")
    return items, lengths


def load_sequence_dataset(root: str | Path) -> SequenceDataset:
    """Read and check ``root/sequences``, failing on the first problem with file, column and row."""
    root = Path(root)
    folder = root / FOLDER
    meta_path, table_path = folder / "meta.json", folder / "sequences.parquet"
    if not meta_path.is_file():
        raise DiffRecError(f"{root}: no sequences/meta.json (import DiffuRec's dataset.pkl or derive sequences first)")
    meta = read_meta(meta_path)
    frame = read_table(table_path)
    items, lengths = check_sequences(frame, str(table_path), meta)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return SequenceDataset(
        root,
        meta,
        frame["uid"].to_numpy(np.int64),
        items,
        starts,
        frame["valid"].to_numpy(np.int64),
        frame["test"].to_numpy(np.int64),
    )

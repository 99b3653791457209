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
        validate_ratings(
            splits[name], f"{root / name}.parquet (not written)", int(meta["n_users"]), int(meta["n_items"])
        )
    validate_items(items, f"{root / 'items.parquet'} (not written)", int(meta["n_items"]))
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
    meta = read_meta(meta_path)
    splits = {name: read_table(root / f"{name}.parquet") for name in SPLITS}
    for name, frame in splits.items():
        validate_ratings(frame, str(root / f"{name}.parquet"), meta["n_users"], meta["n_items"])
    items = read_table(root / "items.parquet")
    validate_items(items, str(root / "items.parquet"), meta["n_items"])
    return RatingDataset(root=root, meta=meta, splits=splits, items=items)


def read_meta(path: Path) -> dict:
    """A dataset's ``meta.json``: a JSON object whose ``n_users`` and ``n_items`` are positive integers."""
    meta = read_json(path, dict)
    for key in ("n_users", "n_items"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DiffRecError(f"{path}: key '{key}' must be a positive integer, found {value!r}")
    return meta


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


def _found(value: object) -> str:
    """A short description of a bad cell for a message."""
    value = value.item() if isinstance(value, np.generic) else value
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _first_bad(where: str, column: str, values: pd.Series, bad: np.ndarray, what: str) -> None:
    """Raise at the first bad row, showing what it holds."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        fail_at(where, column, bad, f"{what}, found {_found(values.iloc[row])}")


def id_column(frame: pd.DataFrame, column: str, where: str, upper: int | None = None, name: str = "id") -> np.ndarray:
    """The column as int64 ids in 1..upper (or >= 1 when ``upper`` is None); any other cell (text, NaN, a
    fraction, an id outside the catalogue) is an error at its first row."""
    values = frame[column]
    if not pd.api.types.is_integer_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce") if not pd.api.types.is_bool_dtype(values) else values * np.nan
        bad = (numbers.isna() | (numbers != np.floor(numbers))).to_numpy()
        _first_bad(where, column, values, bad, f"expected an integer {name}")
    ids = values.to_numpy(dtype=np.int64)
    bad = (ids < 1) | (ids > upper) if upper is not None else ids < 1
    fail_at(where, column, bad, f"{name} out of range 1..{upper if upper is not None else ''}")
    return ids


def text_column(frame: pd.DataFrame, column: str, where: str) -> None:
    """Every cell is text (bytes, numbers or missing values are errors at their first row)."""
    values = frame[column]
    _first_bad(where, column, values, ~values.map(lambda value: isinstance(value, str)).to_numpy(), "expected text")


def list_column(frame: pd.DataFrame, column: str, where: str, what: str) -> None:
    """Every cell is a list (NaN, numbers or text are errors at their first row)."""
    values = frame[column]
    is_list = values.map(lambda value: isinstance(value, (list, tuple, np.ndarray))).to_numpy()
    _first_bad(where, column, values, ~is_list, f"expected a list of {what}")


def id_lists(
    frame: pd.DataFrame, column: str, where: str, upper: int | None, lowest: int = 1, name: str = "item id"
) -> tuple[np.ndarray, np.ndarray]:
    """A column of id lists as (all ids concatenated, each row's length); a cell that is not a list (NaN, a
    number, text) or an id that is not an integer in lowest..upper is an error at its row."""
    list_column(frame, column, where, "item ids")
    values = frame[column]
    lengths = values.map(len).to_numpy()
    flat = np.concatenate([np.asarray(value).ravel() for value in values]) if lengths.sum() else np.zeros(0)
    owner = np.repeat(np.arange(len(frame)), lengths)
    if flat.dtype.kind not in "iu":
        numbers = pd.to_numeric(pd.Series(flat, dtype=object), errors="coerce").to_numpy(dtype=float)
        bad_rows = np.zeros(len(frame), dtype=bool)
        bad_rows[owner[np.isnan(numbers) | (numbers != np.floor(numbers))]] = True
        _first_bad(where, column, values, bad_rows, "expected integer item ids in the list")
    flat = flat.astype(np.int64)
    bad_rows = np.zeros(len(frame), dtype=bool)
    bad_rows[owner[(flat < lowest) | (flat > upper) if upper is not None else flat < lowest]] = True
    fail_at(where, column, bad_rows, f"{name} out of range {lowest}..{upper if upper is not None else ''}")
    return flat, lengths


def validate_ratings(frame: pd.DataFrame, where: str, n_users: int | None, n_items: int | None) -> None:
    """Check columns, cell types, id ranges (when the catalogue sizes are given), labels and history alignment
    of one rating table."""
    missing = [c for c in RATING_COLUMNS if c not in frame.columns]
    if missing:
        raise DiffRecError(f"{where}: missing column '{missing[0]}' (has: {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise DiffRecError(f"{where}: no rows (an empty split cannot be trained or evaluated)")
    values = frame["label"]
    label = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    not_number = np.isnan(label) & values.notna().to_numpy()
    _first_bad(where, "label", values, not_number, "expected a label 0 or 1")
    fail_at(where, "label", np.isnan(label), "label is NaN")
    fail_at(where, "label", ~np.isin(label, (0.0, 1.0)), "label must be 0 or 1")
    id_column(frame, "uid", where, n_users)
    id_column(frame, "iid", where, n_items)
    text_column(frame, "title", where)
    _, his_len = id_lists(frame, "his", where, n_items, name="history item id")
    list_column(frame, "his_title", where, "titles")
    titles = frame["his_title"]
    fail_at(where, "his_title", his_len != titles.map(len).to_numpy(), "'his' and 'his_title' have different lengths")
    not_text = titles.map(lambda value: not all(isinstance(title, str) for title in value)).to_numpy()
    _first_bad(where, "his_title", titles, not_text, "expected text titles in the list")
    for column in ("timestamp", "not_cold"):
        cells = frame[column]
        bad = pd.to_numeric(cells, errors="coerce").isna().to_numpy()
        _first_bad(where, column, cells, bad, "expected a number")


def validate_items(frame: pd.DataFrame, where: str, n_items: int) -> None:
    """Check the items table: one row per item id 1..n_items with a text title."""
    missing = [c for c in ITEM_COLUMNS if c not in frame.columns]
    if missing:
        raise DiffRecError(f"{where}: missing column '{missing[0]}' (has: {', '.join(map(str, frame.columns))})")
    id_column(frame, "iid", where, n_items)
    fail_at(where, "iid", frame["iid"].duplicated().to_numpy(), "duplicate item id")
    text_column(frame, "title", where)


def subsample(frame: pd.DataFrame, rows: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset of ``rows`` rows (all when None or larger), in the table's order."""
    if rows is None or rows >= len(frame):
        return frame.reset_index(drop=True)
    return frame.sample(n=rows, random_state=seed).sort_index().reset_index(drop=True)

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
import pyarrow.parquet as pq

from minigpt4.errors import DiffRecError
from minigpt4.io import atomic_folder, read_json

SPLITS = ("train", "valid", "test")
RATING_COLUMNS = ("uid", "iid", "label", "timestamp", "his", "his_title", "title", "not_cold")
ITEM_COLUMNS = ("iid", "title")


class Catalogue:
    """The catalogue sizes a dataset's ``meta.json`` records (``meta``); valid ids are 1..n."""

    meta: dict

    @property
    def n_users(self) -> int:
        """Number of users; valid ids are 1..n_users."""
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        """Number of items; valid ids are 1..n_items."""
        return int(self.meta["n_items"])


@dataclass
class RatingDataset(Catalogue):
    """A loaded, validated dataset folder."""

    root: Path
    meta: dict
    splits: dict[str, pd.DataFrame]
    items: pd.DataFrame


def save_rating_dataset(root: str | Path, splits: dict[str, pd.DataFrame], items: pd.DataFrame, meta: dict) -> Path:
    """Write a dataset folder; tables are validated first so a bad build never lands on disk, and the folder is
    written whole (a ``.partial`` sibling, then renamed), replacing an older one with what was derived in it."""
    root = Path(root)
    for name in SPLITS:
        validate_ratings(
            splits[name], f"{root / name}.parquet (not written)", int(meta["n_users"]), int(meta["n_items"])
        )
    validate_items(items, f"{root / 'items.parquet'} (not written)", int(meta["n_items"]))
    with atomic_folder(root) as partial:
        for name in SPLITS:
            splits[name].reset_index(drop=True).to_parquet(partial / f"{name}.parquet", index=False)
        items.reset_index(drop=True).to_parquet(partial / "items.parquet", index=False)
        counts = {name: len(splits[name]) for name in SPLITS}
        (partial / "meta.json").write_text(json.dumps({**meta, "rows": counts}, indent=2, default=str))
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
        catalogue_size(meta, key, str(path))
    return meta


def catalogue_size(mapping: dict, key: str, where: str) -> int:
    """``mapping[key]`` as a number of users or items: an integer in 1..2**31-1 (ids index embedding tables and
    SciPy's int32 matrices); anything else is an error naming ``where`` and the key."""
    value = mapping.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**31:
        raise DiffRecError(f"{where}: key '{key}' must be a positive integer below 2**31, found {value!r:.40}")
    return value


def read_table(path: Path) -> pd.DataFrame:
    """Read one Parquet table or fail naming it."""
    if not path.is_file():
        raise DiffRecError(f"{path}: missing (a dataset folder holds train/valid/test/items .parquet and meta.json)")
    try:
        table = pq.read_table(path)
        table.validate(full=True)  # a flipped byte can leave text that is not UTF-8, found only when first read
        return table.to_pandas()
    except Exception as err:  # pyarrow fails in many ways on a corrupt file (ArrowInvalid, a KeyError in its metadata)
        raise DiffRecError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None


def fail_at(where: str, column: str, bad: np.ndarray, what: str) -> None:
    """Raise naming the first row where ``bad`` holds, if any."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DiffRecError(f"{where}: column '{column}', row {row}: {what} ({int(bad.sum())} bad rows)")


def _found(value: object) -> str:
    """A short description of a bad cell for a message (one line, whatever the cell holds)."""
    value = value.item() if isinstance(value, np.generic) else value
    text = ascii(value) if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _first_bad(where: str, column: str, values: pd.Series, bad: np.ndarray, what: str) -> None:
    """Raise at the first bad row, showing what it holds."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        fail_at(where, column, bad, f"{what}, found {_found(values.iloc[row])}")


def require_columns(frame: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    """Every one of ``columns`` present exactly once (a missing or repeated name is an error naming it)."""
    names = [str(name) for name in frame.columns]
    missing = [column for column in columns if column not in names]
    if missing:
        raise DiffRecError(f"{where}: missing column '{missing[0]}' (has: {', '.join(names) or 'none'})")
    repeated = [column for column in columns if names.count(column) > 1]
    if repeated:
        raise DiffRecError(f"{where}: column '{repeated[0]}' appears {names.count(repeated[0])} times")


def require_rows(frame: pd.DataFrame, where: str) -> None:
    """At least one row (an empty table cannot be trained or evaluated on)."""
    if frame.empty:
        raise DiffRecError(f"{where}: no rows (an empty table cannot be trained or evaluated on)")


def _numbers(values: pd.Series | np.ndarray) -> np.ndarray:
    """``values`` as float64, NaN where a cell is not a number: text (even text of digits: a source's dtype is
    checked, not guessed), bytes, bools, lists or missing values."""
    series = pd.Series(values, dtype=object) if isinstance(values, np.ndarray) else values
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=float, na_value=np.nan)
    number = series.map(
        lambda value: (
            isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        )
    )
    return pd.to_numeric(series.where(number, None), errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _integers(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` as int64 and a mask of the cells that are not integers (not numbers, NaN, inf, fractions, or
    magnitudes beyond 2**53, where a float no longer holds an exact integer)."""
    if isinstance(values, pd.Series) and pd.api.types.is_signed_integer_dtype(values) and not values.isna().any():
        ids = values.to_numpy(dtype=np.int64)
        return ids, np.abs(ids) > 2**53
    numbers = _numbers(values)
    bad = ~np.isfinite(numbers) | (numbers != np.floor(numbers)) | (np.abs(numbers) > 2**53)
    return np.where(bad, 0, numbers).astype(np.int64), bad


def id_column(frame: pd.DataFrame, column: str, where: str, upper: int | None = None, name: str = "id") -> np.ndarray:
    """The column as int64 ids in 1..upper (or >= 1 when ``upper`` is None); any other cell (text, NaN, a
    fraction, an id outside the catalogue) is an error at its first row."""
    values = frame[column]
    ids, not_integer = _integers(values)
    _first_bad(where, column, values, not_integer, f"expected an integer {name}")
    bad = (ids < 1) | (ids > upper) if upper is not None else ids < 1
    fail_at(where, column, bad, f"{name} out of range 1..{upper if upper is not None else ''}")
    return ids


def number_column(
    frame: pd.DataFrame, column: str, where: str, allowed: tuple[float, ...] | None = None, what: str | None = None
) -> np.ndarray:
    """The column as finite float64 numbers (text, bool, NaN or inf are errors at their first row); ``allowed``
    lists the only values it may hold; ``what`` names what was expected in the message."""
    values = frame[column]
    numbers = _numbers(values)
    bad = ~np.isfinite(numbers)
    if allowed:
        bad |= ~np.isin(numbers, allowed)
    what = what or (f"one of {', '.join(f'{value:g}' for value in allowed)}" if allowed else "a finite number")
    _first_bad(where, column, values, bad, f"expected {what}")
    return numbers


def not_utf8(value: object) -> bool:
    """True for text that cannot be written as UTF-8 (an undecodable byte kept as a lone surrogate)."""
    try:
        str(value).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _all_utf8(texts: list[str]) -> bool:
    """True when every text can be written as UTF-8 (one encode for the common case)."""
    return not not_utf8("".join(texts))


NOT_UTF8 = (
    "text that is not valid UTF-8 (an undecodable byte kept as a lone surrogate; "
    "decode the source with errors='replace' to repair it)"
)


def text_column(frame: pd.DataFrame, column: str, where: str) -> None:
    """Every cell is text that UTF-8 can hold (bytes, numbers, missing values or undecodable text are errors at
    their first row)."""
    values = frame[column]
    not_text = ~values.map(lambda value: isinstance(value, str)).to_numpy(dtype=bool)
    _first_bad(where, column, values, not_text, "expected text")
    if not _all_utf8(list(values)):
        fail_at(where, column, values.map(not_utf8).to_numpy(dtype=bool), NOT_UTF8)


def _flat_array(value: object) -> np.ndarray | None:
    """A list, tuple or 1-d array as a 1-d array of scalars; None for anything else (NaN, a number, text,
    nested lists, arrays or mappings)."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting
        return None
    containers = (list, tuple, dict, set, np.ndarray)
    if array.ndim != 1 or (array.dtype == object and any(isinstance(v, containers) for v in array)):
        return None
    return array


def list_column(frame: pd.DataFrame, column: str, where: str, what: str) -> np.ndarray:
    """Every cell is a list, tuple or 1-d array (NaN, numbers or text are errors at their first row); returns
    each row's length."""
    values = frame[column]
    is_list = values.map(
        lambda value: isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)
    )
    _first_bad(where, column, values, ~is_list.to_numpy(dtype=bool), f"expected a list of {what}")
    return values.map(len).to_numpy(dtype=np.int64)


def text_lists(frame: pd.DataFrame, column: str, where: str) -> np.ndarray:
    """A column of flat lists of text (UTF-8 writable); returns each row's length."""
    lengths = list_column(frame, column, where, "titles")
    values = frame[column]
    titles = [title for cell in values for title in cell]
    if not all(type(title) is str for title in titles):  # one pass; the row is looked for only on failure
        not_text = values.map(lambda cell: not all(isinstance(title, str) for title in cell)).to_numpy(dtype=bool)
        _first_bad(where, column, values, not_text, "expected text titles in the list")
    if not _all_utf8(titles):
        fail_at(where, column, values.map(lambda cell: any(map(not_utf8, cell))).to_numpy(dtype=bool), NOT_UTF8)
    return lengths


def id_lists(
    frame: pd.DataFrame, column: str, where: str, upper: int | None, lowest: int = 1, name: str = "item id"
) -> tuple[np.ndarray, np.ndarray]:
    """A column of id lists as (all ids concatenated, each row's length); a cell that is not a flat list (NaN, a
    number, text, a nested list) or an id that is not an integer in lowest..upper is an error at its row."""
    lengths = list_column(frame, column, where, "item ids")
    values = frame[column]
    arrays = [_flat_array(value) for value in values]
    nested = np.array([array is None for array in arrays], dtype=bool)
    _first_bad(where, column, values, nested, "expected a flat list of item ids")
    cells = [array for array in arrays if len(array)]
    if any(cell.dtype.kind not in "iu" for cell in cells):  # keep each cell's own elements (no cast to text)
        cells = [cell.astype(object) for cell in cells]
    flat = np.concatenate(cells) if cells else np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(frame)), lengths)
    ids, not_integer = (
        (flat.astype(np.int64), np.zeros(len(flat), bool)) if flat.dtype.kind in "iu" else _integers(flat)
    )
    bad_rows = np.zeros(len(frame), dtype=bool)
    bad_rows[owner[not_integer]] = True
    _first_bad(where, column, values, bad_rows, "expected integer item ids in the list")
    bad_rows[owner[(ids < lowest) | (ids > upper) if upper is not None else ids < lowest]] = True
    fail_at(where, column, bad_rows, f"{name} out of range {lowest}..{upper if upper is not None else ''}")
    return ids, lengths


def validate_ratings(
    frame: pd.DataFrame, where: str, n_users: int | None, n_items: int | None, history_lowest: int = 1
) -> None:
    """Check columns, cell types, id ranges (when the catalogue sizes are given), labels and history alignment
    of one rating table; ``history_lowest`` 0 admits CoLLM's padding item in histories."""
    require_columns(frame, RATING_COLUMNS, where)
    require_rows(frame, where)
    number_column(frame, "label", where, allowed=(0.0, 1.0), what="a label 0 or 1")
    id_column(frame, "uid", where, n_users)
    id_column(frame, "iid", where, n_items)
    text_column(frame, "title", where)
    _, his_len = id_lists(frame, "his", where, n_items, lowest=history_lowest, name="history item id")
    titles_len = text_lists(frame, "his_title", where)
    fail_at(where, "his_title", his_len != titles_len, "'his' and 'his_title' have different lengths")
    number_column(frame, "timestamp", where)
    number_column(frame, "not_cold", where, allowed=(0.0, 1.0))
    if "rating" in frame.columns:
        number_column(frame, "rating", where)


def validate_items(frame: pd.DataFrame, where: str, n_items: int) -> None:
    """Check the items table: one row per item id 1..n_items with a text title."""
    require_columns(frame, ITEM_COLUMNS, where)
    id_column(frame, "iid", where, n_items)
    fail_at(where, "iid", frame["iid"].duplicated().to_numpy(), "duplicate item id")
    if len(frame) != n_items:
        raise DiffRecError(f"{where}: {len(frame)} rows, but ids run 1..{n_items} (one row per item)")
    text_column(frame, "title", where)


def subsample(frame: pd.DataFrame, rows: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset of ``rows`` rows (all when None or larger), in the table's order."""
    if rows is None or rows >= len(frame):
        return frame.reset_index(drop=True)
    return frame.sample(n=rows, random_state=seed).sort_index().reset_index(drop=True)

"""CoLLM's rules for turning raw ratings into the contract's train/valid/test tables.

label = rating at or above a threshold (CoLLM's rating > 3 on MovieLens); a global, time-ordered split; ``his`` = the user's earlier positive
items in time order (across all splits, as CoLLM builds it); ``not_cold`` = user and item both appear in
training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from minigpt4.data.contract import SPLITS, fail_at, text_column
from minigpt4.errors import DiffRecError


@dataclass(frozen=True)
class TimeSplit:
    """Boundaries of a time-ordered split: train < valid_start <= valid < test_start <= test."""

    valid_start: int
    test_start: int


def ratio_split(timestamps: pd.Series, ratios: tuple[float, float, float]) -> TimeSplit:
    """Boundaries that put the given fractions of rows, in time order, into train/valid/test."""
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise DiffRecError(f"split ratios must be three positive numbers summing to 1, got {ratios}")
    ordered = np.sort(timestamps.to_numpy())
    first = ordered[int(len(ordered) * ratios[0])]
    second = ordered[int(len(ordered) * (ratios[0] + ratios[1]))]
    return TimeSplit(int(first), int(second))


def month_window(timestamps: pd.Series, months: tuple[int, int, int]) -> tuple[int, int, TimeSplit]:
    """CoLLM's ML-1M rule: the last sum(months) whole calendar months, cut into train/valid/test months.

    Returns the window's start and (exclusive) end, where the last, possibly partial, month of data
    begins, and the split boundaries inside it.
    """
    end = pd.to_datetime(timestamps, unit="s").max().to_period("M").to_timestamp()
    start, valid_start, test_start = (
        end - pd.DateOffset(months=m) for m in (sum(months), months[1] + months[2], months[2])
    )
    seconds = [int(t.timestamp()) for t in (start, end, valid_start, test_start)]
    return seconds[0], seconds[1], TimeSplit(seconds[2], seconds[3])


LATEST_TIMESTAMP = 4_102_444_800  # 2100-01-01 in Unix seconds: a later "second" is a millisecond stamp or garbage


def parsed_numbers(values: pd.Series, path: Path, column: str, whole: bool = True) -> np.ndarray:
    """A column of a text source as float64: finite numbers and, with ``whole``, integers below 2**53 (beyond it
    a float no longer holds an exact integer); an error names the file, column and first bad row otherwise."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isfinite(numbers)
    if whole:
        bad |= (numbers != np.floor(numbers)) | (np.abs(numbers) > 2**53)
    if bad.any():
        what = "a whole number below 2**53" if whole else "a finite number"
        fail_at(str(path), column, bad, f"expected {what}, found {values.iloc[int(bad.argmax())]!r}")
    return numbers


def raw_ratings(ratings: pd.DataFrame, path: Path, numeric_ids: bool = True) -> pd.DataFrame:
    """Raw (user, item, rating, timestamp) rows read from ``path``: at least one row, user and item ids (whole
    numbers, or with ``numeric_ids=False`` non-empty text), finite ratings and Unix-second timestamps between
    1970 and 2100 (an error names the column and first bad row otherwise)."""
    if ratings.empty:
        raise DiffRecError(f"{path}: no ratings")
    for column in ("user", "item"):
        if numeric_ids:
            ratings[column] = parsed_numbers(ratings[column], path, column).astype(np.int64)
        else:
            text_column(ratings, column, str(path))
            blank = (ratings[column].str.strip() == "").to_numpy()
            fail_at(str(path), column, blank, "empty id")
    ratings["timestamp"] = parsed_numbers(ratings["timestamp"], path, "timestamp").astype(np.int64)
    early_or_late = ((ratings["timestamp"] < 0) | (ratings["timestamp"] >= LATEST_TIMESTAMP)).to_numpy()
    if early_or_late.any():
        found = ratings["timestamp"].iloc[int(early_or_late.argmax())]
        fail_at(
            str(path), "timestamp", early_or_late, f"expected Unix seconds in 0..{LATEST_TIMESTAMP - 1}, found {found}"
        )
    rating = parsed_numbers(ratings["rating"], path, "rating", whole=False)
    ratings["rating"] = (
        rating.astype(np.int64) if (rating == np.floor(rating)).all() and np.abs(rating).max() <= 2**53 else rating
    )
    return ratings


def raw_items(items: pd.DataFrame, path: Path, ratings: pd.DataFrame, ratings_path: Path) -> pd.DataFrame:
    """A raw items table read from ``path``: one row per item id, each with a text title, and one for every item
    that ``ratings`` (read from ``ratings_path``) names."""
    frame = pd.DataFrame({"item": items["item"], "title": items["title"]})
    if pd.api.types.is_integer_dtype(ratings["item"]):  # MovieLens: items are named by whole numbers too
        items = items.assign(item=parsed_numbers(items["item"], path, "item").astype(np.int64))
    keys = items["item"].astype(str)
    fail_at(str(path), "item", keys.duplicated().to_numpy(), "item id repeated")
    text_column(frame, "title", str(path))
    unknown = ~ratings["item"].astype(str).isin(set(keys)).to_numpy()
    fail_at(str(ratings_path), "item", unknown, f"item has no row in {path}")
    return items


def dense_ids(raw: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """Map raw ids to 1..n in sorted raw-id order; returns the new column and the map."""
    uniques = np.sort(raw.unique())
    mapping = {str(key): index + 1 for index, key in enumerate(uniques)}
    return raw.map(pd.Series(np.arange(1, len(uniques) + 1), index=uniques)), mapping


def build_rating_splits(
    ratings: pd.DataFrame,
    titles: pd.Series,
    min_positive_rating: float,
    split: TimeSplit,
) -> dict[str, pd.DataFrame]:
    """Label, order, attach histories and split dense-id ratings (uid, iid, rating, timestamp).

    ``titles`` maps item id to title. Histories see only the rows given, so filter to a window first.
    """
    frame = ratings.copy()
    frame["label"] = (frame["rating"] >= min_positive_rating).astype(np.int64)
    frame = frame.sort_values(["timestamp", "uid", "iid"], kind="stable").reset_index(drop=True)
    frame["title"] = frame["iid"].map(titles).fillna("").astype(str)
    frame["his"], frame["his_title"] = _histories(frame, titles)
    frame["split"] = np.select(
        [frame["timestamp"] < split.valid_start, frame["timestamp"] < split.test_start], ["train", "valid"], "test"
    )
    train = frame[frame["split"] == "train"]
    known_users, known_items = set(train["uid"]), set(train["iid"])
    frame["not_cold"] = (frame["uid"].isin(known_users) & frame["iid"].isin(known_items)).astype(np.int64)
    columns = ["uid", "iid", "label", "timestamp", "rating", "his", "his_title", "title", "not_cold"]
    return {name: frame.loc[frame["split"] == name, columns].reset_index(drop=True) for name in SPLITS}


def _histories(frame: pd.DataFrame, titles: pd.Series) -> tuple[list[list[int]], list[list[str]]]:
    """Each row's earlier positive items of the same user (time order) and their titles."""
    his: list[list[int]] = [[] for _ in range(len(frame))]
    seen: dict[int, list[int]] = {}
    for row, (uid, iid, label) in enumerate(
        zip(frame["uid"].to_numpy(), frame["iid"].to_numpy(), frame["label"].to_numpy())
    ):
        earlier = seen.setdefault(int(uid), [])
        his[row] = list(earlier)
        if label:
            earlier.append(int(iid))
    title_of = titles.to_dict()
    return his, [[title_of.get(i, "") for i in items] for items in his]


def assemble_dataset(
    ratings: pd.DataFrame,
    items: pd.DataFrame,
    min_positive_rating: float,
    split_for: Callable[[pd.Series], TimeSplit],
    meta: dict,
    where: str | None = None,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """Dense ids, labels, histories and splits from raw ratings and a raw items table.

    ``ratings`` has raw ``user, item, rating, timestamp``; ``items`` has raw ``item, title`` and any
    extra columns (kept). ``split_for`` maps the timestamps to a ``TimeSplit``; ``where`` names the ratings'
    source in errors.
    """
    missing_items = set(ratings["item"]) - set(items["item"])
    if missing_items:
        raise DiffRecError(f"{len(missing_items)} rated items have no metadata row, e.g. {sorted(missing_items)[:3]}")
    frame = ratings.copy()
    frame["uid"], user_map = dense_ids(frame["user"])
    frame["iid"], item_map = dense_ids(frame["item"])
    items = items[items["item"].isin(frame["item"])].copy()
    items["iid"] = items["item"].astype(str).map(item_map).astype(np.int64)
    items = items.sort_values("iid").rename(columns={"item": "raw_id"}).reset_index(drop=True)
    items = items[["iid", "title"] + [c for c in items.columns if c not in ("iid", "title")]]
    titles = items.set_index("iid")["title"]
    splits = build_rating_splits(
        frame[["uid", "iid", "rating", "timestamp"]], titles, min_positive_rating, split_for(frame["timestamp"])
    )
    empty = [name for name in SPLITS if splits[name].empty]
    if empty:
        raise DiffRecError(
            f"{where or meta.get('source')}: its {len(frame)} ratings leave the {empty[0]} split empty under the split rule ({meta.get('split_rule')})"
        )
    meta = {
        **meta,
        "n_users": len(user_map),
        "n_items": len(item_map),
        "label_rule": f"label = rating >= {min_positive_rating:g}",
        "history_rule": "his = the user's earlier positive items in time order (all splits)",
        "cold_rule": "not_cold = user and item both appear in train",
        "user_map": user_map,
        "item_map": item_map,
    }
    return splits, items, meta

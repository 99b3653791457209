"""Any rating log as a dataset: a CSV of ``user,item,rating,timestamp`` (and optionally one of ``item,title``).

The same rules as the MovieLens importers (``minigpt4.data.build``): label = rating at or above a threshold,
a global time-ordered split by row fractions, histories of earlier liked items, dense ids from 1.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd

from minigpt4.data.build import assemble_dataset, ratio_split, raw_items, raw_ratings
from minigpt4.data.contract import require_columns
from minigpt4.io import read_csv

CSV_COLUMNS = ("user", "item", "rating", "timestamp")  # the ratings file's header
DEFAULT_SPLIT = (0.8, 0.1, 0.1)


def read_rating_csv(ratings_path: Path, items_path: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw ratings and items from CSV files with headers (ids are text: numbers or names such as ASINs);
    without an items file, an item's title is ``item <its raw id>``. Extra columns of the items file (genres,
    a description) are kept."""
    ratings = read_csv(ratings_path, dtype=str, keep_default_na=False)
    require_columns(ratings, CSV_COLUMNS, str(ratings_path))
    ratings = raw_ratings(ratings[list(CSV_COLUMNS)].copy(), ratings_path, numeric_ids=False)
    if items_path is None:
        keys = pd.Series(pd.unique(ratings["item"]))
        return ratings, pd.DataFrame({"item": keys, "title": "item " + keys.astype(str)})
    items = read_csv(items_path, dtype=str, keep_default_na=False)
    require_columns(items, ("item", "title"), str(items_path))
    return ratings, raw_items(items, items_path, ratings, ratings_path)


def prepare_csv(
    ratings_path: Path,
    items_path: Path | None = None,
    min_positive_rating: float = 4,
    split: tuple[float, float, float] = DEFAULT_SPLIT,
    name: str | None = None,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """A rating CSV under CoLLM's rules: label = rating >= ``min_positive_rating``, ``split`` row fractions in
    time order."""
    ratings, items = read_rating_csv(ratings_path, items_path)
    meta = {
        "source": str(ratings_path),
        "name": name or Path(ratings_path).stem,
        "split_rule": f"global time order, row fractions {tuple(split)}",
    }
    split_for = partial(ratio_split, ratios=tuple(split))
    return assemble_dataset(ratings, items, min_positive_rating, split_for, meta, str(ratings_path))

"""MovieLens-100K and MovieLens-1M importers (GroupLens files, or the copy of ML-100K in recbole's wheel)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pandas as pd

from minigpt4.data.build import assemble_dataset, month_window, ratio_split, raw_items, raw_ratings
from minigpt4.data.contract import fail_at
from minigpt4.errors import DiffRecError
from minigpt4.io import read_delimited

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
ML100K_SPLIT = (0.8, 0.1, 0.1)
ML1M_MONTHS = (10, 5, 5)  # CoLLM: the last 20 whole months, 10 train / 5 valid / 5 test


def recbole_ml100k_dir() -> Path:
    """The ML-100K atomic files inside the installed ``recbole==1.2.1`` wheel (never imported)."""
    try:
        dist = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError:
        raise DiffRecError(
            "ML-100K needs the recbole wheel: pip install --no-deps recbole==1.2.1 (or pass --raw DIR)"
        ) from None
    folder = Path(dist.locate_file("recbole/dataset_example/ml-100k"))
    if not (folder / "ml-100k.inter").is_file():
        raise DiffRecError(f"{folder}: ml-100k.inter not found in the recbole wheel")
    return folder


def read_ml100k(raw: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw ratings (user, item, rating, timestamp) and items (item, title, genres) of ML-100K, checked at the
    source's own columns.

    ``raw`` is a GroupLens ``ml-100k/`` folder (``u.data``, ``u.item``); without it, recbole's copy.
    """
    if raw is None:
        folder = recbole_ml100k_dir()
        ratings_path, items_path = folder / "ml-100k.inter", folder / "ml-100k.item"
        ratings = read_delimited(ratings_path, "\t", ["user", "item", "rating", "timestamp"], header=True)
        items = read_delimited(items_path, "\t", ["item", "name", "year", "genres"], header=True)
        items["title"] = items["name"].str.strip() + items["year"].map(lambda y: f" ({y})" if y.strip() else "")
        items["genres"] = items["genres"].str.split()
    else:
        ratings_path, items_path = Path(raw) / "u.data", Path(raw) / "u.item"
        ratings = read_delimited(ratings_path, "\t", ["user", "item", "rating", "timestamp"])
        columns = ["item", "title", "release", "video", "url", *ML100K_GENRES]
        items = read_delimited(items_path, "|", columns, encoding="latin-1")
        for genre in ML100K_GENRES:
            bad = ~items[genre].isin(["0", "1"]).to_numpy()
            if bad.any():
                fail_at(
                    str(items_path),
                    genre,
                    bad,
                    f"genre flag must be 0 or 1, found {items[genre].iloc[int(bad.argmax())]!r}",
                )
        flags = items[list(ML100K_GENRES)].to_numpy() == "1"
        items["genres"] = [[g for g, on in zip(ML100K_GENRES, row) if on] for row in flags]
    ratings = raw_ratings(ratings, ratings_path)
    return ratings[["user", "item", "rating", "timestamp"]], raw_items(items, items_path, ratings, ratings_path)[
        ["item", "title", "genres"]
    ]


def read_ml1m(raw: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw ratings and items of ML-1M from a GroupLens ``ml-1m/`` folder (``ratings.dat``, ``movies.dat``),
    checked at the source's own columns."""
    path, items_path = Path(raw) / "ratings.dat", Path(raw) / "movies.dat"
    ratings = raw_ratings(read_delimited(path, "::", ["user", "item", "rating", "timestamp"]), path)
    items = read_delimited(items_path, "::", ["item", "title", "genres"], encoding="latin-1")
    items = raw_items(items, items_path, ratings, path)
    items["genres"] = items["genres"].str.split("|")
    return ratings, items


def prepare_ml100k(raw: Path | None = None) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """ML-100K under CoLLM's rules: label = rating >= 4 (CoLLM's > 3), 80/10/10 time-ordered split."""
    ratings, items = read_ml100k(raw)
    meta = {"source": str(raw) if raw else "recbole==1.2.1 dataset_example/ml-100k", "name": "ml-100k",
            "split_rule": f"global time order, row fractions {ML100K_SPLIT}"}  # fmt: skip
    return assemble_dataset(ratings, items, 4, lambda ts: ratio_split(ts, ML100K_SPLIT), meta, str(raw or "ML-100K"))


def prepare_ml1m(raw: Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """ML-1M under CoLLM's rules: the last 20 whole months, split 10/5/5 months, label = rating > 3."""
    ratings, items = read_ml1m(raw)
    start, end, split = month_window(ratings["timestamp"], ML1M_MONTHS)
    ratings = ratings[(ratings["timestamp"] >= start) & (ratings["timestamp"] < end)]
    meta = {
        "source": str(raw),
        "name": "ml-1m",
        "split_rule": f"last {sum(ML1M_MONTHS)} whole months, {ML1M_MONTHS} months",
    }
    return assemble_dataset(ratings, items, 4, lambda ts: split, meta, str(Path(raw) / "ratings.dat"))

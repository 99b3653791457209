"""Amazon Reviews importer: the 2018 and 2023 JSON-lines layouts, gzipped or not, one or more categories."""

from __future__ import annotations

import gzip
import json
import logging
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from minigpt4.data.build import LATEST_TIMESTAMP, assemble_dataset, ratio_split
from minigpt4.data.contract import not_utf8
from minigpt4.errors import DiffRecError, require_file

AMAZON_SPLIT = (0.8, 0.1, 0.1)
log = logging.getLogger(__name__)
INSTRUCTION = "Suggest products from the {category} category that this shopper would enjoy."


def read_json_lines(path: Path) -> Iterator[dict]:
    """Records of a JSON-lines file, gzipped or not; a malformed line fails naming file and line."""
    require_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DiffRecError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise DiffRecError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object")
                yield record
    except UnicodeDecodeError as err:
        raise DiffRecError(f"{path}: not UTF-8 text after line {number} ({err.reason})") from None
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz
        raise DiffRecError(f"{path}: not readable after line {number} ({err})") from None


def _category_from_name(path: Path) -> str:
    """'meta_Video_Games.jsonl.gz' -> 'Video Games'."""
    stem = path.name.split(".")[0]
    return stem.removeprefix("meta_").replace("_", " ")


def _key(value: object) -> str | None:
    """A user or item key as text: a JSON string or whole number; None for anything else (null, bool, list...)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value and not not_utf8(value):
        return value
    return str(value) if isinstance(value, int) else None


def _finite(value: object) -> float | None:
    """A JSON number as a finite float; None for text, bools, null, NaN, inf or a number beyond float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _seconds(value: object, scale: int) -> int | None:
    """A whole JSON time in units of 1/``scale`` s as Unix seconds between 1970 and 2100; None otherwise."""
    number = _finite(value)
    if number is None or number != math.floor(number):
        return None
    seconds = int(value) // scale
    return seconds if 0 <= seconds < LATEST_TIMESTAMP else None


def read_reviews(path: Path) -> pd.DataFrame:
    """Ratings (user, item, rating, timestamp in seconds) from a 2018 or 2023 reviews file, each field checked
    on its line: text or integer keys, a finite rating, a whole timestamp between 1970 and 2100."""
    rows = []
    for number, record in enumerate(read_json_lines(path), start=1):
        if "reviewerID" in record:  # 2018: overall, unixReviewTime (s)
            keys, scale = ("reviewerID", "asin", "overall", "unixReviewTime"), 1
        elif "user_id" in record:  # 2023: rating, timestamp (ms), items grouped by parent_asin
            item_key = "parent_asin" if "parent_asin" in record else "asin"
            keys, scale = ("user_id", item_key, "rating", "timestamp"), 1000
        else:
            raise DiffRecError(f"{path}: line {number}: neither the 2018 (reviewerID) nor the 2023 (user_id) layout")
        missing = [key for key in keys if key not in record]
        if missing:
            raise DiffRecError(f"{path}: line {number}: missing field '{missing[0]}'")
        user, item, rating, time = (record[key] for key in keys)
        for key, value in zip(keys[:2], (user, item)):
            if _key(value) is None:
                raise DiffRecError(
                    f"{path}: line {number}: '{key}' must be a non-empty text or integer key, found {value!r:.40}"
                )
        seconds, score = _seconds(time, scale), _finite(rating)
        if seconds is None or score is None:
            raise DiffRecError(
                f"{path}: line {number}: '{keys[2]}' must be a finite number and '{keys[3]}' a whole "
                f"{'millisecond' if scale > 1 else 'second'} time between 1970 and 2100, found {rating!r:.20} and {time!r:.20}"
            )
        rows.append((_key(user), _key(item), score, seconds))
    if not rows:
        raise DiffRecError(f"{path}: no reviews")
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


def read_item_metadata(path: Path) -> pd.DataFrame:
    """Items (item, title, category) from a 2018 or 2023 metadata file; a title or category must be text."""
    rows = []
    for number, record in enumerate(read_json_lines(path), start=1):
        field = "parent_asin" if record.get("parent_asin") is not None else "asin"
        item = _key(record.get(field))
        if item is None:
            raise DiffRecError(
                f"{path}: line {number}: no 'asin' or 'parent_asin' text key, found {record.get(field)!r:.40}"
            )
        category = record.get("main_category") or record.get("main_cat") or _category_from_name(path)
        title = record.get("title") or ""
        for key, value in (("title", title), ("main_category", category)):
            if not isinstance(value, str) or not_utf8(value):
                raise DiffRecError(f"{path}: line {number}: '{key}' must be UTF-8 text, found {value!r:.40}")
        rows.append((item, title.strip(), category))
    if not rows:
        raise DiffRecError(f"{path}: no items")
    return pd.DataFrame(rows, columns=["item", "title", "category"]).drop_duplicates("item")


def prepare_amazon(
    reviews: list[Path], metas: list[Path], min_positive_rating: float = 4.0
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """Amazon reviews of one or more categories under the CoLLM rules, with an instruction per row."""
    ratings = pd.concat([read_reviews(Path(p)) for p in reviews], ignore_index=True)
    # A user reviewing the same item twice keeps the first review, as one interaction.
    ratings = ratings.sort_values("timestamp", kind="stable").drop_duplicates(["user", "item"]).reset_index(drop=True)
    items = pd.concat([read_item_metadata(Path(p)) for p in metas], ignore_index=True).drop_duplicates("item")
    untitled = set(ratings["item"]) - set(items.loc[items["title"] != "", "item"])
    if untitled:
        # Items without a title cannot be described to the LLM; they and their reviews are left out.
        ratings = ratings[~ratings["item"].isin(untitled)]
        log.warning(
            "left out %d items without a title in %s, and their reviews", len(untitled), ", ".join(map(str, metas))
        )
    if ratings.empty:
        raise DiffRecError(
            f"{', '.join(map(str, reviews))}: no review names an item with a title in {', '.join(map(str, metas))}"
        )
    meta = {
        "source": {"reviews": [str(p) for p in reviews], "meta": [str(p) for p in metas]},
        "name": "amazon",
        "split_rule": f"global time order, row fractions {AMAZON_SPLIT}",
        "dropped_items_without_title": len(untitled),
    }
    splits, items, meta = assemble_dataset(
        ratings,
        items,
        min_positive_rating,
        lambda ts: ratio_split(ts, AMAZON_SPLIT),
        meta,
        ", ".join(map(str, reviews)),
    )
    category = items.set_index("iid")["category"]
    for frame in splits.values():
        frame["instruction"] = frame["iid"].map(category).map(lambda c: INSTRUCTION.format(category=c))
    return splits, items, meta

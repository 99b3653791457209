"""Item images: the ``images`` table of a dataset folder, its importer and the card renderer.

``images.parquet`` has one row per item with an image: ``iid``, ``path`` (relative to the dataset
folder, under ``images/``), ``source`` (``file`` for an imported picture, ``rendered`` for a card
drawn from the item's metadata), ``width`` and ``height``. Every imported picture is decoded and
checked once; a missing, corrupt or too-small one is an error or an excluded row that is counted
and logged with the first examples, as the caller chooses. Nothing is ever replaced silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from minigpt4.data.contract import (
    RatingDataset,
    fail_at,
    id_column,
    read_table,
    require_columns,
    require_rows,
    text_column,
)
from minigpt4.errors import DiffRecError
from minigpt4.io import read_csv, read_json

IMAGE_TABLE = "images.parquet"
IMAGE_FOLDER = "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_COLUMNS = ("iid", "path", "source", "width", "height")
EXAMPLES = 5
log = logging.getLogger(__name__)


def open_image(path: Path, min_size: int = 1) -> Image.Image:
    """Decode an image fully as RGB, or fail naming the file: missing, unreadable or smaller than ``min_size``."""
    if not path.is_file():
        raise DiffRecError(f"{path}: image file missing")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as err:
        raise DiffRecError(f"{path}: not a readable image ({err})") from None
    if min(rgb.size) < min_size:
        raise DiffRecError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, smaller than the minimum side {min_size}")
    return rgb


def _item_files(items: pd.DataFrame, folder: Path, key: str, mapping: Path | None) -> pd.Series:
    """The source file of each item (None when it has none), by file name or by a CSV map."""
    if not folder.is_dir():
        raise DiffRecError(f"image folder not found: {folder}")
    if key not in items.columns:
        raise DiffRecError(
            f"items table has no column '{key}' to match image files by (has: {', '.join(items.columns)})"
        )
    if mapping is not None:
        if not mapping.is_file():
            raise DiffRecError(f"image map not found: {mapping}")
        table = read_csv(mapping, dtype=str, keep_default_na=False)
        require_columns(table, (key, "file"), str(mapping))
        text_column(table, "file", str(mapping))
        outside = table["file"].map(lambda name: Path(name).name != name or name in ("", ".", "..")).to_numpy()
        fail_at(str(mapping), "file", outside, f"expected a file name inside {folder}")
        fail_at(str(mapping), key, (table[key].str.strip() == "").to_numpy(), "empty key")
        fail_at(str(mapping), key, table[key].duplicated().to_numpy(), "key listed twice")
        by_key = dict(zip(table[key], table["file"]))
    else:
        by_key = {path.stem: path.name for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}
    return items[key].astype(str).map(lambda item: folder / by_key[item] if item in by_key else None)


def import_item_images(
    root: str | Path,
    folder: str | Path,
    key: str = "raw_id",
    mapping: str | Path | None = None,
    on_bad: Literal["error", "exclude"] = "error",
    min_size: int = 64,
) -> dict:
    """Check and copy each item's picture into ``root/images`` and write the images table; returns counts."""
    from minigpt4.data.contract import load_rating_dataset

    root, folder = Path(root), Path(folder)
    items = load_rating_dataset(root).items
    files = _item_files(items, folder, key, Path(mapping) if mapping is not None else None)
    rows, problems = [], []
    listed = f" (as {mapping} maps it)" if mapping is not None else ""
    for iid, source in zip(items["iid"], files):
        if source is None:
            problems.append(f"item {iid}: no image in {folder}{listed}")
            continue
        try:
            image = open_image(source, min_size)
        except DiffRecError as err:
            problems.append(f"item {iid}: {err}{listed}")
            continue
        rows.append((int(iid), source, image.size))
    if problems and on_bad == "error":
        raise DiffRecError(
            f"{len(problems)} of {len(items)} items have no usable image; first: " + "; ".join(problems[:EXAMPLES])
        )
    if problems:
        log.warning(
            "excluded %d of %d items without a usable image; first: %s",
            len(problems),
            len(items),
            "; ".join(problems[:EXAMPLES]),
        )
    if not rows:
        raise DiffRecError(f"no usable item image in {folder}")
    table = []
    (root / IMAGE_FOLDER).mkdir(exist_ok=True)
    for iid, source, (width, height) in rows:
        relative = Path(IMAGE_FOLDER) / f"{iid}{source.suffix.lower()}"
        shutil.copyfile(source, root / relative)
        table.append((iid, relative.as_posix(), "file", width, height))
    save_image_table(root, pd.DataFrame(table, columns=list(IMAGE_COLUMNS)))
    return {"images": len(table), "excluded": len(problems), "items": len(items)}


def _genre_colour(genre: str) -> tuple[int, int, int]:
    """A stable colour per genre (a hash, so it never depends on the order items were drawn)."""
    digest = hashlib.sha256(genre.encode()).digest()
    return tuple(64 + value % 160 for value in digest[:3])


def render_card(title: str, genres: list[str], size: int = 256) -> Image.Image:
    """A deterministic card for an item without a picture: the first genre's colour, a band per genre and the wrapped title.

    One colour per genre (not per genre set) keeps the picture a simple function of the words a caption
    like "a {genres} movie poster" starts with, which a small generator can learn."""
    image = Image.new("RGB", (size, size), _genre_colour(genres[0]) if genres else (128, 128, 128))
    draw = ImageDraw.Draw(image)
    band = size // max(len(genres), 1) if genres else size
    for index, genre in enumerate(genres):
        draw.rectangle([0, index * band, size // 8, (index + 1) * band], fill=_genre_colour(genre))
    font = ImageFont.load_default(size=max(size // 12, 8))
    words, lines, line = title.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) > size * 0.8 and line:
            lines.append(line)
            candidate = word
        line = candidate
    lines.append(line)
    draw.multiline_text((size // 6, size // 4), "\n".join(lines), fill=(255, 255, 255), font=font, spacing=4)
    return image


def render_item_cards(root: str | Path, size: int = 256) -> dict:
    """Draw a card per item of a dataset without pictures (ML-100K) and write the images table."""
    from minigpt4.data.contract import load_rating_dataset

    root = Path(root)
    items = load_rating_dataset(root).items
    (root / IMAGE_FOLDER).mkdir(exist_ok=True)
    table = []
    for item in items.itertuples():
        genres = list(getattr(item, "genres", []) if "genres" in items.columns else [])
        relative = Path(IMAGE_FOLDER) / f"{item.iid}.png"
        render_card(str(item.title), genres, size).save(root / relative)
        table.append((int(item.iid), relative.as_posix(), "rendered", size, size))
    save_image_table(root, pd.DataFrame(table, columns=list(IMAGE_COLUMNS)))
    return {"images": len(table), "excluded": 0, "items": len(items)}


def save_image_table(root: Path, table: pd.DataFrame) -> Path:
    """Write ``images.parquet`` through a temporary file, so a failed write leaves the old table."""
    path = root / IMAGE_TABLE
    partial = path.with_suffix(".parquet.partial")
    table.sort_values("iid").reset_index(drop=True).to_parquet(partial, index=False)
    partial.replace(path)
    return path


def load_image_table(root: str | Path, n_items: int) -> pd.DataFrame:
    """Read and validate a dataset's images table (columns, item ids, files present)."""
    root = Path(root)
    path = root / IMAGE_TABLE
    if not path.is_file():
        raise DiffRecError(
            f"{path}: missing; add item images with `diffrec data images` (import a folder, or --render cards)"
        )
    table = read_table(path)
    require_columns(table, IMAGE_COLUMNS, str(path))
    require_rows(table, str(path))
    table["iid"] = id_column(table, "iid", str(path), n_items)
    fail_at(str(path), "iid", table["iid"].duplicated().to_numpy(), "item id repeated")
    text_column(table, "path", str(path))
    outside = table["path"].map(lambda name: not _inside(root, name)).to_numpy()
    fail_at(str(path), "path", outside, f"expected a path inside {root / IMAGE_FOLDER}")
    for column in ("width", "height"):
        table[column] = id_column(table, column, str(path), name="size in pixels")
    absent = [p for p in table["path"] if not (root / p).is_file()]
    if absent:
        raise DiffRecError(f"{path}: {len(absent)} image files are missing, first {root / absent[0]}")
    return table


def _inside(root: Path, name: str) -> bool:
    """True when ``name`` is a relative path that stays inside ``root/images``."""
    relative = Path(name)
    if "\x00" in name or relative.is_absolute():
        return False
    return (root / relative).resolve().is_relative_to((root / IMAGE_FOLDER).resolve())


def image_pixels(path: Path, resolution: int) -> torch.Tensor:
    """An image resized and centre-cropped to ``resolution``, as a [3, H, W] tensor in [-1, 1]."""
    image = ImageOps.fit(open_image(path), (resolution, resolution), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def fill_caption(template: str, item: dict, where: str) -> str:
    """The caption template filled from an item's columns (list columns such as genres joined by commas);
    an unknown placeholder fails naming it."""
    values = {
        key: ", ".join(map(str, value)) if isinstance(value, (list, tuple, np.ndarray)) else value
        for key, value in item.items()
    }
    try:
        return template.format_map(values)
    except KeyError as err:
        raise DiffRecError(
            f"{where}: placeholder {{{err.args[0]}}} is not a column of the items table (has: {', '.join(item)})"
        ) from None


def item_captions(template: str, items: pd.DataFrame, iids: list[int]) -> list[str]:
    """The caption of each item id, from ``model.flow.caption`` and the items table."""
    by_id = items.set_index("iid", drop=False)
    return [fill_caption(template, by_id.loc[int(iid)].to_dict(), "model.flow.caption") for iid in iids]


def liked_rows(dataset: RatingDataset, split: str, images: pd.DataFrame) -> pd.DataFrame:
    """The split's positive rows whose item has an image."""
    frame = dataset.splits[split]
    return frame[(frame["label"] == 1) & frame["iid"].isin(images["iid"])].reset_index(drop=True)


HOLDOUT_FILE = "holdout.json"


@dataclass
class PersonalHoldout:
    """Users whose most recent liked items the image training never sees (personalization is measured on them)."""

    users: list[int]
    held_out: list[list[int]]  # per user, the held-out liked item ids, oldest first
    rows: pd.DataFrame  # per user, their latest liked training row that is not held out: the preference is read from it
    liked: list[list[int]]  # per user, the liked training items with an image that stay in training

    def drop_from(self, pairs: pd.DataFrame) -> pd.DataFrame:
        """``pairs`` without the held-out (user, item) pairs."""
        held = {(user, item) for user, items in zip(self.users, self.held_out) for item in items}
        keep = [(int(u), int(i)) not in held for u, i in zip(pairs["uid"], pairs["iid"])]
        return pairs[keep].reset_index(drop=True)

    def save(self, folder: Path) -> None:
        """``holdout.json`` in a checkpoint folder: what its image training never saw."""
        records = [{"user": user, "held_out": items} for user, items in zip(self.users, self.held_out)]
        (folder / HOLDOUT_FILE).write_text(json.dumps(records))


def personal_holdout(
    dataset: RatingDataset, images: pd.DataFrame, users: int, items: int, seed: int
) -> PersonalHoldout:
    """A seeded choice of ``users`` users with at least ``2 * items`` liked training items with an image, each
    holding out their ``items`` most recent ones (ML-100K's time-ordered test split has few warm users)."""
    by_user = _liked_by_user(dataset, images)
    eligible = np.array(sorted(user for user, theirs in by_user.items() if len(theirs) >= 2 * items))
    if len(eligible) < users:
        raise DiffRecError(
            f"{dataset.root}/train: model.holdout.users {users}, but only {len(eligible)} users have {2 * items} or more liked items with an image"
        )
    chosen = sorted(int(user) for user in np.random.default_rng(seed).choice(eligible, size=users, replace=False))
    return _holdout(
        by_user, {user: [int(i) for i in by_user[user]["iid"].tail(items)] for user in chosen}, f"{dataset.root}/train"
    )


def load_holdout(folder: Path, dataset: RatingDataset, images: pd.DataFrame) -> PersonalHoldout | None:
    """The holdout a checkpoint's image training recorded; None when it recorded none."""
    path = folder / HOLDOUT_FILE
    if not path.is_file():
        return None
    records = read_json(path, list)
    try:
        held = {int(record["user"]): [int(item) for item in record["held_out"]] for record in records}
    except (TypeError, KeyError, ValueError):
        raise DiffRecError(f'{path}: expected a list of {{"user": id, "held_out": [item ids]}} records') from None
    if not held:
        raise DiffRecError(f"{path}: holds no user")
    return _holdout(_liked_by_user(dataset, images), held, str(path))


def _liked_by_user(dataset: RatingDataset, images: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """Each user's liked training rows with an image, oldest first."""
    liked = liked_rows(dataset, "train", images).sort_values(["uid", "timestamp"], kind="stable")
    return {int(user): theirs for user, theirs in liked.groupby("uid", sort=False)}


def _holdout(by_user: dict[int, pd.DataFrame], held: dict[int, list[int]], source: str) -> PersonalHoldout:
    """The holdout of ``held`` (user -> held-out items) over each user's liked training rows."""
    rows, kept = [], []
    for user, items in held.items():
        theirs = by_user.get(user, pd.DataFrame(columns=["iid"]))
        rest = theirs[~theirs["iid"].isin(items)]
        if rest.empty or not set(items) <= set(theirs["iid"].astype(int)):
            raise DiffRecError(
                f"{source}: user {user}'s held-out items are not among their liked training items with an image"
            )
        rows.append(rest.tail(1))
        kept.append(sorted(set(rest["iid"].astype(int))))
    return PersonalHoldout(list(held), list(held.values()), pd.concat(rows).reset_index(drop=True), kept)

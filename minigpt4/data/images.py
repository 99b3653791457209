"""Item images: the ``images`` table of a dataset folder, its importer and the card renderer.

``images.parquet`` has one row per item with an image: ``iid``, ``path`` (relative to the dataset
folder, under ``images/``), ``source`` (``file`` for an imported picture, ``rendered`` for a card
drawn from the item's metadata), ``width`` and ``height``. Every imported picture is decoded and
checked once; a missing, corrupt or too-small one is an error or an excluded row that is counted
and logged with the first examples, as the caller chooses. Nothing is ever replaced silently.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from minigpt4.data.contract import RatingDataset
from minigpt4.errors import DiffRecError

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
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DiffRecError(f"{path}: not a readable image ({err})") from None
    if min(rgb.size) < min_size:
        raise DiffRecError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, smaller than the minimum side {min_size}")
    return rgb


def _item_files(items: pd.DataFrame, folder: Path, key: str, mapping: Path | None) -> pd.Series:
    """The source file of each item (None when it has none), by file name or by a CSV map."""
    if not folder.is_dir():
        raise DiffRecError(f"image folder not found: {folder}")
    if key not in items.columns:
        raise DiffRecError(f"items table has no column '{key}' to match image files by (has: {', '.join(items.columns)})")
    if mapping is not None:
        if not mapping.is_file():
            raise DiffRecError(f"image map not found: {mapping}")
        table = pd.read_csv(mapping, dtype=str)
        for column in (key, "file"):
            if column not in table.columns:
                raise DiffRecError(f"{mapping}: missing column '{column}' (expected columns {key},file)")
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
    for iid, source in zip(items["iid"], files):
        if source is None:
            problems.append(f"item {iid}: no image in {folder}")
            continue
        try:
            image = open_image(source, min_size)
        except DiffRecError as err:
            problems.append(f"item {iid}: {err}")
            continue
        rows.append((int(iid), source, image.size))
    if problems and on_bad == "error":
        raise DiffRecError(f"{len(problems)} of {len(items)} items have no usable image; first: " + "; ".join(problems[:EXAMPLES]))
    if problems:
        log.warning("excluded %d of %d items without a usable image; first: %s", len(problems), len(items), "; ".join(problems[:EXAMPLES]))
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
        raise DiffRecError(f"{path}: missing; add item images with `diffrec data images` (import a folder, or --render cards)")
    table = pd.read_parquet(path)
    missing = [column for column in IMAGE_COLUMNS if column not in table.columns]
    if missing:
        raise DiffRecError(f"{path}: missing column '{missing[0]}' (has: {', '.join(table.columns)})")
    ids = table["iid"].to_numpy()
    bad = (ids < 1) | (ids > n_items) | pd.Series(ids).duplicated().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DiffRecError(f"{path}: row {row}: item id {ids[row]} is out of range 1..{n_items} or repeated")
    absent = [p for p in table["path"] if not (root / p).is_file()]
    if absent:
        raise DiffRecError(f"{path}: {len(absent)} image files are missing, first {root / absent[0]}")
    return table


def image_pixels(path: Path, resolution: int) -> torch.Tensor:
    """An image resized and centre-cropped to ``resolution``, as a [3, H, W] tensor in [-1, 1]."""
    image = ImageOps.fit(open_image(path), (resolution, resolution), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def fill_caption(template: str, item: dict, where: str) -> str:
    """The caption template filled from an item's columns (list columns such as genres joined by commas);
    an unknown placeholder fails naming it."""
    values = {key: ", ".join(map(str, value)) if isinstance(value, (list, tuple, np.ndarray)) else value for key, value in item.items()}
    try:
        return template.format_map(values)
    except KeyError as err:
        raise DiffRecError(f"{where}: placeholder {{{err.args[0]}}} is not a column of the items table (has: {', '.join(item)})") from None


def item_captions(template: str, items: pd.DataFrame, iids: list[int]) -> list[str]:
    """The caption of each item id, from ``model.flow.caption`` and the items table."""
    by_id = items.set_index("iid", drop=False)
    return [fill_caption(template, by_id.loc[int(iid)].to_dict(), "model.flow.caption") for iid in iids]


def liked_rows(dataset: RatingDataset, split: str, images: pd.DataFrame) -> pd.DataFrame:
    """The split's positive rows whose item has an image."""
    frame = dataset.splits[split]
    return frame[(frame["label"] == 1) & frame["iid"].isin(images["iid"])].reset_index(drop=True)

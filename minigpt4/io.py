"""Writing folders so that a reader never sees half of one; reading JSON files with one clear error."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from minigpt4.errors import DiffRecError, require_file


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it replaces ``folder`` by renames, on error it is removed."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        previous = folder.with_name(folder.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
        partial.rename(folder)
        shutil.rmtree(previous)
    else:
        partial.rename(folder)


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None recursively, so JSON says 'missing' instead of inventing a value."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def read_json(path: Path, kind: type = object) -> Any:
    """A JSON file's content, of type ``kind``; a missing, undecodable or invalid file, or another type, is one
    DiffRecError naming it."""
    try:
        value = json.loads(require_file(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DiffRecError(f"{path}: not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(value, kind):
        raise DiffRecError(
            f"{path}: expected a JSON {'object' if kind is dict else 'array' if kind is list else kind.__name__}, found {type(value).__name__}"
        )
    return value

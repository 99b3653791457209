"""Writing folders so that a reader never sees half of one; reading JSON, text and ``.npy`` files with one clear
error naming the file."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from minigpt4.errors import DiffRecError, first_line, require_file


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it replaces ``folder`` by renames, on error it is removed,
    with any parent folder it had to create (so a failed write leaves nothing behind)."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    created = next((parent for parent in reversed(partial.parents) if not parent.exists()), None)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(created or partial, ignore_errors=True)
        raise
    replace_folder(partial, folder)


def replace_folder(partial: Path, folder: Path) -> None:
    """Rename a complete ``partial`` folder to ``folder`` by renames, replacing an older one."""
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


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats rounded to ``digits`` decimals recursively (for logs and summaries people read)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def log_text(value: Any) -> str:
    """A figure or a dict of figures as compact JSON with 4-decimal floats and missing values as null."""
    return json.dumps(rounded(json_safe(value)), separators=(", ", ": "))


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; a missing file or bytes that are not UTF-8 are one DiffRecError naming it."""
    try:
        return require_file(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DiffRecError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def read_json(path: Path, kind: type = object) -> Any:
    """A JSON file's content, of type ``kind``; a missing, undecodable or invalid file, or another type, is one
    DiffRecError naming it."""
    try:
        value = json.loads(require_file(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DiffRecError(f"{path}: not valid JSON ({first_line(error)})") from None
    if not isinstance(value, kind):
        raise DiffRecError(
            f"{path}: expected a JSON {'object' if kind is dict else 'array' if kind is list else kind.__name__}, found {type(value).__name__}"
        )
    return value


def read_npy(path: Path) -> np.ndarray:
    """A numeric ``.npy`` array (never unpickled); a missing, truncated or corrupt file, an array of objects or
    text, or a NaN/inf value is one DiffRecError naming the file."""
    try:
        values = np.load(require_file(path), allow_pickle=False)
    except Exception as error:  # object arrays refuse to load without pickle (ValueError); a corrupt header can
        # fail in NumPy's header parser with anything from SyntaxError to tokenize.TokenError
        raise DiffRecError(
            f"{path}: not a readable numeric .npy file ({type(error).__name__}: {first_line(error)})"
        ) from None
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "biuf":
        raise DiffRecError(f"{path}: expected a numeric array, found dtype {getattr(values, 'dtype', type(values))}")
    bad = ~np.isfinite(values) if values.dtype.kind == "f" else np.zeros(values.shape, dtype=bool)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DiffRecError(f"{path}: value {values[first]} at {list(first)} (every value must be finite)")
    return values


def read_csv(path: Path, **options: Any) -> pd.DataFrame:
    """A delimited text table (``pandas.read_csv`` options); a missing file, bytes of another encoding or a
    malformed line are one DiffRecError naming the file (the parser's first line only)."""
    try:
        return pd.read_csv(require_file(path), **options)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as error:
        raise DiffRecError(f"{path}: not a readable table ({first_line(error)})") from None


def read_delimited(
    path: Path, separator: str, names: list[str], encoding: str = "utf-8", header: bool = False
) -> pd.DataFrame:
    """A plain delimited text file (no quoting, as GroupLens and RecBole write them) as a table of text cells
    named ``names``; a missing file, undecodable bytes or a line with another number of fields is one
    DiffRecError naming the file and line. ``header`` skips a first line of column names."""
    try:
        text = require_file(path).read_bytes().decode(encoding)
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise DiffRecError(f"{path}: line {line}: not {encoding} text (byte {error.start}: {error.reason})") from None
    lines = text.splitlines()[1 if header else 0 :]
    rows = [line.split(separator) for line in lines if line.strip()]
    numbers = [number for number, line in enumerate(lines, start=2 if header else 1) if line.strip()]
    for number, fields in zip(numbers, rows):
        if len(fields) != len(names):
            raise DiffRecError(
                f"{path}: line {number}: expected {len(names)} fields separated by {separator!r} ({', '.join(names)}), found {len(fields)}"
            )
    return pd.DataFrame(rows, columns=names, dtype=object)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing file, bytes that are not UTF-8 or a syntax error are one DiffRecError
    naming the file, line and column."""
    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise DiffRecError(f"{path}: not valid YAML ({problem}{where})") from None


def read_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors; a missing, truncated or corrupt file, or a tensor holding NaN or inf, is one
    DiffRecError naming the file (and the tensor)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(require_file(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise DiffRecError(f"{path}: not a readable safetensors file ({first_line(error)})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DiffRecError(f"{path}: tensor '{name}' holds NaN or inf (the run that wrote it diverged)")
    return state

"""Mutations for the property-based fuzz tests: each starts from a valid input and breaks it in one way drawn
from a class of bad input (a column dropped, renamed or repeated; a dtype changed; a cell NaN, inf, negative,
huge, text, bytes, a list or undecodable text; a list's elements changed; a table emptied or its rows
repeated; a file truncated, corrupted, emptied, removed or replaced by a folder)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import strategies as st

from minigpt4.cli import main
from minigpt4.errors import DiffRecError

# One value per class of bad cell; a list column also receives them as elements.
BAD_VALUES = [
    None, np.nan, np.inf, -np.inf, -1, 0, 2**40, 2**63 - 1, 2.5, True, "text", "7", "", "\udcff undecodable",
    b"bytes", [1, 2], [[1]], {"a": 1}, [np.nan], ["x"], [], [2**70], np.array([[1, 2]]),
]  # fmt: skip
BAD_TOKENS = ["", "nan", "inf", "-1", "0", "1e400", "3.5", "abc", "99999999999999999999", "\x00", "1::2", "|", "\t"]


@st.composite
def mutated_frame(draw: st.DrawFn, frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``frame`` with one mutation; returns it and the mutation's name (for the failure report)."""
    frame = frame.copy()
    columns = list(frame.columns)
    kind = draw(
        st.sampled_from(["drop", "rename", "repeat column", "dtype", "cell", "element", "empty", "repeat rows"])
    )
    column = draw(st.sampled_from(columns))
    if kind == "drop":
        return frame.drop(columns=[column]), f"drop {column}"
    if kind == "rename":
        return frame.rename(columns={column: f"{column}_x"}), f"rename {column}"
    if kind == "repeat column":
        return pd.concat([frame, frame[[column]]], axis=1), f"repeat column {column}"
    if kind == "empty":
        return frame.iloc[:0], "empty"
    if kind == "repeat rows":
        return pd.concat([frame, frame], ignore_index=True), "repeat rows"
    if kind == "dtype":
        to = draw(st.sampled_from(["str", "float", "bool", "bytes"]))
        converters: dict[str, Callable] = {
            "str": lambda s: s.map(str),
            "float": lambda s: pd.to_numeric(s, errors="coerce").astype(float),
            "bool": lambda s: s.map(lambda value: bool(np.size(value)) if np.ndim(value) else bool(value)),
            "bytes": lambda s: s.map(lambda value: str(value).encode()),
        }
        frame[column] = converters[to](frame[column])
        return frame, f"{column} as {to}"
    row = draw(st.integers(0, max(len(frame) - 1, 0)))
    value = draw(st.sampled_from(BAD_VALUES))
    if frame.empty:
        return frame, "empty"
    cells = np.empty(len(frame), dtype=object)
    cells[:] = list(frame[column])
    cell = cells[row]
    if kind == "element" and isinstance(cell, (list, tuple, np.ndarray)):
        elements = list(cell)
        if elements and draw(st.booleans()):
            elements[draw(st.integers(0, len(elements) - 1))] = value
        else:
            elements.append(value)
        cells[row], what = elements, f"{column}[{row}] element {value!r}"
    else:
        cells[row], what = value, f"{column}[{row}] = {value!r}"
    frame[column] = pd.Series(cells, index=frame.index, dtype=object)
    return frame, what


@st.composite
def mutated_text_table(draw: st.DrawFn, rows: list[list[str]], separator: str) -> tuple[str, str]:
    """A delimited text table with one row or field changed (a bad token, a field added or removed)."""
    rows = [list(row) for row in rows]
    row = draw(st.integers(0, len(rows) - 1))
    kind = draw(st.sampled_from(["token", "add field", "drop field", "drop all rows"]))
    if kind == "drop all rows":
        return "", kind
    if kind == "add field":
        rows[row].append("5")
    elif kind == "drop field":
        rows[row].pop()
    else:
        field = draw(st.integers(0, len(rows[row]) - 1))
        rows[row][field] = draw(st.sampled_from(BAD_TOKENS))
    return "".join(separator.join(fields) + "\n" for fields in rows), f"{kind} in row {row}"


@st.composite
def file_mutation(draw: st.DrawFn) -> Callable[[Path], str]:
    """A change to a file's bytes: truncated, a byte replaced, undecodable bytes inserted, emptied, removed, or
    replaced by a folder."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "empty", "remove", "folder"]))
    where = draw(st.floats(0, 1))
    byte = draw(st.integers(0, 255))

    def apply(path: Path) -> str:
        data = path.read_bytes()
        cut = int(where * len(data))
        if kind == "truncate":
            path.write_bytes(data[:cut])
        elif kind == "flip":
            path.write_bytes(data[:cut] + bytes([byte]) + data[cut + 1 :])
        elif kind == "insert":
            path.write_bytes(data[:cut] + b"\xff\xfe" + data[cut:])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "remove":
            path.unlink()
        else:
            path.unlink()
            path.mkdir()
        return f"{kind} {path.name} at {cut}"

    return apply


@st.composite
def mutated_json(draw: st.DrawFn, value: object) -> tuple[object, str]:
    """A JSON-like value with one key removed or one leaf replaced by a bad value (or a container of another type)."""
    paths = []

    def walk(node: object, path: tuple) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, (*path, key))
        elif isinstance(node, list):
            for index, child in enumerate(node[:3]):
                walk(child, (*path, index))

    walk(value, ())
    path = draw(st.sampled_from(paths))
    replacement = draw(
        st.sampled_from(
            [None, -1, 0, 2**70, 1.5, float("nan"), float("inf"), "text", "", [], {}, True, [1, "x"], "\udcff"]
        )
    )
    remove = bool(path) and draw(st.booleans())
    value = json.loads(json.dumps(value))
    if not path:
        return replacement, f"whole value = {replacement!r}"
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if remove and isinstance(parent, dict):
        del parent[path[-1]]
        return value, f"drop {'.'.join(map(str, path))}"
    parent[path[-1]] = replacement
    return value, f"{'.'.join(map(str, path))} = {replacement!r}"


def write_frame(draw: st.DrawFn, frame: pd.DataFrame, path: Path, why: str) -> str:
    """Write a mutated table as Parquet; a mutation Parquet cannot hold (a repeated column name, mixed types, a
    lone surrogate) is replaced by a corruption of the file's bytes, named in the returned description."""
    try:
        frame.to_parquet(path, index=False)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as err:
        return f"{why}, unwritable ({type(err).__name__}), so: {draw(file_mutation())(path)}"
    return why


def write_text_tables(
    draw: st.DrawFn, folder: Path, tables: dict[str, tuple[list[list[str]], str, str]]
) -> tuple[Path, str]:
    """Write delimited text files (name -> rows, separator, encoding), one of them mutated as a table and, at
    times, at the byte level too; returns the mutated file and what was done."""
    target = draw(st.sampled_from(sorted(tables)))
    for name, (rows, separator, encoding) in tables.items():
        text = "".join(separator.join(fields) + "\n" for fields in rows)
        if name == target:
            text, why = draw(mutated_text_table(rows, separator))
        (folder / name).write_text(text, encoding=encoding, errors="replace")
    if draw(st.booleans()):
        why = draw(file_mutation())(folder / target)
    return folder / target, why


def run_command(argv: list[str]) -> tuple[int, str]:
    """``diffrec argv`` in this process: its exit code and stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, stderr.getvalue()


def check_refused_or_valid(
    code: int, stderr: str, sources: list[Path], out: Path, workdir: Path, validate: Callable[[Path], object], why: str
) -> None:
    """The fuzz property of a command: exit 2 with exactly one stderr line naming one of the source files (or
    their folder) and nothing written, or exit 0 with an output that passes the contract's own validation."""
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, f"{why}: {stderr}"
        assert any(str(path) in lines[0] for path in sources), f"{why}: the error names no source file: {lines[0]}"
        assert not out.exists(), f"{why}: {out} was written"
        leftovers = [path.name for path in workdir.iterdir() if path.name.startswith(out.name)]
        assert not leftovers, f"{why}: left behind {leftovers}"
    else:
        assert code == 0, f"{why}: exit {code}: {stderr}"
        validate(out)


def check_loader(load: Callable[[], object], sources: list[Path], why: str) -> None:
    """The fuzz property of a loader: it returns, or raises one DiffRecError of one line naming a source file;
    any other exception fails the test with the mutation that caused it."""
    try:
        load()
    except DiffRecError as err:
        message = str(err)
        assert "\n" not in message, f"{why}: {message}"
        assert any(str(path) in message for path in sources), f"{why}: the error names no source file: {message}"


def copy_tree(source: Path, target: Path) -> Path:
    """A fresh copy of a valid input to mutate."""
    shutil.copytree(source, target)
    return target

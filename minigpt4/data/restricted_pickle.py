"""Reading the pickles published by CoLLM and the seed repositories without running arbitrary code.

Only the pandas, NumPy, SciPy (and pandas' Arrow) data classes those files need may be named; any other global refuses the
whole file.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

from minigpt4.errors import DiffRecError, first_line

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", "slice"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("collections", "OrderedDict"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("pandas", "DataFrame"),
        ("pandas", "Series"),
        ("pandas", "Index"),
        ("pandas", "RangeIndex"),
        ("pandas", "StringDtype"),
        ("pandas.arrays", "ArrowStringArray"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.series", "Series"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.internals.managers", "SingleBlockManager"),
        # pandas 3 stores string columns as Arrow arrays rebuilt from raw buffers.
        ("pyarrow.lib", "_restore_array"),
        ("pyarrow.lib", "py_buffer"),
        ("pyarrow.lib", "type_for_alias"),
        ("scipy.sparse._coo", "coo_matrix"),
        ("scipy.sparse._csr", "csr_matrix"),
    }
)
# Older pickles name modules that NumPy and SciPy have since renamed.
RENAMED_MODULES = {
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
    "scipy.sparse.coo": "scipy.sparse._coo",
    "scipy.sparse.csr": "scipy.sparse._csr",
}


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that admits only ``ALLOWED_GLOBALS`` and checks every NumPy array and dtype state before NumPy
    builds it. It is pickle's Python implementation, the one whose opcodes can be overridden: NumPy trusts a
    pickled array's shape, dtype and data to agree, and a corrupt file where they do not can crash the process
    inside ``ndarray.__setstate__`` (an object array's shape larger than its list of values, say)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global, or refuse the file naming the class."""
        module = RENAMED_MODULES.get(module, module)
        if (module, name) not in ALLOWED_GLOBALS:
            raise DiffRecError(
                f"{self.source}: refusing to unpickle '{module}.{name}'; only pandas/numpy/scipy data "
                "classes are allowed in dataset pickles"
            )
        checked = {
            ("pyarrow.lib", "_restore_array"): _validated_arrow_array,
            ("numpy._core.numeric", "_frombuffer"): _checked_frombuffer,
            ("numpy._core.multiarray", "scalar"): _checked_scalar,
        }
        return checked.get((module, name)) or getattr(importlib.import_module(module), name)

    def load_build(self) -> None:
        """BUILD, after checking the state of an array or dtype."""
        import numpy as np

        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.ndarray):
            _check_array_state(state)
        elif isinstance(target, np.dtype) and not (
            isinstance(state, tuple) and len(state) >= 5 and state[3] is None and state[4] is None
        ):
            raise ValueError("a structured or malformed dtype state")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _element_count(shape: Any) -> int:
    """The number of elements of a pickled shape: a tuple of non-negative ints."""
    if not isinstance(shape, tuple) or not all(isinstance(size, int) and 0 <= size < 2**40 for size in shape):
        raise ValueError(f"an array shape {shape!r:.40}")
    count = 1
    for size in shape:
        count *= size
    return count


def _check_array_state(state: Any) -> None:
    """An ndarray's pickled state (version, shape, dtype, fortran order, data) whose data fills its shape exactly."""
    import numpy as np

    if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[2], np.dtype):
        raise ValueError("a malformed array state")
    count, dtype, data = _element_count(state[1]), state[2], state[4]
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != count:
            raise ValueError(f"an object array of {count} elements holding {type(data).__name__} data")
    elif not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
        raise ValueError(
            f"an array of {count} x {dtype.itemsize} bytes holding {len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__}"
        )


def _checked_frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> Any:
    """NumPy's ``_frombuffer`` for a buffer that fills the shape exactly, never of objects."""
    import numpy as np
    from numpy._core.numeric import _frombuffer

    dtype = np.dtype(dtype)
    if dtype.hasobject or len(memoryview(buffer).cast("B")) != _element_count(shape) * dtype.itemsize:
        raise ValueError("a buffer that does not fill its array")
    return _frombuffer(buffer, dtype, shape, order)


def _checked_scalar(dtype: Any, *args: Any) -> Any:
    """NumPy's ``scalar`` for data of exactly the dtype's size (an object scalar is its object)."""
    import numpy as np
    from numpy._core.multiarray import scalar

    if not isinstance(dtype, np.dtype) or (
        not dtype.hasobject and not (len(args) == 1 and isinstance(args[0], bytes) and len(args[0]) == dtype.itemsize)
    ):
        raise ValueError("a scalar whose data does not match its dtype")
    return scalar(dtype, *args)


def _validated_arrow_array(*args: Any) -> Any:
    """pyarrow's ``_restore_array``, then a full validation: Arrow trusts the lengths and offsets in its buffers,
    and a corrupt pickle's can make it abort the process (std::bad_alloc) when the column is first read."""
    import pyarrow.lib

    array = pyarrow.lib._restore_array(*args)
    array.validate(full=True)  # ArrowInvalid (a ValueError) on inconsistent buffers, reported by the loader
    return array


def load_restricted_pickle(path: str | Path) -> Any:
    """Load a dataset pickle through ``RestrictedUnpickler``."""
    path = Path(path)
    if not path.is_file():
        raise DiffRecError(f"pickle file not found: {path}")
    with path.open("rb") as handle:
        try:
            value = RestrictedUnpickler(handle, str(path)).load()
            _check_structure(value)
            return value
        except DiffRecError:
            raise
        except Exception as err:  # allowed classes can fail in any way while being rebuilt from bad arguments
            raise DiffRecError(f"{path}: not a readable pickle ({type(err).__name__}: {first_line(err)})") from None


def _check_structure(value: Any) -> None:
    """Raise ValueError where an unpickled pandas frame or SciPy matrix is internally inconsistent. Their C and
    Cython code trusts what a pickle rebuilt (block placements, array lengths, index pointers), so a corrupt
    file could otherwise crash the process on first use instead of failing here."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    if isinstance(value, pd.Series):
        if len(value._mgr.blocks) != 1 or len(value._mgr.blocks[0].values) != len(value.index):
            raise ValueError("a series whose values and index differ in length")
    elif isinstance(value, pd.DataFrame):
        rows, placed = len(value.index), []
        for block in value._mgr.blocks:  # pandas' own structure: the only place a corrupt placement shows
            locs = np.asarray(block.mgr_locs.as_array)
            expected = (len(locs), rows) if block.values.ndim == 2 else (rows,)
            if block.values.shape != expected or (block.values.ndim == 1 and len(locs) != 1):
                raise ValueError(f"a block of shape {block.values.shape} placed at {len(locs)} columns of {rows} rows")
            placed.append(locs)
        placed = np.sort(np.concatenate(placed)) if placed else np.zeros(0, dtype=np.int64)
        if not np.array_equal(placed, np.arange(len(value.columns))):
            raise ValueError("block placements that do not cover the columns once each")
    elif sp.issparse(value):
        if value.format in ("csr", "csc"):
            value.check_format(full_check=True)
        elif value.format == "coo" and not len(value.row) == len(value.col) == len(value.data):
            raise ValueError("row, col and data of different lengths")

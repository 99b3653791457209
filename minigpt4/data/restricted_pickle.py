"""Reading the pickles published by CoLLM and the seed repositories without running arbitrary code.

Only the pandas, NumPy, SciPy (and pandas' Arrow) data classes those files need may be named; any other global refuses the
whole file.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

from minigpt4.errors import DiffRecError

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


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits only ``ALLOWED_GLOBALS``."""

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
        return getattr(importlib.import_module(module), name)


def load_restricted_pickle(path: str | Path) -> Any:
    """Load a dataset pickle through ``RestrictedUnpickler``."""
    path = Path(path)
    if not path.is_file():
        raise DiffRecError(f"pickle file not found: {path}")
    with path.open("rb") as handle:
        try:
            return RestrictedUnpickler(handle, str(path)).load()
        except DiffRecError:
            raise
        except Exception as err:  # allowed classes can fail in any way while being rebuilt from bad arguments
            first = str(err).splitlines()[0] if str(err) else ""
            raise DiffRecError(f"{path}: not a readable pickle ({type(err).__name__}: {first})") from None

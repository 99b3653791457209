"""The one exception type for user errors (bad files, keys, values); the CLI turns it into exit code 2."""

from pathlib import Path


class DiffRecError(Exception):
    """A user-facing error: the message names the file, key or row and what was expected."""


def require_file(path: str | Path) -> Path:
    """``path`` as a Path, or a DiffRecError naming it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise DiffRecError(f"{path}: file not found")
    return path

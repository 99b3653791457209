"""The one exception type for user errors (bad files, keys, values); the CLI turns it into exit code 2."""

from pathlib import Path


class DiffRecError(Exception):
    """A user-facing error: the message names the file, key or row and what was expected. It is always one line
    (a library's multi-line message quoted in it is joined), since the CLI prints it as one."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), to quote in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def require_file(path: str | Path) -> Path:
    """``path`` as a Path, or a DiffRecError naming it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise DiffRecError(f"{path}: file not found")
    return path

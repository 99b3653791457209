"""The one exception type for user errors (bad files, keys, values); the CLI turns it into exit code 2."""


class DiffRecError(Exception):
    """A user-facing error: the message names the file, key or row and what was expected."""

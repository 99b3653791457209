"""What the libraries underneath may print: errors only, and no per-file progress bars.

transformers and diffusers report, as warnings, things a DiffRec user cannot act on (a checkpoint's unused
pooler weights, a pipeline component that is absent by design and so "cannot be saved"); DiffRec's own
log, progress bars and errors stay as they are.
"""

from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """Silence the model libraries' warnings and loading bars for this process."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)

"""Where the product keeps what it downloads or computes: one environment variable and one user cache folder.

Set ``ROBUSTMEDSAM_CACHE_DIR`` to move everything (checkpoints directly inside it, the embedding cache in
``embeddings/``); otherwise the platform's user cache folder for ``napari-robustmedsam`` holds ``checkpoints/``
and ``embeddings/``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ROBUSTMEDSAM_CACHE_DIR"
APP_NAME = "napari-robustmedsam"


def cache_override() -> Path | None:
    """The folder named by ``$ROBUSTMEDSAM_CACHE_DIR`` (``None`` when unset or empty)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else None


def user_cache_root() -> Path:
    """The platform's user cache folder for this application (platformdirs)."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir(APP_NAME))

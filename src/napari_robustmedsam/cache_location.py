"""Where the product keeps what it downloads or computes: one environment variable and one user cache folder.

Set ``ROBUSTMEDSAM_CACHE_DIR`` to move everything (checkpoints directly inside it, the embedding cache in
``embeddings/``, the annotator's autosaves in ``autosave/``); otherwise the platform's user cache folder for
``napari-robustmedsam`` holds ``checkpoints/`` and ``embeddings/``, and its user data folder holds ``autosave/``.
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


def autosave_root() -> Path:
    """Where the annotator's autosaves go: ``$ROBUSTMEDSAM_CACHE_DIR/autosave``, else the platform's user *data*
    folder (not the cache folder, which systems may empty: these are the user's labels)."""
    override = cache_override()
    if override is not None:
        return override / "autosave"
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME)) / "autosave"

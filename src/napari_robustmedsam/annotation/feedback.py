"""What the annotator tells the user after a prompt, and how committed objects are coloured (no Qt here)."""

from __future__ import annotations

import colorsys

import numpy as np

# Committed objects cycle through these: saturated, bright, far apart in hue, none brown or dark (medical images
# are mostly gray, brown or dark red), and none magenta, the colour of the object being segmented.
COMMITTED_COLORS = (
    "#00e5ff",  # cyan
    "#ffea00",  # yellow
    "#76ff03",  # lime
    "#2979ff",  # blue
    "#ff1744",  # red
    "#ff9100",  # orange
    "#1de9b6",  # aquamarine
    "#ffffff",  # white
)
CURRENT_COLOR = "#ff00ff"


def rgba(color: str) -> tuple[float, float, float, float]:
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) / 255 for i in (0, 2, 4)) + (1.0,)  # type: ignore[return-value]


def is_brownish(color: str) -> bool:
    """Orange-to-red hues at low brightness or saturation: what a lesion, skin or a dark background looks like."""
    h, s, v = colorsys.rgb_to_hsv(*rgba(color)[:3])
    return 0.0 <= h * 360 <= 45 and (v < 0.75 or s < 0.5) and not (s < 0.1 and v > 0.9)


def describe_change(before: np.ndarray | None, after: np.ndarray) -> str:
    """One phrase saying what a prompt changed on a slice: pixels added / removed, or that nothing changed."""
    after = np.asarray(after, bool)
    if before is None or not np.asarray(before).any():
        return f"{int(after.sum())} px"
    before = np.asarray(before, bool)
    added = int((after & ~before).sum())
    removed = int((before & ~after).sum())
    if added == 0 and removed == 0:
        return f"{int(after.sum())} px, unchanged by this prompt (click closer to the error, or press B)"
    parts = [f"+{added} px" if added else "", f"-{removed} px" if removed else ""]
    return f"{int(after.sum())} px ({' / '.join(p for p in parts if p)})"


def describe_commit(result) -> str:
    """The status line after a commit (``result``: the session's CommitResult). A piece added under a value that
    already has an object says what it added and how many commits the object has now; a correction of an object
    started from its label replaces it and keeps the plain wording."""
    kept = f"; {result.n_kept} px already belonged to other objects and were kept" if result.n_kept else ""
    if result.n_commits > 1 and not result.correction:
        return (f"Added {result.n_added} px to object {result.label_id} (now {result.n_pixels} px from "
                f"{result.n_commits} commits){kept}. U undoes.")
    return f"Committed object {result.label_id} ({result.n_pixels} px){kept}. U undoes."


def describe_undo(kind: str | None, label_id: int | None) -> str:
    """The status line after U (``kind``: what the session's undo took back, read before undoing)."""
    if label_id is None:
        return "Nothing to undo."
    if kind == "replace":
        return "Undid the resume: the objects committed before it are back."
    if kind == "remove":
        return f"Brought back object {label_id}."
    return f"Undid the commit of object {label_id}."

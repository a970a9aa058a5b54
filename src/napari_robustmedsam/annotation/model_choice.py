"""Which model to suggest for the user's situation, from what the shipped heads measured.

Use: ``robust_head_suggestion(current_model_name)`` gives one line (with a link the panel turns into a model load)
when the user looks at degraded images with the box-only base model, else "". The figures come from the shipped
heads' manifest (held-out development images at LQ-3, the annotator's click policy), never from literals here.
"""

from __future__ import annotations

from .. import heads

#: the models a robust head improves on: the base LiteMedSAM, as shipped or with untrained robust parts
BASE_MODELS = ("litemedsam", "litemedsam_robust", None)
SUGGESTED_HEAD = "robust-lite"
LEVEL, POLICY = "LQ-3", "annotator"


def robust_head_suggestion(current: str | None) -> str:
    """A one-line suggestion of the shipped robust head with its measured gain, or "" when there is none to make."""
    if current not in BASE_MODELS:
        return ""
    figures = (heads.entry(SUGGESTED_HEAD).get("heldout") or {}).get(POLICY) or {}
    head, base = figures.get(SUGGESTED_HEAD, {}).get(LEVEL), figures.get("litemedsam", {}).get(LEVEL)
    if not head or not base:
        return ""
    return (f"On degraded images the <a href='{SUGGESTED_HEAD}'>{SUGGESTED_HEAD}</a> head kept more: on held-out "
            f"development images at {LEVEL}, box Dice {head['box']:.2f} vs {base['box']:.2f}, 3 points "
            f"{head['points3']:.2f} vs {base['points3']:.2f}, after 5 clicks {head['clicks5']:.2f} vs "
            f"{base['clicks5']:.2f} (LiteMedSAM). Click its name to load it.")

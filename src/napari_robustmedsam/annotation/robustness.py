"""How much would this mask change under realistic artifacts? Segment-on-degraded and the robustness sweep.

Both reuse the user's prompts of one slice as they are, on a degraded copy of the slice with its own
embedding, and compare with the mask the same prompts give on the clean slice (prompts only, no previous
logits on either side, so the comparison is like for like). The Dice between the clean and the degraded
mask says how stable the annotation is; no ground truth is needed.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserFacingError
from .slice_embeddings import Cancelled
from .prompt_decoding import segment_slice
from .session import SlicePrompts

SWEEP_LEVELS = ("LQ-1", "LQ-2", "LQ-3")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(a & b)) / denom


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def degrade_slice(
    image: np.ndarray,
    name: str,
    level: str | None = None,
    severity: float | None = None,
    seed: int = 0,
    modality: str | None = None,
) -> np.ndarray:
    """One 2D slice (gray or RGB) degraded by one type at a level or a continuous severity."""
    from ..degradations import degrade

    if level is None and severity is None:
        level = "LQ-3"
    if level is not None and severity is not None:
        raise UserFacingError("give a level or a severity, not both")
    if level is not None:
        return degrade(image, name, level, seed=int(seed), modality=modality)
    return degrade(image, name, severity=float(severity), seed=int(seed), modality=modality)


def prompts_only_mask(predictor, embedding, prompts: SlicePrompts, box_primary: bool = False) -> tuple[np.ndarray, float]:
    """The mask the prompts alone give on an embedding (no previous logits)."""
    result = segment_slice(predictor, embedding, prompts, box_primary=box_primary, use_previous_logits=False)
    return result.mask, result.score


@dataclass
class DegradedSegmentation:
    degradation: str
    level: str | None
    severity: float | None
    seed: int
    degraded_image: np.ndarray
    clean_mask: np.ndarray
    degraded_mask: np.ndarray
    dice: float
    iou: float
    clean_score: float
    degraded_score: float
    seconds: float = 0.0

    @property
    def setting(self) -> str:
        how = self.level if self.level is not None else f"severity {self.severity:.2f}"
        return f"{self.degradation} {how} seed {self.seed}"


def segment_on_degraded(
    predictor,
    image: np.ndarray,
    prompts: SlicePrompts,
    degradation: str,
    level: str | None = None,
    severity: float | None = None,
    seed: int = 0,
    modality: str | None = None,
    clean_embedding=None,
    degraded_image: np.ndarray | None = None,
    box_primary: bool = False,
    clean: tuple[np.ndarray, float] | None = None,
) -> DegradedSegmentation:
    """The user's prompts on the clean and on the degraded slice; Dice/IoU between the two masks."""
    t0 = time.perf_counter()
    if prompts.is_empty:
        raise UserFacingError("no prompts on this slice: segment an object first, then compare it under degradation")
    if degraded_image is None:
        degraded_image = degrade_slice(image, degradation, level, severity, seed, modality)
    if clean is None:
        if clean_embedding is None:
            clean_embedding = predictor.compute_embedding(image)
        clean = prompts_only_mask(predictor, clean_embedding, prompts, box_primary)
    degraded_embedding = predictor.compute_embedding(degraded_image)
    mask, score = prompts_only_mask(predictor, degraded_embedding, prompts, box_primary)
    clean_mask, clean_score = clean
    return DegradedSegmentation(
        degradation=degradation,
        level=level,
        severity=severity,
        seed=int(seed),
        degraded_image=degraded_image,
        clean_mask=clean_mask,
        degraded_mask=mask,
        dice=_dice(clean_mask, mask),
        iou=_iou(clean_mask, mask),
        clean_score=float(clean_score),
        degraded_score=float(score),
        seconds=time.perf_counter() - t0,
    )


@dataclass
class SweepTable:
    """Dice / IoU of the degraded vs the clean mask for every (type, level) of a sweep."""

    types: list[str]
    levels: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    clean_area: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def matrix(self, metric: str = "dice") -> np.ndarray:
        out = np.full((len(self.types), len(self.levels)), np.nan)
        for row in self.rows:
            if row["type"] in self.types and row["level"] in self.levels:
                out[self.types.index(row["type"]), self.levels.index(row["level"])] = row[metric]
        return out

    def worst(self, n: int = 3) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: r["dice"])[:n]

    def mean_by_level(self, metric: str = "dice") -> dict[str, float]:
        m = self.matrix(metric)
        return {lvl: float(np.nanmean(m[:, j])) if np.isfinite(m[:, j]).any() else float("nan")
                for j, lvl in enumerate(self.levels)}

    def to_csv_text(self) -> str:
        buf = io.StringIO()
        cols = ["type", "level", "dice", "iou", "clean_score", "degraded_score", "clean_area", "degraded_area", "seconds"]
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        return buf.getvalue()

    def to_markdown(self, metric: str = "dice") -> str:
        m = self.matrix(metric)
        lines = ["| type | " + " | ".join(self.levels) + " |", "|---|" + "---|" * len(self.levels)]
        for i, t in enumerate(self.types):
            lines.append(f"| {t} | " + " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in m[i]) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"types": self.types, "levels": self.levels, "rows": self.rows, "clean_area": self.clean_area,
                "meta": self.meta}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the table as .csv (default) or .json, atomically; an existing file only with ``overwrite``."""
        from ..io import atomic_write_path
        from ..io.output_paths import check_output

        p = check_output(path, overwrite=overwrite)
        text = json.dumps(self.to_json(), indent=1) if p.suffix.lower() == ".json" else self.to_csv_text()
        with atomic_write_path(p) as tmp:
            tmp.write_text(text)
        return p

    def plot_png(self, metric: str = "dice", width_px: int = 420) -> bytes:
        """A small heat map (types x levels) of the metric as PNG bytes (matplotlib, Agg)."""
        from matplotlib.figure import Figure

        m = self.matrix(metric)
        h_in = 0.8 + 0.22 * max(1, len(self.types))
        fig = Figure(figsize=(width_px / 100, h_in), dpi=100)
        ax = fig.add_subplot(111)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(self.levels)), self.levels, fontsize=7)
        ax.set_yticks(range(len(self.types)), self.types, fontsize=7)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{metric.capitalize()} degraded vs clean mask", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()


def sweep_types(modality: str | None = None) -> list[str]:
    """The degradation types a sweep covers by default: the modality's general + modality-specific sets."""
    from ..degradations import list_degradations, modality_degradations

    if modality is None:
        return list_degradations()
    groups = modality_degradations(modality)
    names = list(dict.fromkeys([*groups["general"], *groups["modality"]]))
    valid = set(list_degradations())
    return [n for n in names if n in valid]


def sweep_levels(modality: str | None = None) -> list[str]:
    """LQ-1..LQ-3, plus LQ-3+ when the modality has domain artifacts (LQ-3+ adds them)."""
    levels = list(SWEEP_LEVELS)
    if modality is not None:
        from ..degradations import modality_degradations

        if modality_degradations(modality)["domain"]:
            levels.append("LQ-3+")
    return levels


def robustness_sweep(
    predictor,
    image: np.ndarray,
    prompts: SlicePrompts,
    types: Sequence[str] | None = None,
    levels: Sequence[str] | None = None,
    modality: str | None = None,
    seed: int = 0,
    clean_embedding=None,
    box_primary: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> SweepTable:
    """Run the prompts over every type x level; each cell is one degraded image and one encoder pass."""
    types = list(types) if types is not None else sweep_types(modality)
    levels = list(levels) if levels is not None else sweep_levels(modality)
    if not types or not levels:
        raise UserFacingError("the sweep needs at least one degradation type and one level")
    if "LQ-3+" in levels and modality is None:
        raise UserFacingError("level LQ-3+ adds the modality's domain artifacts: choose a modality first")
    if clean_embedding is None:
        clean_embedding = predictor.compute_embedding(image)
    clean = prompts_only_mask(predictor, clean_embedding, prompts, box_primary)
    table = SweepTable(types=types, levels=levels, clean_area=int(clean[0].sum()),
                       meta={"seed": int(seed), "modality": modality, "prompts": prompts.to_json()})
    total = len(types) * len(levels)
    done = 0
    for name in types:
        for level in levels:
            if is_cancelled is not None and is_cancelled():
                raise Cancelled(f"sweep cancelled after {done} of {total} settings")
            res = segment_on_degraded(predictor, image, prompts, name, level=level, seed=seed, modality=modality,
                                      box_primary=box_primary, clean=clean)
            table.rows.append({
                "type": name, "level": level, "dice": res.dice, "iou": res.iou,
                "clean_score": res.clean_score, "degraded_score": res.degraded_score,
                "clean_area": int(res.clean_mask.sum()), "degraded_area": int(res.degraded_mask.sum()),
                "seconds": res.seconds,
            })
            done += 1
            if progress is not None:
                progress(done, total, f"{name} {level}: Dice {res.dice:.3f}")
    return table

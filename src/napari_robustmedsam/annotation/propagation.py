"""3D propagation: segment one object through a volume slice by slice from its annotated slices.

The idea follows micro_sam's ``segment_mask_in_volume`` (prompts derived from the neighbour slice's mask,
stop when consecutive masks stop overlapping); the implementation is ours and runs on any
:class:`~napari_robustmedsam.engine.predictor.Predictor`.

- Seeds are the slices the user segmented (prompts of source "user"). Outwards from the lowest and the
  highest seed, each slice is prompted from its neighbour's result: the neighbour's box (optionally grown by
  ``box_extension``), its mask as a low-resolution mask prompt (``mask``) or the neighbour's own
  low-resolution logits as the mask prompt (``logits``: the decoder sees how sure it was, not only where),
  and/or positive points at its interior (distance-transform maxima). Propagation in a direction stops when
  the mask is empty, when the IoU between the new mask and its neighbour falls below ``iou_threshold``, when
  the model's predicted IoU of the new mask falls below ``min_score``, or at the end of the volume; the slice
  that failed stays empty. The defaults were chosen by measurement (docs/results/propagation/).
- Between two seeds every slice is filled from both ends towards the middle (no stop: the user said the
  object is there at both ends); a slice equidistant from both gets the union of its two neighbours.
- A seed with an empty mask marks the end of the object: nothing is propagated past it.
- Re-propagation after a correction (``changed_seeds``) recomputes only the stretches next to the changed
  seeds and keeps every other slice as it was.

The slice segmenter is passed in (``segment(z, box, points, point_labels, mask) -> (mask, logits, score)``),
so this module needs neither torch nor the model and is reused by the evaluation CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from ..engine.focus_crop import CropPlan, FocusCrop, plan_crop
from .slice_embeddings import Cancelled

PROMPT_MODES = ("box", "mask", "points", "box+mask", "box+points", "points+mask", "box+points+mask",
                "box+logits", "box+points+logits")
DEFAULT_PROMPT_MODE = "box+mask"
DEFAULT_IOU_THRESHOLD = 0.5
DEFAULT_MIN_SCORE = 0.8  # chosen by docs/results/propagation/rule.md (0 = off)

# segment(z, box, points, point_labels, mask_prompt[, logits]) -> (mask (H, W) bool, logits or None, score);
# ``logits`` (the neighbour's low-resolution logits) is passed only by the modes that use them
SegmentFn = Callable[..., tuple[np.ndarray, object, float]]


@dataclass(frozen=True)
class PropagationSettings:
    """How each slice is prompted from its neighbour and when a direction stops (the keyword arguments of
    :func:`propagate_object`); the defaults are the annotator's and the evaluation's ``propagate_3d``."""

    prompt_mode: str = DEFAULT_PROMPT_MODE
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    min_score: float = DEFAULT_MIN_SCORE
    box_extension: float = 0.0

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass
class DerivedPrompt:
    box: np.ndarray | None
    points: np.ndarray | None
    point_labels: np.ndarray | None
    mask: np.ndarray | None  # (H, W) bool, the neighbour mask used as a mask prompt
    use_logits: bool = False  # the neighbour's low-resolution logits are the mask prompt (``mask`` is their fallback)


@dataclass
class SliceInfo:
    z: int
    source: str  # "seed", "propagated", "kept"
    from_slice: int | None = None
    iou_neighbour: float | None = None
    score: float | None = None
    area: int = 0
    prompt: DerivedPrompt | None = None


@dataclass
class PropagationResult:
    masks: np.ndarray  # (Z, Y, X) bool: the object on every slice
    logits: dict[int, object] = field(default_factory=dict)
    slices: dict[int, SliceInfo] = field(default_factory=dict)
    z_range: tuple[int, int] = (0, 0)  # first and last slice with a non-empty mask
    stopped: dict[str, str] = field(default_factory=dict)  # "down"/"up" -> why it stopped

    @property
    def propagated(self) -> list[int]:
        return sorted(z for z, s in self.slices.items() if s.source == "propagated" and s.area > 0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def interior_points(mask: np.ndarray, n: int = 1) -> np.ndarray:
    """Up to ``n`` well-separated interior points (x, y) of a mask: distance-transform maxima."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    points = []
    d = dist.copy()
    for _ in range(n):
        if d.max() <= 0:
            break
        y, x = np.unravel_index(int(np.argmax(d)), d.shape)
        points.append((float(x), float(y)))
        r = max(2.0, dist[y, x])
        yy, xx = np.ogrid[: d.shape[0], : d.shape[1]]
        d[(yy - y) ** 2 + (xx - x) ** 2 <= (2 * r) ** 2] = 0
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def derive_prompt(mask: np.ndarray, mode: str = DEFAULT_PROMPT_MODE, box_extension: float = 0.0,
                  n_points: int = 1) -> DerivedPrompt:
    """Prompts for the next slice from a neighbour slice's mask (see the module docstring)."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown propagation prompt mode {mode!r}; expected one of {', '.join(PROMPT_MODES)}")
    parts = set(mode.split("+"))
    box = points = labels = mask_prompt = None
    ys, xs = np.nonzero(mask)
    if "box" in parts:
        h, w = mask.shape
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        gx, gy = box_extension * (x1 - x0), box_extension * (y1 - y0)
        box = np.array([max(0, x0 - gx), max(0, y0 - gy), min(w, x1 + gx), min(h, y1 + gy)], dtype=np.float64)
    if "points" in parts:
        points = interior_points(mask, n_points)
        labels = np.ones(points.shape[0], np.int64)
    if "mask" in parts or "logits" in parts:
        mask_prompt = mask
    return DerivedPrompt(box, points, labels, mask_prompt, use_logits="logits" in parts)


def propagate_object(
    segment: SegmentFn,
    n_slices: int,
    seeds: dict[int, np.ndarray],
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    prompt_mode: str = DEFAULT_PROMPT_MODE,
    box_extension: float = 0.0,
    existing: np.ndarray | None = None,
    changed_seeds: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    min_area: int = 1,
    min_score: float = DEFAULT_MIN_SCORE,
    seed_logits: dict[int, object] | None = None,
) -> PropagationResult:
    """Propagate an object from its seed masks ``{z: (H, W) bool}`` through ``n_slices`` slices.

    ``seed_logits`` ``{z: low-res logits}``: the seeds' own logits, the mask prompt of their neighbours in the
    ``logits`` modes (a seed without them is prompted with its binary mask instead).
    ``existing`` (Z, Y, X) + ``changed_seeds``: re-propagate only the stretches touching the changed seeds
    (a correction), keeping the other slices of ``existing``. Raises :class:`Cancelled` when
    ``is_cancelled()`` turns true (nothing is returned then, so callers keep their previous state).

    Long on purpose: the stretches share the masks, the logits known so far, the progress count and the stop
    rules through the closures below (``step``, ``run_open``); split into separate functions they would pass all
    of these between them.
    """
    if not seeds:
        raise ValueError("propagation needs at least one segmented slice")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score must be in [0, 1], got {min_score}")
    zs = sorted(int(z) for z in seeds)
    if zs[0] < 0 or zs[-1] >= n_slices:
        raise ValueError(f"seed slices {zs} outside 0..{n_slices - 1}")
    plane = np.asarray(seeds[zs[0]]).shape
    masks = np.zeros((n_slices, *plane), bool) if existing is None else np.array(existing, dtype=bool)
    if masks.shape != (n_slices, *plane):
        raise ValueError(f"existing masks of shape {masks.shape} do not match ({n_slices}, {plane})")
    result = PropagationResult(masks=masks)
    # the logits each slice's neighbours may be prompted with (the seeds' own, then each propagated slice's)
    known_logits: dict[int, object] = {int(z): v for z, v in (seed_logits or {}).items() if v is not None}
    for z in zs:
        m = np.asarray(seeds[z]).astype(bool)
        masks[z] = m
        result.slices[z] = SliceInfo(z, "seed", area=int(m.sum()))

    changed = set(zs) if changed_seeds is None or existing is None else {int(z) for z in changed_seeds}
    # stretches to compute: ("open", seed, exclusive end, direction) outwards, ("between", seed a, seed b, 0)
    tasks: list[tuple[str, int, int, int]] = []  # (kind, start, stop, step)
    if zs[0] in changed and zs[0] > 0:
        tasks.append(("open", zs[0], -1, -1))
    if zs[-1] in changed and zs[-1] < n_slices - 1:
        tasks.append(("open", zs[-1], n_slices, 1))
    for a, b in zip(zs[:-1], zs[1:]):
        if b - a > 1 and (a in changed or b in changed):
            tasks.append(("between", a, b, 0))
    total = sum(abs(stop - start) - 1 for _, start, stop, _ in tasks)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, max(total, done))

    def check_cancel() -> None:
        if is_cancelled is not None and is_cancelled():
            raise Cancelled("propagation cancelled")

    def step(z: int, neighbour: int, prompt_mask: np.ndarray, two_sided: bool = False) -> tuple[np.ndarray, float, float]:
        prompt = derive_prompt(prompt_mask, prompt_mode, box_extension)
        neighbour_logits = known_logits.get(neighbour) if prompt.use_logits and not two_sided else None
        if neighbour_logits is not None:
            mask, logits, score = segment(z, prompt.box, prompt.points, prompt.point_labels, prompt.mask,
                                          neighbour_logits)
        else:
            mask, logits, score = segment(z, prompt.box, prompt.points, prompt.point_labels, prompt.mask)
        mask = np.asarray(mask).astype(bool)
        overlap = iou(mask, masks[neighbour])
        result.logits[z] = logits
        if logits is not None:
            known_logits[z] = logits
        result.slices[z] = SliceInfo(z, "propagated", neighbour, overlap, float(score), int(mask.sum()), prompt)
        return mask, overlap, float(score)

    def run_open(start: int, stop: int, direction: int) -> str:
        """From seed ``start`` towards ``stop`` (exclusive) with the stop criteria; return why it stopped."""
        if not masks[start].any():
            return f"slice {start} is marked as the end of the object"
        z = start + direction
        while z != stop:
            check_cancel()
            mask, overlap, score = step(z, z - direction, masks[z - direction])
            tick()
            if mask.sum() < min_area:
                result.slices[z].area = 0
                return f"empty mask at slice {z}"
            if overlap < iou_threshold:
                result.slices[z].area = 0
                return f"IoU {overlap:.2f} < {iou_threshold:.2f} between slices {z - direction} and {z}"
            if score < min_score:
                result.slices[z].area = 0
                return f"predicted IoU {score:.2f} < {min_score:.2f} at slice {z}"
            masks[z] = mask
            z += direction
        return "reached the end of the volume" if stop in (-1, n_slices) else f"reached the seed at slice {stop}"

    for kind, start, stop, direction in tasks:
        if kind == "open":
            # clear what an earlier propagation left beyond this seed: it is recomputed now
            masks[slice(0, start) if direction < 0 else slice(start + 1, n_slices)] = False
            result.stopped["down" if direction < 0 else "up"] = run_open(start, stop, direction)
            continue
        a, b = start, stop
        masks[a + 1 : b] = False
        a_on, b_on = bool(masks[a].any()), bool(masks[b].any())
        if a_on and not b_on:  # b marks the end: propagate up from a with the stop criteria
            result.stopped[f"{a}-{b}"] = run_open(a, b, 1)
        elif b_on and not a_on:
            result.stopped[f"{a}-{b}"] = run_open(b, a, -1)
        elif a_on and b_on:  # the object is there at both ends: fill from both sides, no stop
            lo, hi = a + 1, b - 1
            while lo < hi:
                check_cancel()
                masks[lo] = step(lo, lo - 1, masks[lo - 1])[0]
                tick()
                masks[hi] = step(hi, hi + 1, masks[hi + 1])[0]
                tick()
                lo, hi = lo + 1, hi - 1
            if lo == hi:
                check_cancel()
                masks[lo] = step(lo, lo - 1, masks[lo - 1] | masks[lo + 1], two_sided=True)[0]
                tick()

    if progress is not None:
        progress(total, total)
    nonzero = np.nonzero(masks.reshape(n_slices, -1).any(axis=1))[0]
    result.z_range = (int(nonzero[0]), int(nonzero[-1])) if nonzero.size else (zs[0], zs[0])
    return result


def predictor_segment_fn(predictor, embeddings, multimask_output: bool | None = None,
                         focus_crop: FocusCrop | None = None, embed_crop=None) -> SegmentFn:
    """A :data:`SegmentFn` over a :class:`~napari_robustmedsam.engine.predictor.Predictor` and the
    per-slice embeddings of :class:`~napari_robustmedsam.annotation.slice_embeddings.SliceEmbeddings`.

    ``focus_crop`` (with ``embed_crop(z, plan) -> embedding of plan.crop(slice z)``): a slice whose prompt box
    (from its neighbour) is small is decoded in the box's focus crop (:mod:`..engine.focus_crop`) and its mask
    pasted back. The logits returned are in the frame they were decoded in; logits fed back from another frame
    (or from outside, which count as the whole slice) are replaced by the neighbour's mask as the mask prompt."""
    frames: dict[int, tuple[object, CropPlan | None]] = {}  # id(logits) -> (logits, their crop), this fn's own

    def frame_of(logits) -> CropPlan | None:
        entry = frames.get(id(logits))
        return entry[1] if entry is not None and entry[0] is logits else None

    def segment(z, box, points, point_labels, mask, logits=None):
        emb = embeddings.get(z)
        plan = None
        if focus_crop is not None and embed_crop is not None and box is not None:
            plan = plan_crop(box, tuple(getattr(emb, "frame", emb).original_size), focus_crop)
            if plan is not None and points is not None and not plan.contains_points(points):
                plan = None
        if plan is not None:
            emb = embed_crop(z, plan)
            box = plan.box_to_crop(box)
            points = None if points is None else plan.points_to_crop(points)
            mask = None if mask is None else plan.crop(mask)
        frame = getattr(emb, "frame", None)  # a tiled embedding has no single frame: no mask prompt then
        if frame is None:
            mask_input = None
        elif logits is not None and frame_of(logits) == plan:
            mask_input = logits
        else:
            mask_input = frame.mask_to_low_res(mask) if mask is not None else None
        if mask_input is None and box is None and points is None:
            box = derive_prompt(mask, "box").box
        prediction = predictor.predict(
            points=points, point_labels=point_labels, boxes=box, mask_input=mask_input, embedding=emb,
            multimask_output=multimask_output,
        )
        out_mask = prediction.masks[0] if plan is None else plan.paste(prediction.masks[0])
        out_logits = prediction.low_res_logits[:1]
        if plan is not None:
            frames[id(out_logits)] = (out_logits, plan)
        return out_mask, out_logits, float(prediction.scores[0])

    segment.crop_of = frame_of  # the focus crop logits returned by this fn were decoded in (None: the whole slice)
    return segment

"""Pieces the heads' training steps share (:mod:`.robust_step`, :mod:`.pge_step`): the sampled batch, and the
detached leaves that collect the gradients of every simulated interaction of an iteration for one backward pass
through the per-image part."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .losses import soft_dice
from .pairs import sample_variant
from .prompt_simulation import add_clicks, corrective_clicks, shown_logits


@dataclass
class SampledBatch:
    """One iteration's objects: (plane, variant) pairs of both branches and the ground truth, grouped by plane."""

    pairs_c: list[tuple[int, int]]
    pairs_d: list[tuple[int, int]]
    target: torch.Tensor  # (N, 1, 256, 256) bool
    valid: torch.Tensor  # (N, 1, 256, 256) bool
    gt_np: np.ndarray  # (N, 256, 256) bool
    scale: float  # model frame / low-resolution frame


def leaf_of(graph: torch.Tensor) -> torch.Tensor:
    """A detached copy that collects the gradients of every interaction of an iteration."""
    return graph.detach().requires_grad_(graph.requires_grad)


def backward_through_leaves(pairs) -> None:
    """Carry the gradients the leaves collected back through their graphs, in one backward pass."""
    roots, grads = [], []
    for graph, leaf in pairs:
        if graph.requires_grad and leaf.grad is not None:
            roots.append(graph)
            grads.append(leaf.grad)
    if roots:
        torch.autograd.backward(roots, grads)


def finish_sums(sums: dict, dices: list[float], state) -> dict:
    sums["dice_first"] = dices[0] if dices else float("nan")
    sums["dice_last"] = dices[-1] if dices else float("nan")
    sums["start"] = state.start
    return sums


def sample_batch(tr, planes: list[int], rng: np.random.Generator) -> SampledBatch:
    """Objects and clean/degraded variants of one iteration's planes (same draws for every head)."""
    cfg = tr.cfg
    n_obj = cfg.objects_per_image
    pairs_c, pairs_d, gts, valids = [], [], [], []
    for i in planes:
        tgt = tr.bank.targets[i]
        k = tgt.masks.shape[0]
        pick = rng.choice(k, size=n_obj, replace=k < n_obj)
        gts.append(tgt.masks[pick])
        valids.append(tgt.valid[None].expand(n_obj, -1, -1))
        v = sample_variant(rng, cfg.variants, cfg.p_identity)
        pairs_c.append((i, 0))
        pairs_d.append((i, v))
    gt = torch.cat(gts)  # (N, 256, 256) bool, grouped by plane
    return SampledBatch(
        pairs_c=pairs_c,
        pairs_d=pairs_d,
        target=gt[:, None].to(tr.device),
        valid=torch.cat(valids)[:, None].to(tr.device),
        gt_np=gt.numpy(),
        scale=tr.bank.targets[planes[0]].frame.model_size / gt.shape[-1],
    )

def backward_step(loss: torch.Tensor, terms: dict, n_pred: int, sums: dict[str, float]) -> str:
    """Backward of one interaction's loss (averaged over the iteration) and its logged terms; returns a
    message instead when the loss is not finite (nothing is backpropagated then)."""
    if not torch.isfinite(loss):
        return ("loss became " + ("NaN" if torch.isnan(loss) else "infinite") + " ("
                + ", ".join(f"{k} {float(v):.4g}" for k, v in terms.items()) + ")")
    (loss / n_pred).backward()
    for key, value in terms.items():
        sums[key] = sums.get(key, 0.0) + float(value.detach()) / n_pred
    sums["total"] = sums.get("total", 0.0) + float(loss.detach()) / n_pred
    return ""

def shown_and_dice(tr, state, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """The logits the annotator would show after this prediction (merged around the last clicks under local
    corrections, ``shown_logits``) and, when the fall penalty is on, their soft Dice per object (else None)."""
    shown = shown_logits(state, logits, tr.cfg.prompts)
    if tr.cfg.weights.fall <= 0:
        return shown, None
    return shown, soft_dice(shown, target, valid.expand_as(shown)).detach()

def next_prompts(tr, state, shown: torch.Tensor, gt_np: np.ndarray, rng: np.random.Generator):
    """One corrective click from the errors of the mask shown (``shown_and_dice``); those logits fed back with
    p_mask."""
    pred = (shown[:, 0] > 0).cpu().numpy()
    pts, labs = corrective_clicks(gt_np, pred, rng, tr.cfg.prompts)
    state = add_clicks(state, pts, labs)
    state.mask_input = shown if rng.random() < tr.cfg.prompts.p_mask else None
    return state

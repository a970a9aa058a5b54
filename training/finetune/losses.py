"""Losses of robust decoder fine-tuning (RobustSAM Sec. 3.2.4 / RobustMedSAM Sec. 3.3).

``L = dice * L_dice(m_d, m) + focal * L_focal(m_d, m)            (segmentation, degraded branch only)
     + feature * MSE(MF_d, MF_c) + token * MSE(t_d, t_c)          (clean/degraded consistency)
     + iou * MSE(iou_pred_d, IoU(m_d, m))                         (SAM / micro_sam IoU regression)``

Defaults: dice 1, focal 20, feature 100, token 2 (the papers' values), iou 1 (micro_sam's trainer; keeps the IoU
head usable for choosing among multimask candidates). ``feature = token = 0`` is the plain decoder fine-tuning
ablation. Every term is returned separately (for the logs) together with the weighted total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import UNLESS_DEFAULT, setting

LOSS = "loss (RobustSAM / RobustMedSAM weights by default)"


@dataclass(frozen=True)
class LossWeights:
    dice: float = setting(1.0, "soft Dice loss weight", flag="--w-dice", group=LOSS)
    focal: float = setting(20.0, "focal loss weight", flag="--w-focal", group=LOSS)
    feature: float = setting(100.0, "MSE of clean vs degraded mask features", flag="--w-feature", group=LOSS)
    token: float = setting(2.0, "MSE of clean vs degraded output tokens", flag="--w-token", group=LOSS)
    iou: float = setting(1.0, "IoU-prediction regression (micro_sam)", flag="--w-iou", group=LOSS)
    fall: float = setting(0.0, "penalty on a simulated corrective click that lowers the object's soft Dice below the "
                          "mask shown before it (hinge; 0 = off)", flag="--w-fall", fingerprint=UNLESS_DEFAULT,
                          group=LOSS)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def consistency(self) -> bool:
        return self.feature > 0 or self.token > 0


def _flat(x: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
    x = x.flatten(1)
    return x, (valid.flatten(1).to(x.dtype) if valid is not None else None)


def soft_dice(logits: Tensor, target: Tensor, valid: Tensor | None = None, eps: float = 1.0) -> Tensor:
    """Soft Dice of sigmoid(logits) against a binary target, per object (N,).

    logits, target: (N, 1, H, W) or (N, H, W); ``valid`` (same shape, optional) masks out padding.
    ``eps`` = 1 (smoothing as in MedSAM's / monai's soft Dice): an empty target with an empty prediction is 1.
    """
    p, w = _flat(torch.sigmoid(logits), valid)
    t = target.flatten(1).to(p.dtype)
    if w is not None:
        p, t = p * w, t * w
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    return (2.0 * inter + eps) / (denom + eps)


def dice_loss(logits: Tensor, target: Tensor, valid: Tensor | None = None, eps: float = 1.0) -> Tensor:
    """Soft Dice loss (1 - :func:`soft_dice`), mean over objects."""
    return (1.0 - soft_dice(logits, target, valid, eps)).mean()


def fall_loss(logits: Tensor, target: Tensor, previous: Tensor, valid: Tensor | None = None) -> Tensor:
    """How far this interaction's soft Dice fell below the previous one's, per object, averaged (hinge).

    Why: the Dice/focal terms pull every interaction toward the ground truth, but a corrective click that makes
    an already good mask worse costs no more than one that fails to improve a bad mask. Users judge a tool by
    whether a click ever undoes their work; this term adds gradient exactly where a click did. ``previous``:
    (N,) soft Dice of the mask shown before the click (detached).
    """
    return torch.relu(previous.detach() - soft_dice(logits, target, valid)).mean()


def focal_loss(logits: Tensor, target: Tensor, valid: Tensor | None = None, alpha: float = 0.25,
               gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al.; torchvision's ``sigmoid_focal_loss``), mean over (valid) pixels."""
    x, w = _flat(logits, valid)
    t = target.flatten(1).to(x.dtype)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if w is not None:
        return (loss * w).sum() / w.sum().clamp_min(1.0)
    return loss.mean()


def _hard_masks(logits: Tensor, target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(prediction logits > 0, target) as (N, pixels) bool, restricted to the valid region when given."""
    p = (logits > 0).flatten(1)
    t = target.flatten(1).bool()
    if valid is not None:
        v = valid.flatten(1).bool()
        p, t = p & v, t & v
    return p, t


def mask_iou(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Hard IoU per object (N,) of logits > 0 against the target (no gradient)."""
    with torch.no_grad():
        p, t = _hard_masks(logits, target, valid)
        inter = (p & t).sum(1).float()
        union = (p | t).sum(1).float()
        return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def dice_score(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Hard Dice per object (N,) (1 when both are empty)."""
    with torch.no_grad():
        p, t = _hard_masks(logits, target, valid)
        inter = (p & t).sum(1).float()
        total = p.sum(1).float() + t.sum(1).float()
        return torch.where(total > 0, 2 * inter / total.clamp_min(1.0), torch.ones_like(total))


def robust_loss(
    degraded: dict[str, Tensor],
    target: Tensor,
    weights: LossWeights,
    clean: dict[str, Tensor] | None = None,
    valid: Tensor | None = None,
    previous_dice: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted loss of one decoder step and its unweighted terms.

    ``degraded``: ``forward_with_aux(..., robust=True)`` output of the degraded branch (``masks`` (N, 1, H, W),
    ``iou_predictions``, ``mask_features``, ``refined_token``). ``clean``: the clean branch's targets
    (``mask_features``, ``mask_tokens``; detached), needed when a consistency weight is non-zero.
    ``target``: (N, 1, H, W) bool ground truth; ``valid``: (N, 1, H, W) or broadcastable region mask.
    ``previous_dice``: (N,) soft Dice of the mask shown before this interaction (a corrective step); with a
    non-zero ``weights.fall`` it adds the :func:`fall_loss` term.
    """
    logits = degraded["masks"][:, :1]
    if valid is not None:
        valid = valid.expand_as(logits)
    terms: dict[str, Tensor] = {
        "dice": dice_loss(logits, target, valid),
        "focal": focal_loss(logits, target, valid),
    }
    zero = logits.new_zeros(())
    if weights.iou > 0 and "iou_predictions" in degraded:
        terms["iou"] = F.mse_loss(degraded["iou_predictions"][:, 0], mask_iou(logits, target, valid))
    else:
        terms["iou"] = zero
    if weights.consistency:
        if clean is None:
            raise ValueError("consistency weights are non-zero but no clean-branch targets were given")
        terms["feature"] = F.mse_loss(degraded["mask_features"], clean["mask_features"].detach())
        terms["token"] = F.mse_loss(degraded["refined_token"], clean["mask_tokens"][:, 0].detach())
    else:
        terms["feature"] = zero
        terms["token"] = zero
    total = (weights.dice * terms["dice"] + weights.focal * terms["focal"] + weights.iou * terms["iou"]
             + weights.feature * terms["feature"] + weights.token * terms["token"])
    if weights.fall > 0 and previous_dice is not None:
        terms["fall"] = fall_loss(logits, target, previous_dice, valid)
        total = total + weights.fall * terms["fall"]
    return total, terms

"""Losses of robust decoder fine-tuning on hand-computed cases (training/finetune/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from training.finetune.losses import (LossWeights, dice_loss, dice_score, fall_loss, focal_loss, mask_iou, robust_loss,
                                      soft_dice)


def _target():
    t = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    t[..., :2, :2] = True  # 4 of 16 pixels
    return t


def test_dice_loss_perfect_and_opposite():
    t = _target()
    perfect = torch.where(t, 50.0, -50.0)
    assert dice_loss(perfect, t).item() == pytest.approx(0.0, abs=1e-6)
    opposite = -perfect
    # p = 0 on the object, 1 on the 12 background pixels: 1 - (0 + 1) / (12 + 4 + 1)
    assert dice_loss(opposite, t).item() == pytest.approx(1 - 1 / 17, abs=1e-5)
    # zero logits: p = 0.5 everywhere: 1 - (2 * 2 + 1) / (8 + 4 + 1)
    assert dice_loss(torch.zeros(1, 1, 4, 4), t).item() == pytest.approx(1 - 5 / 13, abs=1e-6)


def test_dice_loss_ignores_invalid_pixels():
    t = _target()
    logits = torch.where(t, 50.0, -50.0)
    logits[..., 3, 3] = 50.0  # a false positive in the padding
    valid = torch.ones_like(t)
    valid[..., 3, 3] = False
    assert dice_loss(logits, t, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(logits, t).item() > 0.05


def test_focal_loss_matches_formula_and_torchvision():
    x = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    p = torch.sigmoid(x)
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    expected = (alpha_t * ce * (1 - p_t) ** 2).mean()
    assert focal_loss(x, t).item() == pytest.approx(expected.item(), rel=1e-6)
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.ops.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="mean")
    assert focal_loss(x, t).item() == pytest.approx(ref.item(), rel=1e-6)


def test_hard_scores():
    t = _target()
    logits = torch.full((1, 1, 4, 4), -1.0)
    logits[..., 0, :] = 1.0  # predicts the top row: 4 px, 2 of them correct
    assert dice_score(logits, t).item() == pytest.approx(2 * 2 / (4 + 4))
    assert mask_iou(logits, t).item() == pytest.approx(2 / 6)


def _outputs(n=2, c=32, hw=8, offset=0.0, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    out = {
        "masks": torch.randn(n, 1, hw, hw, generator=g),
        "iou_predictions": torch.rand(n, 1, generator=g),
        "mask_features": torch.randn(n, c, hw, hw, generator=g) + offset,
        "refined_token": torch.randn(n, 256, generator=g) + offset,
        "mask_tokens": torch.randn(n, 4, 256, generator=g) + offset,
    }
    if requires_grad:
        for v in out.values():
            v.requires_grad_(True)
    return out


def test_robust_loss_is_the_weighted_sum_of_its_terms():
    deg = _outputs(requires_grad=True)
    clean = _outputs()
    clean["mask_features"] = deg["mask_features"].detach() + 0.5  # MSE exactly 0.25
    clean["mask_tokens"] = torch.zeros(2, 4, 256)
    clean["mask_tokens"][:, 0] = deg["refined_token"].detach() - 2.0  # MSE exactly 4
    target = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    target[:, :, 2:6, 2:6] = True
    w = LossWeights(dice=1.0, focal=20.0, feature=100.0, token=2.0, iou=1.0)
    total, terms = robust_loss(deg, target, w, clean)
    assert terms["feature"].item() == pytest.approx(0.25, rel=1e-5)
    assert terms["token"].item() == pytest.approx(4.0, rel=1e-5)
    expected = terms["dice"] + 20 * terms["focal"] + 100 * terms["feature"] + 2 * terms["token"] + terms["iou"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert deg["mask_features"].grad is not None and deg["refined_token"].grad is not None


def test_ablation_needs_no_clean_branch():
    deg = _outputs()
    target = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    w = LossWeights(feature=0.0, token=0.0)
    assert not w.consistency
    total, terms = robust_loss(deg, target, w, None)
    assert terms["feature"].item() == 0 and terms["token"].item() == 0
    assert math.isfinite(total.item())
    with pytest.raises(ValueError, match="consistency"):
        robust_loss(deg, target, LossWeights(), None)


def test_fall_loss_charges_only_a_drop_below_the_mask_shown_before():
    target = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    target[:, :, 2:6, 2:6] = True
    logits = torch.where(target, 4.0, -4.0).float().requires_grad_(True)
    now = soft_dice(logits, target).detach()
    assert now.shape == (2,) and bool((now > 0.9).all())
    # object 0 was better before the click (drop 0.05), object 1 was worse: only object 0 is charged
    before = torch.stack([now[0] + 0.05, now[1] - 0.3])
    loss = fall_loss(logits, target, before)
    assert loss.item() == pytest.approx(0.05 / 2, rel=1e-4)
    loss.backward()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() == 0
    assert fall_loss(logits, target, now - 0.01).item() == 0.0  # no fall, no loss
    assert dice_loss(logits, target).item() == pytest.approx(1 - now.mean().item(), rel=1e-6)


def test_robust_loss_adds_the_fall_term_only_when_weighted_and_after_a_click():
    deg = _outputs(requires_grad=True)
    target = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    target[:, :, 2:6, 2:6] = True
    off = LossWeights(feature=0.0, token=0.0)
    on = LossWeights(feature=0.0, token=0.0, fall=3.0)
    high = torch.ones(2)  # the mask shown before was perfect: any prediction now is a fall
    base, terms = robust_loss(deg, target, off, None, None, high)
    assert "fall" not in terms  # weight 0: nothing computed or logged
    first, terms = robust_loss(deg, target, on, None, None, None)
    assert "fall" not in terms and first.item() == pytest.approx(base.item())  # first prompt: nothing before
    total, terms = robust_loss(deg, target, on, None, None, high)
    expected = 1.0 - soft_dice(deg["masks"][:, :1], target).mean()
    assert terms["fall"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(base.item() + 3.0 * terms["fall"].item(), rel=1e-6)

"""Validation after every epoch: mean Dice (low-resolution model frame) of box and 3-point prompts on the clean
and the degraded validation planes, decoded by the run's head (:meth:`.heads.Head.validation_decoder`)."""

from __future__ import annotations

import numpy as np
import torch

from napari_robustmedsam.prompting import random_positive_points, rng_for, tight_box

from .losses import dice_score


@torch.no_grad()
def validate(tr) -> dict:
    """Mean Dice (low-resolution model frame) of box and 3-point prompts on clean and degraded validation planes."""
    if not tr.val_items or not tr.ctx.is_main:
        return {}
    was_training = tr.decoder.training
    tr.decoder.eval()
    scores: dict[str, list[float]] = {}
    try:
        for i, item in enumerate(tr.val_items):
            tgt = tr.val_bank.targets.get(i)
            if tgt is None:
                continue
            masks = tgt.masks
            if masks.shape[0] > tr.cfg.val_max_objects:
                idx = np.sort(rng_for(tr.cfg.seed, "val-objects", item.key).choice(
                    masks.shape[0], tr.cfg.val_max_objects, replace=False))
                masks = masks[idx]
            n = masks.shape[0]
            gt_np = masks.numpy()
            target = masks[:, None].to(tr.device)
            valid = tgt.valid[None, None].expand(n, 1, -1, -1).to(tr.device)
            scale = tgt.frame.model_size / masks.shape[-1]
            boxes = torch.as_tensor(np.stack([tight_box(m) for m in gt_np]) * scale, dtype=torch.float32,
                                    device=tr.device)
            pts = np.stack([random_positive_points(m, 3, rng_for(tr.cfg.seed, "val-points", item.key, j))
                            for j, m in enumerate(gt_np)])
            points = (torch.as_tensor(pts * scale, dtype=torch.float32, device=tr.device),
                      torch.ones(pts.shape[:2], dtype=torch.int64, device=tr.device))
            for v, cond in ((0, "clean"), (1, "degraded")):
                feats = tr.val_bank.batch([(i, v)], tr.device)
                decode = tr.head.validation_decoder(tr, feats)
                for prompt, kw in (("box", dict(points=None, boxes=boxes)), ("points3", dict(points=points, boxes=None))):
                    sparse, dense = tr.model.prompt_encoder(masks=None, **kw)
                    low = decode(sparse, dense, kw["points"], kw["boxes"])
                    d = dice_score(low[:, :1], target, valid)
                    scores.setdefault(f"val_dice_{cond}_{prompt}", []).extend(d.tolist())
    finally:
        tr.decoder.train(was_training)
    out = {k: float(np.mean(v)) for k, v in scores.items() if v}
    if out:
        out["val_score"] = float(np.mean(list(out.values())))
    return out

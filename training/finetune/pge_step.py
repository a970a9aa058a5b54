"""One training iteration of the PGE-SAM head (prompt-guided feature enhancer + mask decoder).

PGE-SAM Sec. 3.3 / App. 0.C: the encoder is frozen; the enhancer and the mask decoder are trained jointly with
``dice * Dice + focal * Focal (+ iou * IoU regression) + fr * FR`` where FR, the foreground reconstruction loss,
is the MSE between the enhanced degraded embedding and the clean embedding inside the ground-truth mask only
(Eq. 6: masked squared error over the masked area). Every sample runs ``n_steps + 1`` simulated interactions
(first prompt: clicks or a jittered box; then one corrective click per step, the previous logits fed back),
and every interaction is supervised.

As in the robust decoder's step, the per-image part (the gates' projections of the intermediate features) runs
once per iteration: its outputs are detached leaves that collect the gradients of all interactions, followed
by one backward pass through the per-image part.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from napari_robustmedsam.models.intermediate_features import stack_intermediates

from .prompt_simulation import start_prompts
from .losses import dice_score, robust_loss

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


def foreground_reconstruction_loss(enhanced: torch.Tensor, clean: torch.Tensor, target: torch.Tensor,
                                   eps: float = 1e-6) -> torch.Tensor:
    """PGE-SAM's FR loss: mean squared feature error over the ground-truth foreground (embedding grid).

    ``target`` (N, 1, H, W) bool at the low-resolution frame; it is area-downsampled to the embedding grid and
    a cell counts as foreground when at least a quarter of it is (so that thin objects keep some cells).
    """
    grid = enhanced.shape[-1]
    frac = F.adaptive_avg_pool2d(target.float(), grid)
    mask = (frac >= 0.25).to(enhanced.dtype)
    sq = (enhanced - clean).square().mean(dim=1, keepdim=True)  # per-cell mean over channels
    return (sq * mask).sum() / (mask.sum() + eps)


def pge_train_step(tr: "Trainer", planes: list[int], rng: np.random.Generator) -> dict:
    from .trainer import backward_through_leaves, finish_sums, leaf_of

    cfg = tr.cfg
    n_obj = cfg.objects_per_image
    model = tr.model
    enhancer = model.feature_enhancer
    batch = tr.sample_batch(planes, rng)
    target, valid = batch.target, batch.valid

    feats_d = tr.bank.batch(batch.pairs_d, tr.device)
    fr_weight = float(cfg.fr_weight)
    emb_c = None
    if fr_weight > 0:
        emb_c = tr.bank.batch(batch.pairs_c, tr.device)["image_embeddings"].repeat_interleave(n_obj, 0)
    side_graph = [t for pair in enhancer.image_side(stack_intermediates(feats_d)) for t in pair]
    leaves = [leaf_of(t) for t in side_graph]
    side = [(leaves[j].repeat_interleave(n_obj, 0), leaves[j + 1].repeat_interleave(n_obj, 0))
            for j in range(0, len(leaves), 2)]
    emb_d = feats_d["image_embeddings"].repeat_interleave(n_obj, 0)
    weights = replace(cfg.weights, feature=0.0, token=0.0)

    state = start_prompts(batch.gt_np, rng, cfg.prompts)
    n_pred = cfg.prompts.n_steps + 1
    sums: dict[str, float] = {}
    dices: list[float] = []
    bad_message = ""
    previous_dice = None
    for step in range(n_pred):
        points, boxes = state.to_model(batch.scale, tr.device)
        with torch.no_grad():
            sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=state.mask_input)
        enhanced = enhancer(emb_d, side, points, boxes, dense)
        low, iou = model.decode_embeddings(enhanced, {}, sparse, dense, False)
        loss, terms = robust_loss({"masks": low, "iou_predictions": iou}, target, weights, None, valid,
                                  previous_dice)
        terms.pop("feature", None)
        terms.pop("token", None)
        if emb_c is not None:
            terms["fr"] = foreground_reconstruction_loss(enhanced, emb_c, target)
            loss = loss + fr_weight * terms["fr"]
        bad_message = tr.backward_step(loss, terms, n_pred, sums)
        if bad_message:
            break
        logits = low[:, :1].detach()
        dices.append(float(dice_score(logits, target, valid).mean()))
        if step + 1 < n_pred:
            shown, previous_dice = tr.shown_and_dice(state, logits, target, valid)
            state = tr.next_prompts(state, shown, batch.gt_np, rng)
    tr.stop_if_nonfinite(bad_message)
    backward_through_leaves(zip(side_graph, leaves))
    tr.finish_step()
    return finish_sums(sums, dices, state)

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

from . import ddp
from .interactive import add_clicks, corrective_clicks, start_prompts
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
    cfg = tr.cfg
    n_obj = cfg.objects_per_image
    model = tr.model
    enhancer = model.feature_enhancer
    pairs_c, pairs_d, gts, valids = [], [], [], []
    from .pairs import sample_variant

    for i in planes:
        tgt = tr.bank.targets[i]
        k = tgt.masks.shape[0]
        pick = rng.choice(k, size=n_obj, replace=k < n_obj)
        gts.append(tgt.masks[pick])
        valids.append(tgt.valid[None].expand(n_obj, -1, -1))
        pairs_c.append((i, 0))
        pairs_d.append((i, sample_variant(rng, cfg.variants, cfg.p_identity)))
    gt = torch.cat(gts)
    valid = torch.cat(valids)[:, None].to(tr.device)
    target = gt[:, None].to(tr.device)
    gt_np = gt.numpy()
    scale = tr.bank.targets[planes[0]].frame.model_size / gt.shape[-1]

    feats_d = tr.bank.batch(pairs_d, tr.device)
    fr_weight = float(cfg.fr_weight)
    emb_c = None
    if fr_weight > 0:
        emb_c = tr.bank.batch(pairs_c, tr.device)["image_embeddings"].repeat_interleave(n_obj, 0)
    side_graph = enhancer.image_side(stack_intermediates(feats_d))
    leaves = [(p.detach().requires_grad_(), t.detach().requires_grad_()) for p, t in side_graph]
    side = [(p.repeat_interleave(n_obj, 0), t.repeat_interleave(n_obj, 0)) for p, t in leaves]
    emb_d = feats_d["image_embeddings"].repeat_interleave(n_obj, 0)
    weights = replace(cfg.weights, feature=0.0, token=0.0)

    state = start_prompts(gt_np, rng, cfg.prompts)
    n_pred = cfg.prompts.n_steps + 1
    sums: dict[str, float] = {}
    dices: list[float] = []
    bad_message = ""
    for step in range(n_pred):
        points, boxes = state.to_model(scale, tr.device)
        with torch.no_grad():
            sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=state.mask_input)
        enhanced = enhancer(emb_d, side, points, boxes, dense)
        low, iou = model.decode_embeddings(enhanced, {}, sparse, dense, False)
        loss, terms = robust_loss({"masks": low, "iou_predictions": iou}, target, weights, None, valid)
        terms.pop("feature", None)
        terms.pop("token", None)
        if emb_c is not None:
            terms["fr"] = foreground_reconstruction_loss(enhanced, emb_c, target)
            loss = loss + fr_weight * terms["fr"]
        if not torch.isfinite(loss):
            bad_message = ("loss became " + ("NaN" if torch.isnan(loss) else "infinite") + " ("
                           + ", ".join(f"{k} {float(v):.4g}" for k, v in terms.items()) + ")")
            break
        (loss / n_pred).backward()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) / n_pred
        sums["total"] = sums.get("total", 0.0) + float(loss.detach()) / n_pred
        logits = low[:, :1].detach()
        dices.append(float(dice_score(logits, target, valid).mean()))
        if step + 1 < n_pred:
            pred = (logits[:, 0] > 0).cpu().numpy()
            pts, labs = corrective_clicks(gt_np, pred, rng, cfg.prompts)
            state = add_clicks(state, pts, labs)
            state.mask_input = logits if rng.random() < cfg.prompts.p_mask else None
    if ddp.broadcast_flag(bool(bad_message), tr.ctx):
        tr.optimizer.zero_grad(set_to_none=True)
        from .trainer import NonFiniteLoss

        raise NonFiniteLoss(bad_message or "the loss became NaN or infinite on another process")
    roots, grads = [], []
    for (p_graph, t_graph), (p_leaf, t_leaf) in zip(side_graph, leaves):
        for graph, leaf in ((p_graph, p_leaf), (t_graph, t_leaf)):
            if graph.requires_grad and leaf.grad is not None:
                roots.append(graph)
                grads.append(leaf.grad)
    if roots:
        torch.autograd.backward(roots, grads)
    tr.finish_step()
    sums["dice_first"] = dices[0] if dices else float("nan")
    sums["dice_last"] = dices[-1] if dices else float("nan")
    sums["start"] = state.start
    return sums


@torch.no_grad()
def pge_decode(model, feats: dict, sparse: torch.Tensor, dense: torch.Tensor, points, boxes) -> torch.Tensor:
    """Validation: low-resolution logits of the enhanced model for one prompt set per object."""
    low, _ = model.decode(feats, sparse, dense, False, prompts=(points, boxes))
    return low

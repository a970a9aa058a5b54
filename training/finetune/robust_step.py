"""One training iteration of the robust decoder head (RobustSAM's decoder on clean/degraded pairs).

The degraded branch runs the robust path (trained), the clean branch SAM's path without gradient (the anchor of the
consistency losses). The image-level robust features are computed once per iteration with gradient; detached
leaves collect the gradients of all simulated interactions and one backward pass carries them through the
image-level part (AMFG on images, SVD neck). See :mod:`.trainer` for the iteration's plan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from napari_robustmedsam.models.robust_decoder import IMAGE_FEATURES_KEY

from .losses import dice_score, robust_loss
from .prompt_simulation import start_prompts
from . import step_tools as steps


def robust_train_step(tr: Any, planes: list[int], rng: np.random.Generator) -> dict:
    """One iteration on ``planes`` for the :class:`~.trainer.Trainer` ``tr``; returns the logged loss terms."""
    cfg = tr.cfg
    batch = steps.sample_batch(tr, planes, rng)
    target, valid, gt_np, scale = batch.target, batch.valid, batch.gt_np, batch.scale
    pairs_c, pairs_d = batch.pairs_c, batch.pairs_d

    feats_d = tr.bank.batch(pairs_d, tr.device)
    consistency = cfg.weights.consistency
    feats_c = tr.bank.batch(pairs_c, tr.device) if consistency else None
    # Degraded branch: image-level robust features once per iteration, with gradient. Leaves collect the
    # gradients of all steps, then one backward pass through the image-level part (memory-light).
    emb_d_graph = tr.embeddings_of(feats_d, grad=True)
    img_graph = tr.decoder.image_level_features(emb_d_graph, feats_d["early_features"])[IMAGE_FEATURES_KEY]
    emb_d = steps.leaf_of(emb_d_graph)
    img_d = steps.leaf_of(img_graph)
    if consistency:
        with torch.no_grad():
            emb_c = tr.embeddings_of(feats_c, grad=False)

    state = start_prompts(gt_np, rng, cfg.prompts)
    n_pred = cfg.prompts.n_steps + 1
    bad_message = ""
    sums: dict[str, float] = {}
    dices = []
    previous_dice = None
    for step in range(n_pred):
        sparse, dense = tr.prompt_embed(state, scale)
        clean_out = None
        weights = cfg.weights
        if consistency and (cfg.consistency_steps == "all" or step == 0):
            with torch.no_grad():
                clean_out = tr.decode(emb_c, feats_c["early_features"], sparse, dense, robust=False)
        out = tr.decode(emb_d, feats_d["early_features"], sparse, dense, robust=True,
                           image_features={IMAGE_FEATURES_KEY: img_d})
        if consistency and clean_out is None:
            weights = replace(weights, feature=0.0, token=0.0)
        loss, terms = robust_loss(out, target, weights, clean_out, valid, previous_dice)
        bad_message = steps.backward_step(loss, terms, n_pred, sums)
        if bad_message:
            break
        logits = out["masks"][:, :1].detach()
        dices.append(float(dice_score(logits, target, valid).mean()))
        if step + 1 < n_pred:
            shown, previous_dice = steps.shown_and_dice(tr, state, logits, target, valid)
            state = steps.next_prompts(tr, state, shown, gt_np, rng)
    tr.stop_if_nonfinite(bad_message)
    # one backward pass through the image-level part (AMFG on images, SVD neck)
    steps.backward_through_leaves([(img_graph, img_d), (emb_d_graph, emb_d)])
    tr.finish_step()
    return steps.finish_sums(sums, dices, state)

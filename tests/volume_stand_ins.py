"""Stand-ins for the volume modes' tests: a model that segments an object from its box only near a user's box, and
per-slice embeddings with the frame that segment_slice and propagation read."""

from __future__ import annotations

import numpy as np


class StandInVolumeModel:
    """A stand-in model for the volume modes: inside a box it finds the object (one pixel of slack), but only within
    one slice of a slice where a user drew the object's tight box (``boxed``), so its propagation dies two slices
    from them. With ``miss_corner``, a mask without a positive click misses the object's lower right corner and a
    positive click brings it back (recorded in ``clicked``)."""

    def __init__(self, gt, miss_corner=False):
        self.gt, self.miss_corner, self.boxed, self.clicked = gt, miss_corner, set(), []

    def predict(self, points=None, point_labels=None, boxes=None, mask_input=None, embedding=None,
                multimask_output=None, **kw):
        from types import SimpleNamespace

        import torch

        from napari_robustmedsam.prompting import tight_box

        gt, z = self.gt, embedding.z
        if gt[z].any() and np.allclose(boxes, tight_box(gt[z])):
            self.boxed.add(z)
        out = np.zeros(gt.shape[1:], bool)
        if min(abs(z - s) for s in self.boxed) < 2:
            x0, y0, x1, y1 = (int(v) for v in boxes)
            out[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = gt[z, max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1]
            if self.miss_corner:
                if points is None or not (np.asarray(point_labels) == 1).any():
                    out[16:, 16:] = False
                else:
                    self.clicked.append(z)
        # the logits' size tells a decode's own logits (5.25 and up) apart from a mask prompt made from a mask (5)
        size = 5.0 + 0.25 * (z + 1) + (0.125 if points is not None else 0.0)
        logits = torch.where(torch.from_numpy(out), size, -size)[None, None].float()
        return SimpleNamespace(masks=out[None], low_res_logits=logits, scores=np.array([0.9]))


class StandInSlices:
    """Per-slice stand-in embeddings of a (Z, 32, 32) volume, with the frame segment_slice reads."""

    def __init__(self, n_slices):
        self.volume = np.zeros((n_slices, 32, 32), np.float32)

    def get(self, z):
        from types import SimpleNamespace

        import torch

        frame = SimpleNamespace(original_size=(32, 32),
                                mask_to_low_res=lambda m: torch.where(torch.from_numpy(m), 5.0, -5.0)[None, None])
        return SimpleNamespace(z=z, frame=frame)

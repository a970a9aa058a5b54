"""float16 cache storage against float32 for the shipped heads: box-mask IoU on held-out images, clean and LQ-3.

    python benchmarks/heads_fp16_storage.py [IMAGES_PER_DATASET] [SPLIT_FOLDER] [OUT_JSON]

The cache's float16 default was measured on LiteMedSAM (docs/results/encoder-speed/); the heads also read
image-level features from the cache. Defaults: 2 images per dataset of runs/ship/split/heldout (written by
``python -m training.ship_heads``), up to 3 objects each, tight boxes.
"""
import json
import sys

import numpy as np
import torch

torch.set_num_threads(1)
from napari_robustmedsam.checkpoints import load_model
from napari_robustmedsam.engine.embeddings import EmbeddingEngine
from napari_robustmedsam.engine.predictor import ImageEmbedding
from training.evaluation.dataset import discover
from training.evaluation.runner import Condition
from napari_robustmedsam.prompting import tight_box
per = int(sys.argv[1]) if len(sys.argv) > 1 else 2
split = sys.argv[2] if len(sys.argv) > 2 else "runs/ship/split/heldout"
out = sys.argv[3] if len(sys.argv) > 3 else "runs/heads_fp16_storage.json"
infos = discover(split)
samples = [s for i in infos for s in i.samples[:per]]
res = {}
for name in ["robust-lite", "pge-lite-fast", "robust-lite-permissive"]:
    eng = EmbeddingEngine(load_model(name, device="cpu"), use_cache=False, storage_dtype="float32")
    ious = []
    for s in samples:
        img, lab = s.load()
        for cond in [Condition("clean"), Condition("LQ-3", "LQ-3", None)]:
            im, _ = cond.apply(img, s.modality, s.key, 0)
            emb = eng.encode(im)
            e16 = ImageEmbedding({k: (v.half().float() if v.is_floating_point() else v) for k, v in emb.features.items()}, emb.frame)
            ids = [v for v in np.unique(lab) if v][:3]
            for v in ids:
                box = tight_box(lab == v)
                a = eng.predictor.predict(boxes=box, embedding=emb).masks[0]
                b = eng.predictor.predict(boxes=box, embedding=e16).masks[0]
                u = (a | b).sum()
                ious.append(float((a & b).sum() / u) if u else 1.0)
    ious = np.array(ious)
    res[name] = dict(objects=len(ious), share_ge_098=float((ious >= 0.98).mean()), min=float(ious.min()), median=float(np.median(ious)))
    print(name, res[name], flush=True)
json.dump(res, open(out, "w"), indent=1)

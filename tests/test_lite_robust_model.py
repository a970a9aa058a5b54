"""The registry's `litemedsam_robust`: LiteMedSAM + lite robust decoder, untrained robust parts change nothing."""

import numpy as np

from napari_robustmedsam.checkpoints import load_model
from napari_robustmedsam.engine.predictor import Predictor
from napari_robustmedsam.sample_data import mri_phantom


def test_untrained_lite_robust_decoder_gives_litemedsam_masks(litemedsam):
    robust = load_model("litemedsam_robust", device="cpu")
    assert robust.decoder == "robust" and robust.model.is_robust
    assert any("identity-initialised" in n for n in robust.notices)
    image, labels = mri_phantom(192, seed=5)
    ys, xs = np.nonzero(labels > 0)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    plain, lite = Predictor.from_loaded(litemedsam), Predictor.from_loaded(robust)
    plain.set_image(image)
    embedding = lite.set_image(image)
    assert "robust_image_features" in embedding.features
    a, b = plain.predict(boxes=box), lite.predict(boxes=box)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert float((a.low_res_logits - b.low_res_logits).abs().max()) < 1e-3

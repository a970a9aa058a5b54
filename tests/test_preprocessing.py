import numpy as np
import pytest
import torch

from napari_robustmedsam.engine.preprocessing import preprocess, validate_image
from napari_robustmedsam.errors import ImageInputError


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_litemedsam_frame_pads_bottom_right(dtype):
    img = (np.arange(300 * 200).reshape(300, 200) % 251).astype(dtype)
    x, frame = preprocess(img, "litemedsam")
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert frame.input_size == (256, 171)  # 200 * 256 / 300 = 170.7 -> 171
    assert float(x.min()) == 0.0 and abs(float(x[..., :256, :171].max()) - 1.0) < 1e-6
    assert float(x[..., 171:].abs().max()) == 0.0  # padding on the right only
    # a point at the image's far corner maps to the far corner of the resized area
    np.testing.assert_allclose(frame.points_to_model([[200, 300]]), [[171, 256]], atol=1e-9)


def test_medsam_frame_is_anisotropic_square_resize():
    img = np.random.default_rng(0).random((100, 400)).astype(np.float32)
    x, frame = preprocess(img, "medsam")
    assert x.shape == (1, 3, 1024, 1024)
    np.testing.assert_allclose(frame.boxes_to_model([[0, 0, 400, 100]]), [[0, 0, 1024, 1024]])


def test_sam_frame_normalises_with_pixel_mean():
    img = np.full((64, 128, 3), 255, np.uint8)
    img[0, 0] = 0
    x, frame = preprocess(img, "sam")
    assert frame.input_size == (512, 1024)
    # white maps to (255 - mean) / std, padding stays 0
    assert abs(float(x[0, 0, 100, 100]) - (255 - 123.675) / 58.395) < 1e-3
    assert float(x[0, :, 600:, :].abs().max()) == 0.0


def test_logits_back_to_original_size():
    img = np.zeros((300, 200), np.uint8)
    _, frame = preprocess(img, "litemedsam")
    low = torch.full((2, 1, 256, 256), -10.0)
    low[:, :, :128, :] = 10  # top half of the padded square
    out = frame.logits_to_original(low)
    assert out.shape == (2, 1, 300, 200)
    # the top half of the square covers 128 px of 256, i.e. half of the 300 px image height
    assert (out[0, 0, :140] > 0).all() and (out[0, 0, 160:] < 0).all()


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 10)), "empty"),
        (np.array([[np.nan, 1.0], [2.0, 3.0]]), "NaN"),
        (np.array([[np.inf, 1.0], [2.0, 3.0]]), "NaN/inf"),
        (np.zeros((1, 50)), "too thin"),
        (np.zeros((5, 10, 10, 3)), "4D"),
        (np.zeros((10, 10, 7)), "slice"),
    ],
)
def test_bad_images_have_clear_errors(array, message):
    with pytest.raises(ImageInputError, match=message):
        validate_image(array)


def test_rgba_drops_alpha_and_constant_image_is_fine():
    rgba = np.zeros((20, 30, 4), np.uint8)
    assert validate_image(rgba).shape == (20, 30, 3)
    x, _ = preprocess(np.full((20, 30), 7, np.uint16), "litemedsam")
    assert torch.isfinite(x).all() and float(x.abs().max()) == 0.0

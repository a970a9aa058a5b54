"""CT windows (engine/windows.py): presets, custom windows, what the model sees, and the cache signature."""

from __future__ import annotations

import numpy as np
import pytest

from napari_robustmedsam.engine.windows import (
    PRESETS,
    WindowedView,
    default_window,
    looks_like_ct,
    model_view,
    parse_window,
)
from napari_robustmedsam.errors import UserFacingError


def test_presets_and_custom_parse():
    assert parse_window("soft-tissue") == PRESETS["soft-tissue"]
    assert parse_window("Soft tissue") == PRESETS["soft-tissue"]
    assert parse_window("lung").contrast_limits() == (-1350.0, 150.0)
    assert parse_window("bone").level == 400 and parse_window("brain").width == 80
    custom = parse_window("50,350")
    assert (custom.level, custom.width, custom.spec) == (50.0, 350.0, "50,350")
    assert parse_window(custom.spec) == custom
    assert parse_window("none") is None and parse_window(None) is None
    for spec in PRESETS:
        assert parse_window(PRESETS[spec].spec) == PRESETS[spec]


@pytest.mark.parametrize("bad", ["liver", "40", "40,0", "40,-5", "a,b", "nan,400"])
def test_bad_windows_say_what_to_give(bad):
    with pytest.raises(UserFacingError, match="window"):
        parse_window(bad)


def test_window_maps_hu_to_uint8_and_keeps_the_data():
    hu = np.array([[-1000, -160, 40, 240, 3000]], np.int16)
    w = PRESETS["soft-tissue"]  # -160 .. 240
    out = w.apply(hu)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 128, 255, 255]]
    view = WindowedView(np.stack([hu, hu + 100]), w)
    assert view.shape == (2, 1, 5) and view.dtype == np.uint8
    assert view[1].tolist() == w.apply(hu + 100).tolist()
    assert np.asarray(view).shape == (2, 1, 5)
    assert hu[0, 0] == -1000  # the source stays in HU
    assert model_view(hu, None) is hu


def test_ct_detection_modality_first_then_air():
    ct = np.full((4, 8, 8), -1024, np.int16)
    ct[:, 2:6, 2:6] = 50
    mri = np.random.default_rng(0).integers(0, 800, (4, 8, 8)).astype(np.uint16)
    assert looks_like_ct(ct) and not looks_like_ct(mri)
    assert looks_like_ct(mri, modality="CT") and not looks_like_ct(ct, modality="MR")
    assert default_window(ct) == PRESETS["soft-tissue"]
    assert default_window(mri) is None  # MRI keeps the model's own normalisation


def test_window_changes_the_embedding_signature(litemedsam):
    """Two windows of the same CT slice never share a cache entry; the same window does."""
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine

    engine = EmbeddingEngine(litemedsam, cache_dir=None)
    hu = np.random.default_rng(0).integers(-1000, 1500, (64, 64)).astype(np.int16)
    soft = engine.signature(PRESETS["soft-tissue"].apply(hu))
    lung = engine.signature(PRESETS["lung"].apply(hu))
    again = engine.signature(parse_window("40,400").apply(hu))
    raw = engine.signature(hu)
    assert soft.key() != lung.key() and soft.key() != raw.key()
    assert soft.compare(lung)[0] == "mismatch" and "data_hash" in soft.compare(lung)[1]
    assert again.key() == soft.key()

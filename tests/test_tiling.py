"""Tiled embeddings of large 2D images: layout, prompt routing, and the mask landing in the right place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_robustmedsam.engine.predictor import ImageEmbedding, Prediction
from napari_robustmedsam.errors import PromptError
from napari_robustmedsam.engine.preprocessing import ImageFrame
from napari_robustmedsam.engine.tiling import (
    TiledEmbedding,
    TiledPredictor,
    choose_tile,
    needs_tiling,
    tile_layout,
)


def test_layout_partitions_the_image_and_adds_a_clipped_halo():
    tiles = tile_layout((1000, 700), threshold=400, halo=50)  # inner at most 300 px
    cover = np.zeros((1000, 700), int)
    for t in tiles:
        y0, y1, x0, x1 = t.inner
        cover[y0:y1, x0:x1] += 1
        oy0, oy1, ox0, ox1 = t.outer
        assert (oy0, ox0) == (max(0, y0 - 50), max(0, x0 - 50))
        assert (oy1, ox1) == (min(1000, y1 + 50), min(700, x1 + 50))
        assert max(oy1 - oy0, ox1 - ox0) <= 400
        assert max(y1 - y0, x1 - x0) <= 300
    assert (cover == 1).all()  # the inner blocks partition the image
    assert len(tiles) == 4 * 3 and [t.index for t in tiles] == list(range(12))
    # balanced: no thin leftover tile
    heights = {t.inner[1] - t.inner[0] for t in tiles}
    assert max(heights) - min(heights) <= 1


def test_threshold():
    assert not needs_tiling((2048, 1000))
    assert needs_tiling((2049, 1000))
    assert not needs_tiling((5000, 5000), threshold=None)


def test_choose_tile_prefers_the_tile_containing_the_whole_prompt():
    tiles = tile_layout((200, 400), threshold=200, halo=20)  # inner 160: 2 x 3 tiles
    by_inner = {t.index: t for t in tiles}
    # a box inside one inner block
    t = choose_tile(tiles, None, np.array([10.0, 10, 60, 60]))
    assert t.inner[0] <= 10 and t.inner[2] <= 10 and t.outer[3] >= 60
    # a box across an inner border, but inside a neighbour's halo: a tile that holds all of it
    box = np.array([120.0, 30, 150, 60])
    t = choose_tile(tiles, None, box)
    assert t.outer[2] <= 120 and t.outer[3] >= 150 and t.outer[0] <= 30 and t.outer[1] >= 60
    # points: all must be inside
    pts = np.array([[300.0, 150], [350, 180]])
    t = choose_tile(tiles, pts, None)
    assert t.outer[2] <= 300 and t.outer[3] >= 350 and t.outer[1] >= 180
    # a box larger than any tile: the tile whose inner block holds its centre
    big = np.array([0.0, 0, 399, 199])
    t = choose_tile(tiles, None, big)
    cy, cx = 99.5, 199.5
    assert t.inner[0] <= cy < t.inner[1] and t.inner[2] <= cx < t.inner[3]
    assert by_inner[t.index] is t


class _BoxPredictor:
    """Stands in for Predictor: the 'mask' is exactly the box (tile coordinates); records the calls."""

    def __init__(self):
        self.calls = []
        self.device = torch.device("cpu")
        self.dtype = torch.float32

        class _Arch:
            image_size = 256

        class _Model:
            architecture = _Arch()

        self.model = _Model()

    def predict(self, points=None, point_labels=None, boxes=None, mask_input=None, multimask_output=None, embedding=None,
                local_clicks=None, guard_new_clicks=None, guard_edge_reach=None):
        h, w = embedding.frame.original_size
        self.local_clicks = local_clicks
        self.guard = (guard_new_clicks, guard_edge_reach, None if points is None else np.asarray(points).copy())
        self.calls.append((embedding.features["tile"], None if boxes is None else np.asarray(boxes), points))
        n = len(boxes) if boxes is not None else len(points)
        masks = np.zeros((n, h, w), bool)
        for i in range(n):
            if boxes is not None:
                x0, y0, x1, y1 = np.round(boxes[i]).astype(int)
            else:
                x0, y0 = np.floor(points[i].min(0)).astype(int)
                x1, y1 = np.ceil(points[i].max(0)).astype(int) + 1
            masks[i, y0:y1, x0:x1] = True
        return Prediction(masks, np.ones(n, np.float32), torch.zeros(n, 1, 64, 64), np.ones((n, 1), np.float32))


def _fake_tiled(shape, threshold, halo):
    tiles = tile_layout(shape, threshold=threshold, halo=halo)
    embs = []
    for t in tiles:
        frame = ImageFrame("litemedsam", t.outer_shape, (256, 256), 256)
        embs.append(ImageEmbedding({"tile": t.index}, frame))
    return TiledEmbedding(tiles, embs, shape, halo)


def test_prompts_are_routed_and_masks_pasted_at_the_right_place():
    fake = _BoxPredictor()
    tiled = _fake_tiled((300, 500), threshold=200, halo=20)
    predictor = TiledPredictor(fake)
    boxes = np.array([[30.0, 40, 90, 100], [400, 220, 480, 290], [240, 100, 300, 165]])  # the last one crosses inner borders
    pred = predictor.predict(boxes=boxes, embedding=tiled)
    assert pred.masks.shape == (3, 300, 500)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        expected = np.zeros((300, 500), bool)
        expected[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(pred.masks[i], expected)
        tile = tiled.tiles[pred.tile_indices[i]]
        assert tile.outer[2] <= x0 and tile.outer[3] >= x1 and tile.outer[0] <= y0 and tile.outer[1] >= y1
    # the prompts were shifted into the tiles' frames
    for tile_index, sent, _ in fake.calls:
        ox, oy = tiled.tiles[tile_index].offset
        assert (sent >= 0).all()
    # points go the same way
    pred = predictor.predict(points=[[[410.0, 250.0], [420, 260]]], embedding=tiled)
    assert pred.masks[0, 250:261, 410:421].all() and pred.masks[0].sum() == 11 * 11


class _FallbackPredictor(_BoxPredictor):
    """As _BoxPredictor, and reports the empty-mask fallback for every box wider than 70 px (tile frame)."""

    def predict(self, *args, **kwargs):
        pred = super().predict(*args, **kwargs)
        boxes = kwargs.get("boxes")
        pred.fell_back = np.asarray(boxes)[:, 2] - np.asarray(boxes)[:, 0] > 70
        return pred


def test_the_empty_mask_fallback_is_reported_per_object_across_tiles():
    tiled = _fake_tiled((300, 500), threshold=200, halo=20)
    boxes = np.array([[30.0, 40, 90, 100], [400, 220, 480, 290], [240, 100, 300, 165]])  # widths 60, 80, 60
    pred = TiledPredictor(_FallbackPredictor()).predict(boxes=boxes, embedding=tiled)
    assert len({pred.tile_indices[i] for i in range(3)}) > 1  # the objects were decoded in different tiles
    np.testing.assert_array_equal(pred.fell_back, [False, True, False])


def test_local_clicks_are_shifted_into_the_tile_frame():
    fake = _BoxPredictor()
    tiled = _fake_tiled((300, 500), threshold=200, halo=20)
    pred = TiledPredictor(fake).predict(points=[[410.0, 250.0]], boxes=[400.0, 220, 480, 290],
                                        mask_input=torch.zeros(1, 1, 256, 256), local_clicks=np.array([[410.0, 250.0]]),
                                        embedding=tiled, tile=None)
    ox, oy = tiled.tiles[pred.tile_indices[0]].offset
    np.testing.assert_allclose(fake.local_clicks[0], [[410.0 - ox, 250.0 - oy]])
    TiledPredictor(fake).predict(boxes=[400.0, 220, 480, 290], embedding=tiled, local_clicks=np.array([[410.0, 250.0]]))
    assert fake.local_clicks is None  # without previous logits there is nothing to keep


def test_guarded_clicks_reach_the_tile_and_are_recounted_when_points_fall_outside_it():
    fake = _BoxPredictor()
    tiled = _fake_tiled((300, 500), threshold=200, halo=20)
    logits = torch.zeros(1, 1, 256, 256)
    TiledPredictor(fake).predict(points=[[410.0, 250.0], [420.0, 260.0]], point_labels=[1, 0], boxes=[400.0, 220, 480, 290],
                                 mask_input=logits, embedding=tiled, guard_new_clicks=1, guard_edge_reach=2.0)
    assert fake.guard[0] == [1] and fake.guard[1] == 2.0 and fake.guard[2].shape == (1, 2, 2)
    # an early point far outside the chosen tile is dropped: the new click is still the last one, counted once
    TiledPredictor(fake).predict(points=[[10.0, 10.0], [410.0, 250.0], [420.0, 260.0]], point_labels=[1, 1, 0],
                                 mask_input=logits, embedding=tiled, tile=tiled.tiles[-1].index, guard_new_clicks=2)
    assert fake.guard[2].shape == (1, 2, 2) and fake.guard[0] == [2]
    TiledPredictor(fake).predict(points=[[410.0, 250.0], [10.0, 10.0]], point_labels=[1, 0],
                                 mask_input=logits, embedding=tiled, tile=tiled.tiles[-1].index, guard_new_clicks=1)
    assert fake.guard[2].shape == (1, 1, 2) and fake.guard[0] == [0]  # the new click lies outside the tile
    with pytest.raises(PromptError, match="guard_new_clicks"):
        TiledPredictor(fake).predict(points=[[410.0, 250.0]], mask_input=logits, embedding=tiled, guard_new_clicks=[1, 1])


def test_box_larger_than_a_tile_is_clipped_to_the_chosen_tile():
    fake = _BoxPredictor()
    tiled = _fake_tiled((300, 500), threshold=200, halo=20)
    pred = TiledPredictor(fake).predict(boxes=[0.0, 0, 500, 300], embedding=tiled)
    tile = tiled.tiles[pred.tile_indices[0]]
    y0, y1, x0, x1 = tile.outer
    assert pred.masks[0].sum() == (y1 - y0) * (x1 - x0)
    assert pred.masks[0, y0:y1, x0:x1].all()


def test_untiled_embedding_passes_through(litemedsam_predictor_and_image):
    predictor, image, box = litemedsam_predictor_and_image
    emb = predictor.compute_embedding(image)
    direct = predictor.predict(boxes=box, embedding=emb)
    routed = TiledPredictor(predictor).predict(boxes=box, embedding=emb)
    np.testing.assert_array_equal(direct.masks, routed.masks)


@pytest.fixture(scope="module")
def litemedsam_predictor_and_image(litemedsam):
    from napari_robustmedsam.engine.predictor import Predictor

    yy, xx = np.mgrid[:150, :330]
    image = (40 + 10 * np.sin(xx / 7.0)).astype(np.float32)
    disk = (yy - 75) ** 2 + (xx - 250) ** 2 < 35**2
    image[disk] = 220
    box = np.array([205.0, 30, 296, 121])
    return Predictor.from_loaded(litemedsam), image, box


def test_real_model_tiled_mask_lands_on_the_object(litemedsam, litemedsam_predictor_and_image, tmp_path):
    """LiteMedSAM over 2 tiles (threshold lowered to 200 px): the disk in the right tile is segmented."""
    from napari_robustmedsam.engine.embeddings import EmbeddingEngine

    _, image, box = litemedsam_predictor_and_image
    engine = EmbeddingEngine(litemedsam, cache_dir=tmp_path, tile_threshold=200, halo=10)
    seen = []
    tiled = engine.embed_image(image, progress=lambda d, t, m: seen.append((d, t)))
    assert isinstance(tiled, TiledEmbedding) and len(tiled) == 2 and seen == [(1, 2), (2, 2)]
    pred = engine.predict(tiled, boxes=box)
    yy, xx = np.mgrid[:150, :330]
    disk = (yy - 75) ** 2 + (xx - 250) ** 2 < 35**2
    mask = pred.masks[0]
    assert mask.shape == (150, 330)
    dice = 2 * (mask & disk).sum() / (mask.sum() + disk.sum())
    assert dice > 0.85
    tile = tiled.tiles[pred.tile_indices[0]]
    assert tile.outer[2] <= 205  # the tile holding the whole box was used
    assert not mask[:, : tile.outer[2]].any()
    # reopened from the cache: same tiles, no encoder run
    again = EmbeddingEngine(litemedsam, cache_dir=tmp_path, tile_threshold=200, halo=10)
    tiled2 = again.embed_image(image)
    assert again.stats["computed"] == 0 and again.stats["from_disk"] == 2
    np.testing.assert_array_equal(again.predict(tiled2, boxes=box).masks, pred.masks)

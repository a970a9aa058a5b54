"""Training inputs: folders, arrays (napari layers), volumes, splits, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from training.finetune.data import (
    TrainingError,
    items_from_arrays,
    items_from_folder,
    split_items,
)


def _pair(h=40, w=50, dtype=np.uint8, value=1):
    img = (np.arange(h * w).reshape(h, w) % 255).astype(dtype)
    lab = np.zeros((h, w), np.int32)
    lab[5:20, 10:30] = value
    return img, lab


def test_arrays_of_different_sizes_and_dtypes():
    a = _pair(40, 50, np.uint8)
    b = _pair(64, 32, np.float32)
    c_img = np.random.default_rng(0).integers(0, 4000, (30, 30, 3)).astype(np.uint16)
    c_lab = np.zeros((30, 30), np.uint8)
    c_lab[2:9, 2:9] = 3
    c_lab[20:25, 20:25] = 7
    items = items_from_arrays([a[0], b[0], c_img], [a[1], b[1], c_lab], names=["a", "b", "c"])
    assert [it.key for it in items] == ["a", "b", "c"]
    assert items[2].object_ids == [3, 7]
    assert items[1].image.dtype == np.float32


def test_volume_gives_labelled_slices_only():
    vol = np.random.default_rng(0).random((5, 32, 32)).astype(np.float32)
    lab = np.zeros((5, 32, 32), np.uint16)
    lab[1, 4:10, 4:10] = 1
    lab[3, 10:20, 10:20] = 2
    items = items_from_arrays(vol, lab, names=["vol"])
    assert [it.key for it in items] == ["vol/z001", "vol/z003"]
    assert all(it.source == "vol" for it in items)


def test_empty_labels_are_refused_with_a_clear_message():
    img, lab = _pair()
    with pytest.raises(TrainingError, match="all background"):
        items_from_arrays(img, np.zeros_like(lab))
    notices: list[str] = []
    items = items_from_arrays([img, img], [lab, np.zeros_like(lab)], names=["ok", "empty"], notices=notices)
    assert [it.key for it in items] == ["ok"]
    assert "empty" in notices[0]


def test_shape_mismatch_is_refused():
    img, lab = _pair(40, 50)
    with pytest.raises(TrainingError, match="do not match"):
        items_from_arrays(img, lab[:, :40])
    with pytest.raises(TrainingError, match="one label array per image"):
        items_from_arrays([img, img], [lab])
    with pytest.raises(TrainingError, match="integers"):
        items_from_arrays(img, lab.astype(np.float32) + 0.5)


def test_split_by_image_and_single_image():
    items = items_from_arrays([_pair()[0]] * 5, [_pair()[1]] * 5, names=[f"i{k}" for k in range(5)])
    train, val = split_items(items, 0.2, seed=1)
    assert len(train) == 4 and len(val) == 1
    assert {it.key for it in train}.isdisjoint({it.key for it in val})
    assert split_items(items, 0.2, seed=1)[1][0].key == val[0].key  # seeded
    notices: list[str] = []
    one = items_from_arrays(*_pair(), names=["only"])
    train, val = split_items(one, 0.2, notices=notices)
    assert train == val == one
    assert "only one image" in notices[0]


def test_folder_layout_and_missing_folder(tmp_path):
    from PIL import Image

    for k in range(2):
        img, lab = _pair()
        (tmp_path / "ds" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ds" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "ds" / "images" / f"im{k}.png")
        Image.fromarray(lab.astype(np.uint8)).save(tmp_path / "ds" / "masks" / f"im{k}.png")
    items = items_from_folder(tmp_path, min_object_px=1)
    assert [it.key for it in items] == ["ds/im0", "ds/im1"]
    with pytest.raises(TrainingError, match="not found"):
        items_from_folder(tmp_path / "nope")


def test_unknown_model_and_unwritable_out_dir(tmp_path):
    from training.finetune.heads import load_base_model
    from training.finetune.run_io import check_out_dir

    with pytest.raises(TrainingError, match="unknown model"):
        load_base_model("no_such_model", "cpu")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="cannot write to the output folder"):
        check_out_dir(blocker / "out")


def test_cli_reports_bad_input(tmp_path, capsys):
    from training.fit import main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["--data", str(tmp_path), "--out", str(blocker / "out")]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o")]) == 2
    assert "give training data" in capsys.readouterr().err


def test_items_from_an_annotation_session(tmp_path):
    from napari_robustmedsam.annotation.export import save_session
    from training.finetune.data import items_from_session

    img, lab = _pair(40, 50)
    np.save(tmp_path / "img.npy", img)
    save_session(tmp_path / "case.npy", lab, [], image_meta={"name": "img", "source": str(tmp_path / "img.npy")})
    items = items_from_session(tmp_path / "case.prompts.json")
    assert len(items) == 1 and items[0].object_ids == [1] and items[0].image.shape == (40, 50)
    items = items_from_session(tmp_path / "case.npy", image=img)  # image given explicitly
    assert items[0].labels.shape == (40, 50)
    save_session(tmp_path / "lost.npy", lab, [], image_meta={"name": "img"})
    with pytest.raises(TrainingError, match="--session-image"):
        items_from_session(tmp_path / "lost.npy")

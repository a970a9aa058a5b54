"""CLI on medical volumes: segment --slice into a full-volume label file, -o with geometry, embed a DICOM folder."""

from __future__ import annotations

import numpy as np
import pytest

from medical_fixtures import synthetic_hu, write_dicom_series, write_itk
from napari_robustmedsam.cli import main
from napari_robustmedsam.io.medical import read_medical

BOX = ["--box", "12", "6", "38", "34"]  # around the soft-tissue disc


@pytest.fixture(scope="module")
def ct_nifti(tmp_path_factory):
    return write_itk(tmp_path_factory.mktemp("ct") / "ct.nii.gz", synthetic_hu())


def test_segment_into_full_volume_labels_keeps_geometry_and_other_slices(ct_nifti, tmp_path, capsys):
    image, geo = read_medical(ct_nifti)
    labels_path = tmp_path / "ct_labels.nii.gz"
    assert main(["segment", str(ct_nifti), "--slice", "2", *BOX, "--into", str(labels_path), "--device", "cpu"]) == 0
    assert "window: soft-tissue" in capsys.readouterr().err  # CT recognised, windowed for the model
    labels, lgeo = read_medical(labels_path)
    assert labels.shape == image.shape
    assert lgeo.differences(geo) == []
    assert labels[2].sum() > 100 and not labels[[0, 1, 3, 4, 5]].any()
    first = labels[2].copy()
    assert main(["segment", str(ct_nifti), "--slice", "4", *BOX, "--into", str(labels_path), "--device", "cpu"]) == 0
    labels, _ = read_medical(labels_path)
    assert np.array_equal(labels[2], first) and labels[4].any()


def test_segment_into_refuses_labels_on_another_grid_and_the_source(ct_nifti, tmp_path, capsys):
    other = write_itk(tmp_path / "other.nii.gz", np.zeros((6, 40, 48), np.uint8), spacing=(1, 1, 1), origin=(0, 0, 0),
                      direction=np.eye(3))
    before = other.read_bytes()
    assert main(["segment", str(ct_nifti), "--slice", "2", *BOX, "--into", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "do not fit the image: spacing (1, 1, 1) vs (0.78, 0.78, 6.5)" in err and "origin" in err
    assert other.read_bytes() == before
    assert main(["segment", str(ct_nifti), "--slice", "2", *BOX, "--into", str(ct_nifti), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "it is an input of this command" in err or "is the image being annotated" in err
    assert main(["segment", str(ct_nifti), *BOX, "--into", str(tmp_path / "x.nii.gz"), "--device", "cpu"]) == 2
    assert "--slice" in capsys.readouterr().err


def test_segment_output_slice_is_placed_at_its_slice(ct_nifti, tmp_path):
    _, geo = read_medical(ct_nifti)
    out = tmp_path / "slice3.nrrd"
    assert main(["segment", str(ct_nifti), "--slice", "3", *BOX, "-o", str(out), "--device", "cpu",
                 "--window", "none"]) == 0
    mask, mgeo = read_medical(out)
    assert mask.shape == (1, 40, 48) and mask.any()
    assert np.allclose(mgeo.origin, geo.slab(3).origin, atol=1e-5)
    assert np.allclose(mgeo.spacing, geo.spacing) and np.allclose(mgeo.direction, geo.direction)


def test_embed_dicom_folder_with_window(tmp_path, capsys):
    folder = tmp_path / "series"
    write_dicom_series(folder, synthetic_hu((3, 40, 48)))
    cache = tmp_path / "cache"
    args = ["embed", str(folder), "--cache", str(cache), "--device", "cpu", "--no-progress"]
    assert main([*args, "--window", "lung"]) == 0
    out = capsys.readouterr()
    assert "window: lung" in out.err and "3 computed" in out.out
    assert main([*args, "--window=-600,1500"]) == 0  # the same window given as L,W: the same entries
    assert "0 computed, 3 already in the cache" in capsys.readouterr().out
    assert main([*args, "--window", "bone"]) == 0  # another window: new entries
    assert "3 computed" in capsys.readouterr().out
    assert main([*args, "--window", "liver"]) == 2
    assert "unknown window 'liver'" in capsys.readouterr().err

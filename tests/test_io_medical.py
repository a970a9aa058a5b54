"""Medical volumes in and labels out with their geometry (io/medical.py): round trips and bad input."""

from __future__ import annotations

import errno
import warnings

import numpy as np
import pytest

from medical_fixtures import (
    DIRECTION,
    ORIGIN,
    SPACING,
    synthetic_hu,
    write_dicom_series,
    write_enhanced_ct,
    write_itk,
)
from napari_robustmedsam.errors import ImageInputError, UserFacingError
from napari_robustmedsam.io.medical import (
    Geometry,
    MedicalReadWarning,
    check_labels_fit,
    read_medical,
)
from napari_robustmedsam.io.medical_labels import write_labels

TIGHT = dict(rtol=0, atol=1e-5)


def _labels_for(volume: np.ndarray) -> np.ndarray:
    labels = np.zeros(volume.shape, np.uint16)
    labels[volume > 500] = 2
    labels[(volume > 0) & (volume < 100)] = 1
    return labels


def _assert_same_geometry(a: Geometry, b: Geometry) -> None:
    assert np.allclose(a.spacing, b.spacing, **TIGHT)
    assert np.allclose(a.origin, b.origin, **TIGHT)
    assert np.allclose(a.direction, b.direction, **TIGHT)
    assert np.allclose(a.affine(), b.affine(), **TIGHT)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_itk_formats_round_trip_geometry(tmp_path, suffix):
    volume = synthetic_hu()
    src = write_itk(tmp_path / f"ct{suffix}", volume)
    arr, geo = read_medical(src)
    assert arr.shape == volume.shape and np.array_equal(arr, volume)
    # the reader gives back what was written (float32 storage in NIfTI headers)
    assert np.allclose(geo.spacing, SPACING, atol=1e-6)
    assert np.allclose(geo.origin, ORIGIN, atol=1e-4)
    assert np.allclose(geo.direction, DIRECTION.ravel(), atol=1e-6)
    assert geo.napari_scale() == pytest.approx(SPACING[::-1], abs=1e-6)
    assert geo.napari_translate() == pytest.approx(ORIGIN[::-1], abs=1e-4)
    assert geo.name == "ct" and geo.source == str(src)

    labels = _labels_for(arr)
    out = write_labels(tmp_path / f"labels{suffix}", labels, geo)
    back, back_geo = read_medical(out)
    assert np.array_equal(back, labels)
    _assert_same_geometry(back_geo, geo)


def test_nifti_labels_keep_the_affine_nibabel_sees(tmp_path):
    nib = pytest.importorskip("nibabel")
    src = write_itk(tmp_path / "brain.nii.gz", synthetic_hu())
    arr, geo = read_medical(src)
    out = write_labels(tmp_path / "brain_labels.nii.gz", _labels_for(arr), geo)
    a, b = nib.load(str(src)), nib.load(str(out))
    assert np.allclose(a.affine, b.affine, **TIGHT)
    assert np.allclose(a.header.get_zooms(), b.header.get_zooms(), **TIGHT)
    # RAS affine of a grid with spacing 0.78 x 0.78 x 6.5 (not diag(-1, -1, 1))
    assert np.allclose(np.linalg.norm(a.affine[:3, :3], axis=0), SPACING, atol=1e-6)


def test_dicom_series_round_trip_hu_and_geometry(tmp_path):
    volume = synthetic_hu()
    folder = tmp_path / "series"
    write_dicom_series(folder, volume, description="CT head 5mm")
    arr, geo = read_medical(folder)
    assert arr.shape == volume.shape
    assert np.array_equal(arr.astype(np.int32), volume.astype(np.int32))  # rescale applied: HU
    assert arr.min() < -900
    assert geo.modality == "CT" and geo.name == "CT head 5mm" and geo.file_format == "dicom"
    assert np.allclose(geo.spacing, SPACING, atol=1e-6)
    assert np.allclose(geo.origin, ORIGIN, atol=1e-5)
    assert np.allclose(geo.direction, DIRECTION.ravel(), atol=1e-6)
    # DICOM in -> NIfTI out with the DICOM geometry
    out = write_labels(tmp_path / "labels.nii.gz", _labels_for(arr), geo)
    back, back_geo = read_medical(out)
    assert np.array_equal(back, _labels_for(arr))
    _assert_same_geometry(back_geo, geo)


def test_single_dicom_file_is_one_rescaled_slice(tmp_path):
    volume = synthetic_hu()
    paths = write_dicom_series(tmp_path / "s", volume)
    path = sorted(paths)[0]
    import pydicom

    k = int(pydicom.dcmread(path).InstanceNumber) - 1
    arr, geo = read_medical(path)
    assert arr.shape == volume.shape[1:]
    assert np.array_equal(arr.astype(np.int32), volume[k].astype(np.int32))
    assert np.allclose(geo.origin, np.asarray(ORIGIN) + k * SPACING[2] * DIRECTION[:, 2], atol=1e-5)
    assert geo.napari_scale(2) == pytest.approx((SPACING[1], SPACING[0]))


def test_enhanced_multiframe_per_frame_rescale_and_geometry(tmp_path):
    volume = synthetic_hu()
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", volume)
    arr, geo = read_medical(path)
    assert np.array_equal(arr.astype(np.int32), volume.astype(np.int32))
    assert np.allclose(geo.spacing, SPACING, atol=1e-6)
    assert np.allclose(geo.origin, ORIGIN, atol=1e-5)
    assert np.allclose(geo.direction, DIRECTION.ravel(), atol=1e-6)


# ---- bad input ------------------------------------------------------------------------------------
def test_mixed_series_reads_the_largest_and_lists_them(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(folder, synthetic_hu(), description="big", series_uid="1.2.3.100")
    write_dicom_series(folder, synthetic_hu((3, 40, 48), seed=2), description="scout", series_uid="1.2.3.200")
    with pytest.warns(MedicalReadWarning, match=r"2 DICOM series.*1\.2\.3\.100.*1\.2\.3\.200"):
        arr, geo = read_medical(folder)
    assert arr.shape[0] == 6 and geo.series_uid == "1.2.3.100"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr, geo = read_medical(folder, series="1.2.3.200")
    assert arr.shape[0] == 3 and geo.name == "scout"
    assert read_medical(folder, series=1)[0].shape[0] == 3
    with pytest.raises(ImageInputError, match=r"no DICOM series '9\.9'.*1\.2\.3\.100.*'big'.*1\.2\.3\.200"):
        read_medical(folder, series="9.9")


def test_a_series_without_a_description_is_named_after_its_folder(tmp_path):
    folder = tmp_path / "knee"
    write_dicom_series(folder, synthetic_hu(), description="", series_uid="1.2.3.4.5.6.7.8.100")
    assert read_medical(folder)[1].name == "knee"  # not the UID
    write_dicom_series(folder, synthetic_hu((3, 40, 48), seed=2), description="", series_uid="1.2.3.4.5.6.7.8.200")
    with pytest.warns(MedicalReadWarning):
        assert read_medical(folder)[1].name == "knee (UID ...7.8.100)"  # both are series number 3: the UIDs tell them apart


def test_missing_slice_is_named(tmp_path):
    folder = tmp_path / "gap"
    write_dicom_series(folder, synthetic_hu(), skip=(3,))
    with pytest.raises(ImageInputError, match=r"1 missing slice.*6\.5 mm.*re-export"):
        read_medical(folder)


def test_uneven_spacing_is_named(tmp_path):
    folder = tmp_path / "uneven"
    write_dicom_series(folder, synthetic_hu(), positions_mm=[0, 6.5, 13, 17, 23.5, 30])
    with pytest.raises(ImageInputError, match="uneven slice spacing"):
        read_medical(folder)


def test_compressed_without_decoder_names_the_package(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import HTJ2KLossless

    if get_decoder(HTJ2KLossless).is_available:
        pytest.skip("an HTJ2K decoder is installed here")
    path = write_enhanced_ct(tmp_path / "htj2k.dcm", synthetic_hu(), transfer_syntax=HTJ2KLossless)
    with pytest.raises(ImageInputError, match=r"High-Throughput JPEG 2000.*pip install pylibjpeg pylibjpeg-openjpeg"):
        read_medical(path)


def test_4d_nifti_needs_a_timepoint(tmp_path):
    import SimpleITK as sitk

    data = np.stack([synthetic_hu(seed=s) for s in range(3)])  # (T, Z, Y, X)
    image = sitk.GetImageFromArray(data, isVector=False)
    image.SetSpacing((*SPACING, 2.0))
    image.SetOrigin((*ORIGIN, 0.0))
    sitk.WriteImage(image, str(tmp_path / "fmri.nii.gz"))
    with pytest.raises(ImageInputError, match=r"4D image with 3 volumes: choose one with --timepoint"):
        read_medical(tmp_path / "fmri.nii.gz")
    arr, geo = read_medical(tmp_path / "fmri.nii.gz", timepoint=2)
    assert np.array_equal(arr, data[2]) and geo.ndim == 3
    assert np.allclose(geo.spacing, SPACING, atol=1e-6)
    with pytest.raises(ImageInputError, match="outside 0..2"):
        read_medical(tmp_path / "fmri.nii.gz", timepoint=3)


def test_non_orthogonal_direction_is_refused(tmp_path):
    sheared = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sheared /= np.linalg.norm(sheared, axis=0)
    path = write_itk(tmp_path / "sheared.nrrd", synthetic_hu(), direction=sheared)
    with pytest.raises(ImageInputError, match="non-orthogonal direction cosines.*resample"):
        read_medical(path)


def test_gantry_tilt_series_is_refused(tmp_path):
    folder = tmp_path / "tilt"
    vol = synthetic_hu()
    write_dicom_series(folder, vol)
    import pydicom

    for f in folder.iterdir():  # slices step sideways in y: a tilted gantry
        ds = pydicom.dcmread(f)
        k = int(ds.InstanceNumber) - 1
        pos = [float(v) for v in ds.ImagePositionPatient]
        pos[1] += 2.0 * k
        ds.ImagePositionPatient = pos
        ds.save_as(f)
    with pytest.raises(ImageInputError, match="non-orthogonal direction cosines.*gantry"):
        read_medical(folder)


def test_empty_series_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    with pytest.raises(ImageInputError, match=r"no DICOM image series in .*1 file"):
        read_medical(folder)


def test_labels_geometry_mismatch_says_what_differs(tmp_path):
    arr, geo = read_medical(write_itk(tmp_path / "ct.nii.gz", synthetic_hu()))
    labels_geo = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    with pytest.raises(UserFacingError, match=r"do not fit the image: spacing \(1, 1, 1\) vs \(0\.78, 0\.78, 6\.5\).*origin"):
        check_labels_fit(arr.shape, labels_geo, arr.shape, geo)
    with pytest.raises(UserFacingError, match=r"shape \(6, 40, 40\) vs \(6, 40, 48\)"):
        check_labels_fit((6, 40, 40), geo, arr.shape, geo)
    check_labels_fit(arr.shape, geo, arr.shape, geo)  # the same grid passes


def test_saving_over_the_source_image_is_refused(tmp_path):
    src = write_itk(tmp_path / "ct.nii.gz", synthetic_hu())
    before = src.read_bytes()
    arr, geo = read_medical(src)
    with pytest.raises(UserFacingError, match="is the image being annotated"):
        write_labels(src, _labels_for(arr), geo)
    assert src.read_bytes() == before
    folder = tmp_path / "series"
    paths = write_dicom_series(folder, synthetic_hu())
    arr, geo = read_medical(folder)
    with pytest.raises(UserFacingError, match="would go into the DICOM folder being annotated"):
        write_labels(paths[0], _labels_for(arr), geo)


def test_disk_full_keeps_the_earlier_labels(tmp_path, monkeypatch):
    import SimpleITK as sitk

    arr, geo = read_medical(write_itk(tmp_path / "ct.nii.gz", synthetic_hu()))
    out = write_labels(tmp_path / "labels.nii.gz", _labels_for(arr), geo)
    before = out.read_bytes()

    def full_disk(image, path, *args, **kwargs):
        with open(path, "wb") as fh:  # a partial file, then the disk is full
            fh.write(b"\x00" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    with pytest.raises(UserFacingError, match="No space left on device.*earlier file is unchanged"):
        write_labels(out, np.zeros_like(arr, dtype=np.uint16), geo)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "labels.nii.gz"]  # no temporary left


def test_two_slices_at_one_position_are_refused(tmp_path):
    folder = tmp_path / "dup"
    write_dicom_series(folder, synthetic_hu(), positions_mm=[0, 6.5, 13, 13, 19.5, 26])
    with pytest.raises(ImageInputError, match="two slices at the same position.*mixes acquisitions"):
        read_medical(folder)


def test_series_without_pixel_data_is_refused(tmp_path):
    import pydicom

    folder = tmp_path / "nopix"
    write_dicom_series(folder, synthetic_hu((2, 40, 48)))
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        del ds.PixelData
        ds.save_as(f)
    with pytest.raises(ImageInputError, match="no DICOM image series|holds no images"):
        read_medical(folder)
    one = sorted(folder.iterdir())[0]
    with pytest.raises(ImageInputError, match="holds no image"):
        read_medical(one)


def test_dicom_series_labels_as_dicom_seg(tmp_path):
    hd = pytest.importorskip("highdicom")
    volume = synthetic_hu()
    folder = tmp_path / "series"
    write_dicom_series(folder, volume)
    arr, geo = read_medical(folder)
    labels = _labels_for(arr)
    labels[:2] = 0  # not symmetric along the slices: a flipped or shifted SEG would not match
    labels[-1, :5] = 2
    out = write_labels(tmp_path / "labels.seg.dcm", labels, geo, class_names={2: "bone"})
    seg = hd.seg.segread(str(out))
    assert [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()] == ["label 1", "bone"]
    vol = seg.get_volume(combine_segments=True)
    # highdicom's volume may order its axes differently: map its voxel indices into ours through both affines
    ours = geo.affine()[:, [2, 1, 0, 3]]  # (slice, row, column) index order, as highdicom's
    to_ours = np.linalg.inv(ours) @ vol.affine
    rotation = np.round(to_ours[:3, :3])
    assert np.allclose(to_ours[:3, :3], rotation, atol=1e-4) and np.allclose(np.abs(rotation), np.eye(3))
    back = np.asarray(vol.array)
    for axis in range(3):
        if rotation[axis, axis] < 0:
            back = np.flip(back, axis)
    assert np.allclose(to_ours[:3, 3], [labels.shape[a] - 1 if rotation[a, a] < 0 else 0 for a in range(3)], atol=1e-3)
    assert back.shape == labels.shape and np.array_equal(back, labels)
    nifti_arr, nifti_geo = read_medical(write_itk(tmp_path / "ct.nii.gz", volume))
    with pytest.raises(UserFacingError, match="only for a DICOM image"):
        write_labels(tmp_path / "x.dcm", labels, nifti_geo)


def test_session_saved_as_dicom_seg_names_segments_after_classes(tmp_path):
    hd = pytest.importorskip("highdicom")
    from napari_robustmedsam.annotation.export import save_session

    folder = tmp_path / "series"
    write_dicom_series(folder, synthetic_hu())
    arr, geo = read_medical(folder)
    labels_path, json_path = save_session(tmp_path / "ct.seg.dcm", _labels_for(arr), [], {"source": str(folder)},
                                          geometry=geo, class_names={1: "soft tissue", 2: "bone"})
    seg = hd.seg.segread(str(labels_path))
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["soft tissue", "bone"]
    assert json_path.name == "ct.seg.prompts.json" and json_path.exists()

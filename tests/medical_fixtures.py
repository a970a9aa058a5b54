"""Synthetic medical volumes written with the field's libraries (SimpleITK, pydicom), for reader/writer tests.

The volume has the geometry of a clinical brain MRI / CT stack: spacing 0.78 x 0.78 x 6.5 mm, origin
(-100, -120, -70) mm and a direction rotated 20 degrees about x (a tilted acquisition plane).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPACING = (0.78, 0.78, 6.5)  # ITK order (x, y, z)
ORIGIN = (-100.0, -120.0, -70.0)
_A = np.deg2rad(20.0)
DIRECTION = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(_A), -np.sin(_A)], [0.0, np.sin(_A), np.cos(_A)]])
SHAPE = (6, 40, 48)  # (Z, Y, X)


def synthetic_hu(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """int16 CT-like volume in HU: air -1000 outside, soft tissue ~40 inside a disc, a bright 'bone' square."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    vol = np.full(shape, -1000, np.int16)
    body = (y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 < (min(shape[1:]) * 0.4) ** 2
    vol[np.broadcast_to(body, shape)] = 40
    vol[:, 5:10, 20:28] = 900
    vol += rng.integers(-5, 6, size=shape).astype(np.int16)
    return vol


def write_itk(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path))
    return Path(path)


def _base_dataset(series_uid: str, study_uid: str, description: str, modality: str = "CT"):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.SeriesNumber = 3
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "SYN001"
    return ds


def _set_pixels(ds, slice_hu: np.ndarray, intercept: float = -1024.0, slope: float = 1.0) -> None:
    stored = np.round((slice_hu.astype(np.float64) - intercept) / slope).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.PixelData = stored.tobytes()


def write_dicom_series(folder: Path, volume_hu: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION,
                       description: str = "synthetic CT", series_uid: str | None = None, study_uid: str | None = None,
                       skip: tuple[int, ...] = (), positions_mm: list[float] | None = None) -> list[Path]:
    """One classic CT file per slice (file names shuffled relative to the slice order)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    d = np.asarray(direction)
    row, col, normal = d[:, 0], d[:, 1], d[:, 2]
    paths = []
    order = np.random.default_rng(1).permutation(volume_hu.shape[0])
    for k in order:
        if k in skip:
            continue
        ds = _base_dataset(series_uid, study_uid, description)
        ds.InstanceNumber = int(k) + 1
        along = positions_mm[k] if positions_mm is not None else k * spacing[2]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + along * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (row spacing, column spacing)
        ds.SliceThickness = float(spacing[2])
        _set_pixels(ds, volume_hu[k])
        path = folder / f"IM{int(k) * 7 % 97:04d}_{series_uid[-4:]}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_ct(path: Path, volume_hu: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION,
                      transfer_syntax=None) -> Path:
    """One enhanced multi-frame CT file: per-frame positions and rescale, shared orientation and spacing."""
    import pydicom
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = _base_dataset(generate_uid(), generate_uid(), "enhanced CT")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    d = np.asarray(direction)
    shared = pydicom.Dataset()
    orient = pydicom.Dataset()
    orient.ImageOrientationPatient = [float(v) for v in (*d[:, 0], *d[:, 1])]
    measures = pydicom.Dataset()
    measures.PixelSpacing = [float(spacing[1]), float(spacing[0])]
    measures.SliceThickness = float(spacing[2])
    shared.PlaneOrientationSequence = [orient]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    n = volume_hu.shape[0]
    stored = []
    for k in range(n):
        item = pydicom.Dataset()
        pos = pydicom.Dataset()
        pos.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * d[:, 2]]
        item.PlanePositionSequence = [pos]
        transform = pydicom.Dataset()
        intercept = -1024.0 if k % 2 == 0 else -2048.0  # per-frame rescale: each frame must use its own
        transform.RescaleIntercept = intercept
        transform.RescaleSlope = 1.0
        transform.RescaleType = "HU"
        item.PixelValueTransformationSequence = [transform]
        frames.append(item)
        stored.append(np.round(volume_hu[k].astype(np.float64) - intercept).astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.NumberOfFrames = n
    arr = np.stack(stored)
    ds.Rows, ds.Columns = arr.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(16) for _ in range(n)])  # not decodable
        ds["PixelData"].VR = "OB"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)

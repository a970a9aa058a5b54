"""Labels drawn on a DICOM series, written as a DICOM Segmentation (DICOM-SEG) with highdicom.

The SEG references the series' instances and carries their geometry frame by frame, so PACS viewers,
3D Slicer (QuantitativeReporting) and OHIF show it on the images. One segment per label value, named after
its class when the session named one. highdicom is optional: without it, save the labels as NIfTI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserFacingError
from .atomic import atomic_write_path
from .medical import Geometry, list_dicom_series, refuse_source_overwrite


#: Patient / study attributes a SEG copies from its source images (type 2: present, possibly empty).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                 "AccessionNumber", "ReferringPhysicianName")


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise UserFacingError(
            "writing DICOM-SEG needs highdicom: pip install highdicom (or save the labels as .nii.gz, which keeps "
            "the DICOM geometry)"
        ) from None
    return highdicom


def _source_datasets(geometry: Geometry) -> list:
    """The source series' datasets, in the order of the volume's slices (first slice at the origin)."""
    import pydicom

    source = Path(geometry.source or "")
    if geometry.file_format != "dicom" or not source.is_dir() or not geometry.series_uid:
        raise UserFacingError(
            "DICOM-SEG is written for labels drawn on a DICOM series folder; save these labels as .nii.gz"
        )
    matches = [s for s in list_dicom_series(source) if s.uid == geometry.series_uid]
    if not matches:
        raise UserFacingError(f"the DICOM series {geometry.series_uid} is no longer in {source}; save as .nii.gz")
    datasets = [pydicom.dcmread(f) for f in matches[0].files]
    for ds in datasets:  # anonymised series often drop these type-2 attributes; the SEG needs them (empty is valid)
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    normal = geometry.direction_matrix[:, 2]
    along = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in datasets]
    return [datasets[i] for i in np.argsort(along, kind="stable")]


def write_dicom_seg(path: str | Path, labels: np.ndarray, geometry: Geometry,
                    class_names: dict[int, str] | None = None) -> Path:
    """Write ``labels`` (Z, Y, X) drawn on the DICOM series of ``geometry`` as a DICOM-SEG file (atomic)."""
    from .. import __version__

    hd = _highdicom()
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    p = Path(path)
    refuse_source_overwrite(p, geometry)
    arr = np.asarray(labels)
    datasets = _source_datasets(geometry)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)):
        raise UserFacingError(
            f"labels of shape {arr.shape} do not fit the DICOM series ({len(datasets)} slices of "
            f"{datasets[0].Rows} x {datasets[0].Columns})"
        )
    values = [int(v) for v in np.unique(arr) if v != 0]
    if not values:
        raise UserFacingError("the labels are empty: there is no segment to write into a DICOM-SEG")
    segment_map = np.zeros(arr.shape, np.uint16)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="napari-robustmedsam", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, value in enumerate(values, start=1):
        segment_map[arr == value] = number
        name = (class_names or {}).get(value) or f"label {value}"
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC, algorithm_identification=algorithm,
        ))
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=segment_map, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=9001,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="napari-robustmedsam",
            manufacturer_model_name="napari-robustmedsam", software_versions=__version__, device_serial_number="0",
            content_label="LABELS", omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise UserFacingError(f"cannot build a DICOM-SEG from this series ({err}); save the labels as .nii.gz") from err
    try:
        with atomic_write_path(p) as tmp:
            seg.save_as(str(tmp))
    except OSError as err:
        raise UserFacingError(f"cannot write {p}: {err.strerror or err}; the earlier file is unchanged") from err
    return p

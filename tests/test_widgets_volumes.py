"""Medical volumes in napari: the npe2 reader (DICOM folder, NIfTI), File > Save with the geometry, the window
row, and the launcher's --volume with the Export panel's prompts.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medical_fixtures import ORIGIN, SPACING, synthetic_hu, write_dicom_series, write_itk
from napari_robustmedsam.annotation.model_info import preimport_model_modules
from napari_robustmedsam.io.medical import GEOMETRY_KEY, read_medical
from widget_helpers import shot

preimport_model_modules()  # before any viewer exists (triton + Mesa GL, see its docstring)

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


@pytest.mark.gui
def test_dicom_series_opens_through_napari_reader(make_napari_viewer, tmp_path, qtbot):
    from qtpy.QtWidgets import QApplication

    folder = tmp_path / "CT_series"
    volume = synthetic_hu((8, 96, 96))
    write_dicom_series(folder, volume, description="CT abdomen 6.5mm")
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1000, 750)
    layers = viewer.open(str(folder), plugin="napari-robustmedsam")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.name == "CT abdomen 6.5mm"
    assert np.array_equal(np.asarray(layer.data).astype(np.int32), volume.astype(np.int32))  # HU
    assert tuple(layer.scale) == pytest.approx(SPACING[::-1])
    assert tuple(layer.translate) == pytest.approx(ORIGIN[::-1])
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)  # CT: soft-tissue window shown
    assert layer.metadata[GEOMETRY_KEY]["modality"] == "CT"
    viewer.dims.set_current_step(0, 4)
    viewer.reset_view()
    for _ in range(5):
        QApplication.processEvents()
    path = shot(viewer, "dicom_series_reader")  # tests/artifacts (ignored by git)
    if os.environ.get("ROBUSTMEDSAM_UPDATE_DOC_IMAGES"):  # refresh the docs' copy on request only
        shutil.copyfile(path, DOCS_IMAGES / "dicom_series_reader.png")
    assert path.stat().st_size > 10_000

    # labels drawn on it and saved through File > Save (the plugin's writer) keep the DICOM geometry
    labels = viewer.add_labels((np.asarray(layer.data) > 0).astype(np.uint8), name="labels",
                               scale=layer.scale, translate=layer.translate,
                               metadata={GEOMETRY_KEY: layer.metadata[GEOMETRY_KEY]})
    out = tmp_path / "ct_labels.nii.gz"
    import npe2

    written = npe2.write(str(out), [labels.as_layer_data_tuple()], plugin_name="napari-robustmedsam")
    assert written == [str(out)]
    back, geo = read_medical(out)
    assert np.array_equal(back, np.asarray(labels.data))
    _, image_geo = read_medical(folder)
    assert geo.differences(image_geo) == []
    # or as a DICOM-SEG referencing the series (File > Save as .dcm)
    hd = pytest.importorskip("highdicom")
    seg_path = tmp_path / "ct_labels.seg.dcm"
    assert npe2.write(str(seg_path), [labels.as_layer_data_tuple()], plugin_name="napari-robustmedsam") == [str(seg_path)]
    seg = hd.seg.segread(str(seg_path))
    assert seg.get_segment_numbers() == [1] and seg.Modality == "SEG"
    import pydicom

    source = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


@pytest.mark.gui
def test_nifti_reader_and_writer_refuse_the_source(make_napari_viewer, tmp_path):
    import npe2

    src = write_itk(tmp_path / "brain.nii.gz", synthetic_hu())
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(src), plugin="napari-robustmedsam")
    assert layer.name == "brain" and tuple(layer.scale) == pytest.approx(SPACING[::-1], abs=1e-6)
    labels = viewer.add_labels(np.zeros(layer.data.shape, np.uint8), metadata=dict(layer.metadata))
    before = src.read_bytes()
    with pytest.raises(Exception, match="is the image being annotated"):
        npe2.write(str(src), [labels.as_layer_data_tuple()], plugin_name="napari-robustmedsam")
    assert src.read_bytes() == before


@pytest.mark.gui
def test_launcher_volume_geometry_window_and_prompts_json(make_napari_viewer, tmp_path, monkeypatch):
    import napari

    from napari_robustmedsam import launch
    from napari_robustmedsam.engine.windows import WINDOW_KEY, WindowedView

    # the fixture's viewer (cleaned up by napari's test fixture, as a second plain napari.Viewer in one test
    # session would not be)
    monkeypatch.setattr(napari, "Viewer", lambda title=None, **kw: make_napari_viewer(title=title, show=True))
    src = write_itk(tmp_path / "ct.nii.gz", synthetic_hu())
    viewer, startup, _ = launch.setup(launch.parse_args(["--volume", str(src), "--no-embed", "--device", "cpu"]))
    import time

    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + 600  # the launcher loads the model and warms napari's drawing code in workers
    while not startup.ready:
        assert time.monotonic() < deadline, "the launcher did not get ready"
        QApplication.processEvents()
        time.sleep(0.02)
    widget = startup.widget
    layer = viewer.layers["ct"]
    assert tuple(layer.scale) == pytest.approx(SPACING[::-1], abs=1e-6)
    assert tuple(layer.translate) == pytest.approx(ORIGIN[::-1], abs=1e-4)
    assert layer.metadata[WINDOW_KEY] == "soft-tissue"
    annotator = widget.annotator
    assert annotator.window_control.combo.currentText() == "soft-tissue"
    assert isinstance(annotator.embeddings.data, WindowedView)
    assert annotator.embeddings.data.window.name == "soft-tissue"
    # the window row: lung for the display and the model, the data stay in HU
    annotator.window_control.combo.setCurrentText("lung")
    assert tuple(layer.contrast_limits) == (-1350.0, 150.0) and layer.metadata[WINDOW_KEY] == "lung"
    assert annotator.embeddings.data.window.name == "lung" and layer.data.min() < -900
    annotator.window_control.combo.setCurrentText("custom (L,W)")
    annotator.window_control.custom.setText("50,oops")
    annotator.window_control.custom.returnPressed.emit()
    assert "unknown window" in annotator.banner.text() and layer.metadata[WINDOW_KEY] == "lung"
    annotator.window_control.custom.setText("50,350")
    annotator.window_control.custom.returnPressed.emit()
    assert layer.metadata[WINDOW_KEY] == "50,350" and tuple(layer.contrast_limits) == (-125.0, 225.0)
    # the committed labels carry the geometry; the Export panel writes them on the image's grid
    assert annotator.committed_layer.metadata[GEOMETRY_KEY]["source"] == str(src)  # for File > Save
    annotator.committed_layer.data = (np.asarray(layer.data) > 0).astype(np.uint32)
    annotator.label_control.classes.choose("1=body")
    out = tmp_path / "ct_labels.nii.gz"
    assert widget.export.save(out) is not None, widget.export.banner.text()
    back, geo = read_medical(out)
    _, image_geo = read_medical(src)
    assert geo.differences(image_geo) == [] and back.any()
    meta = json.loads((tmp_path / "ct_labels.prompts.json").read_text())
    assert meta["image"]["source"] == str(src)
    assert meta["image"]["window"] == "50,350"
    assert meta["image"]["geometry"]["spacing"] == pytest.approx(list(SPACING), abs=1e-6)
    assert meta["model"]["name"]
    assert meta["extra"]["label_classes"] == {"1": "body"}
    # saving over the image is refused and shown
    assert widget.export.save(src) is None
    assert any(m in widget.export.banner.text() for m in ("is an input of this command", "is the image being annotated"))
    # labels on another grid are refused on resume, saying what differs
    other = write_itk(tmp_path / "other.nii.gz", np.zeros(layer.data.shape, np.uint16), spacing=(1, 1, 1))
    assert not widget.export.load(other)
    assert "spacing (1, 1, 1) vs (0.78, 0.78, 6.5)" in widget.export.banner.text()
    assert widget.export.load(out)


@pytest.mark.gui
def test_label_row_commits_a_class_into_the_users_labels_layer(make_napari_viewer, tmp_path):
    from napari_robustmedsam.widgets.annotator import AnnotatorWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(synthetic_hu((3, 40, 48)), name="ct")
    existing = np.zeros((3, 40, 48), np.uint16)
    existing[1, 10:20, 10:20] = 3
    mine = viewer.add_labels(existing, name="my segmentation")
    annotator = AnnotatorWidget(viewer)
    annotator.set_image_layer(image)
    control = annotator.label_control
    assert control.target_combo.findText("my segmentation") > 0
    assert control.use_target("my segmentation") and annotator.committed_layer is mine
    # start from label 3: it becomes the current object; the commit writes it back under 3
    assert control.start_from_label("3") == 1
    assert np.array_equal(annotator.session.current, existing == 3)
    smaller = np.zeros((40, 48), bool)
    smaller[10:15, 10:20] = True
    annotator.session.set_current_slice(1, smaller)
    assert annotator.commit() == 3
    assert int((np.asarray(mine.data) == 3).sum()) == 50  # the correction removed half of it
    # a named class: the value is written into the user's layer, the name into the record
    object_mask = np.zeros((40, 48), bool)
    object_mask[25:30, 25:35] = True
    annotator.session.set_current_slice(2, object_mask)
    control.label_edit.setText("2=oedema")
    assert annotator.commit() == 2
    assert int((np.asarray(mine.data) == 2).sum()) == 50
    assert annotator.session.objects[2].info["class"] == "oedema"
    assert control.start_from_label("9") == 0 and "label 9 is not in the labels" in annotator.banner.text()
    # a labels layer on another grid is refused, saying what differs
    from napari_robustmedsam.io.medical import GEOMETRY_KEY, Geometry

    image.metadata[GEOMETRY_KEY] = Geometry((0.78, 0.78, 6.5), (0, 0, 0), tuple(np.eye(3).ravel())).to_json()
    other = viewer.add_labels(np.zeros((3, 40, 48), np.uint8), name="other grid",
                              metadata={GEOMETRY_KEY: Geometry((1, 1, 1), (0, 0, 0), tuple(np.eye(3).ravel())).to_json()})
    assert other.name in [control.target_combo.itemText(i) for i in range(control.target_combo.count())]
    assert not control.use_target("other grid")
    assert "spacing (1, 1, 1) vs (0.78, 0.78, 6.5)" in annotator.banner.text()


@pytest.mark.gui
def test_modality_fields_follow_the_dicom_header_until_the_user_sets_one(make_napari_viewer, litemedsam, qtbot,
                                                                         tmp_path, tmp_path_factory):
    from napari_robustmedsam.engine.embeddings import open_engine
    from widget_helpers import shared_cache

    folder = tmp_path / "CT_series"
    write_dicom_series(folder, synthetic_hu((4, 64, 64)), description="CT chest")
    nifti = write_itk(tmp_path / "scan.nii.gz", synthetic_hu((4, 64, 64)))  # NIfTI names no modality
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-robustmedsam", "RobustMedSAM")
    # a model in place, so that opening an image starts no model load that would outlive the test
    widget.annotator.state.set_model(litemedsam, open_engine(litemedsam, cache_dir=shared_cache(tmp_path_factory)))
    widget.annotator.prefetch_check.setChecked(False)  # no slice embedding needed here
    annotator, preview, sweep = widget.annotator, widget.preview, widget.sweep
    annotator.set_image_layer(viewer.open(str(folder), plugin="napari-robustmedsam")[0])
    assert preview.modality_combo.currentText() == "ct" and sweep.modality_combo.currentText() == "ct"
    assert widget.finetune.ensure_built().modality_combo.currentText() == "ct"  # a tab built after the image opened
    assert DEGRADED_LAYER not in viewer.layers  # following the image does not start a preview off its tab
    preview.modality_combo.setCurrentText("mri")  # the user's choice stays over the next images
    annotator.set_image_layer(viewer.open(str(nifti), plugin="napari-robustmedsam")[0])
    assert preview.modality_combo.currentText() == "mri"
    assert sweep.modality_combo.currentText() == "(all types)" and widget.finetune.modality_combo.currentText() == "generic"


DEGRADED_LAYER = "degraded"


def _write_4d(path, n_volumes):
    import SimpleITK as sitk

    volumes = [synthetic_hu((3, 24, 24), seed=t) for t in range(n_volumes)]
    image = sitk.JoinSeries([sitk.GetImageFromArray(v) for v in volumes])  # (x, y, z, t)
    image.SetSpacing((0.8, 0.8, 5.0, 1.0))
    sitk.WriteImage(image, str(path))
    return volumes


@pytest.mark.gui
def test_a_4d_file_opens_one_layer_per_volume_with_its_own_autosave_key(make_napari_viewer, tmp_path):
    from types import SimpleNamespace

    from napari_robustmedsam.io.medical import MedicalReadWarning, geometry_from_layer
    from napari_robustmedsam.widgets.autosave_control import AutosaveControl

    volumes = _write_4d(tmp_path / "dce.nii.gz", 3)
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "dce.nii.gz"), plugin="napari-robustmedsam")
    assert [layer.name for layer in layers] == ["dce t=0", "dce t=1", "dce t=2"]
    for t, layer in enumerate(layers):
        np.testing.assert_array_equal(np.asarray(layer.data), volumes[t])
        assert geometry_from_layer(layer).timepoint == t
    assert tuple(layers[0].scale) == pytest.approx((5.0, 0.8, 0.8))

    def key(layer):  # the autosave folder: one per volume, so that one volume's objects are not offered on another
        return AutosaveControl._key(None, SimpleNamespace(image_layer=layer, session=SimpleNamespace(shape=(3, 24, 24))))

    assert len({key(layer) for layer in layers}) == 3
    _write_4d(tmp_path / "fmri.nii.gz", 10)
    with pytest.warns(MedicalReadWarning, match=r"holds 10 volumes; opened the first.*--timepoint T \(0\.\.9\)"):
        (first,) = viewer.open(str(tmp_path / "fmri.nii.gz"), plugin="napari-robustmedsam")
    assert first.name == "fmri t=0"

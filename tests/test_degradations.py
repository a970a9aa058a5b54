"""Tests of the degradation library (napari_robustmedsam.degradations) and its CLI commands."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from napari_robustmedsam.degradations import (
    LEVELS,
    MODALITIES,
    calibrate_severity,
    degrade,
    degrade_levels,
    degrade_random,
    describe,
    get_degradation,
    list_degradations,
    modality_degradations,
)
from napari_robustmedsam.errors import DegradationError, UserFacingError

ALL_TYPES = list_degradations()


def _shared_data() -> Path:
    env = os.environ.get("ROBUSTMEDSAM_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _read_png(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))


@pytest.fixture(scope="module")
def mri_image() -> np.ndarray:
    """A real cardiac MRI slice (uint8), or the scikit-image camera picture when the data is absent."""
    path = _shared_data() / "medseg" / "acdc_cardiac_mri" / "images" / "patient001.png"
    if path.is_file():
        return _read_png(path)
    from skimage.data import camera
    from skimage.transform import resize

    return (resize(camera(), (256, 256)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def rgb_image() -> np.ndarray:
    path = _shared_data() / "medseg" / "ph2_dermoscopy" / "images" / "IMD002.png"
    if not path.is_file():
        pytest.skip(f"dermoscopy test image not found at {path} (set ROBUSTMEDSAM_SHARED_DATA)")
    return _read_png(path)


@pytest.fixture(scope="module")
def small_gray(mri_image) -> np.ndarray:
    return np.ascontiguousarray(mri_image[60:156, 60:156])


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    channel_axis = -1 if a.ndim == 3 else None
    return structural_similarity(a, b, data_range=255, channel_axis=channel_axis)


# ---------------------------------------------------------------------------------------------------------
# registry and metadata


def test_registry_covers_the_seed_papers():
    robustmedsam = {"gaussian_noise", "gaussian_blur", "contrast", "brightness", "jpeg", "color_jitter",
                    "poisson_noise", "speckle_noise", "salt_pepper", "rician_noise", "rayleigh_noise",
                    "stepwise_motion", "motion_blur", "zoom_blur", "iso_noise"}
    pgesam = {"gaussian_noise", "salt_pepper", "motion_blur", "gaussian_blur", "brightness_contrast", "gamma",
              "jpeg", "glare", "speckle_noise", "acoustic_shadow", "bias_field", "vignette", "specular_reflection",
              "dead_pixels", "gibbs_ringing", "mri_ghosting", "ct_ring", "beam_hardening", "grid_banding",
              "shadow", "ghosting", "fog"}
    assert robustmedsam | pgesam <= set(ALL_TYPES)


def test_every_type_is_documented_and_constructible():
    rng = np.random.default_rng(0)
    for name in ALL_TYPES:
        info = describe(name)
        assert info["family"] in ("general", "domain")
        assert len(info["simulates"]) > 20, name
        assert info["modalities"], f"{name} is in no modality set"
        json.dumps(info)
        cls = type(get_degradation(name))
        for s in (0.0, 0.5, 1.0):
            json.dumps(cls.from_severity(s, rng, (128, 128)).params)


def test_modality_sets_only_name_registered_types():
    for required in ("mri", "ct", "ultrasound", "xray", "dental_xray", "endoscopy", "fundus", "dermoscopy",
                     "microscopy", "pathology", "oct", "nuclei", "generic"):
        assert required in MODALITIES
    for modality in MODALITIES:
        groups = modality_degradations(modality)
        for names in groups.values():
            assert set(names) <= set(ALL_TYPES), modality
    assert modality_degradations("mri")["modality"] == ("rician_noise", "rayleigh_noise", "stepwise_motion")
    assert set(modality_degradations("ultrasound")["domain"]) >= {"speckle_noise", "acoustic_shadow"}
    assert "grid_banding" in list_degradations(modality="xray")
    assert "grid_banding" not in list_degradations(modality="mri")


def test_get_degradation_explicit_params(small_gray):
    deg = get_degradation("gaussian_noise", sigma=0.05)
    assert deg.params == {"sigma": 0.05}
    out = deg(small_gray, 3)
    assert out.shape == small_gray.shape and out.dtype == small_gray.dtype
    assert np.array_equal(out, deg(small_gray, np.random.default_rng(3)))
    with pytest.raises(DegradationError, match="parameters are"):
        get_degradation("gaussian_noise", sigmaa=0.1)


# ---------------------------------------------------------------------------------------------------------
# determinism, dtype and range


def test_determinism_with_a_seed(small_gray):
    for name in ALL_TYPES:
        a = degrade(small_gray, name, "LQ-2", seed=5)
        assert np.array_equal(a, degrade(small_gray, name, "LQ-2", seed=5)), name
        others = [degrade(small_gray, name, "LQ-2", seed=s) for s in (6, 7, 8)]
        assert any(not np.array_equal(a, o) for o in others), f"{name}: the seed has no effect"


@pytest.mark.parametrize(
    "dtype,low,high",
    [(np.uint8, 0, 255), (np.uint16, 0, 4000), (np.int16, -1000, 2000), (np.float32, -0.5, 2.5)],
)
def test_dtype_and_range_are_preserved(small_gray, dtype, low, high):
    unit = small_gray.astype(np.float64) / 255.0
    unit = (unit - unit.min()) / (unit.max() - unit.min())
    image = (unit * (high - low) + low).astype(dtype)
    for name in ALL_TYPES:
        out = degrade(image, name, "LQ-3", seed=1)
        assert out.dtype == image.dtype and out.shape == image.shape, name
        assert out.min() >= low and out.max() <= high, (name, out.min(), out.max())
        if np.issubdtype(image.dtype, np.integer):
            assert np.isfinite(out).all()


def test_ct_in_hounsfield_units_stays_in_hu():
    yy, xx = np.mgrid[:128, :128]
    body = ((yy - 64) ** 2 + (xx - 64) ** 2) < 50**2
    ct = np.where(body, 40, -1000).astype(np.int16)
    ct[((yy - 64) ** 2 + (xx - 40) ** 2) < 8**2] = 1500
    out = degrade(ct, "poisson_noise", "LQ-2", seed=0)
    assert out.dtype == np.int16 and out.min() >= -1000 and out.max() <= 1500
    assert abs(float(np.median(out[body])) - 40) < 150  # soft tissue is still soft tissue


def test_rgb_and_rgba(rgb_image):
    for name in ("color_jitter", "jpeg", "iso_noise", "specular_reflection", "mri_ghosting"):
        out = degrade(rgb_image, name, "LQ-2", seed=0)
        assert out.shape == rgb_image.shape and out.dtype == np.uint8
    rgba = np.concatenate([rgb_image, np.full(rgb_image.shape[:2] + (1,), 77, np.uint8)], axis=-1)
    out = degrade(rgba, "fog", "LQ-3", seed=0)
    assert out.shape == rgba.shape and np.all(out[..., 3] == 77)


# ---------------------------------------------------------------------------------------------------------
# levels


def test_ssim_falls_with_the_level_for_every_type(mri_image):
    for name in ALL_TYPES:
        for seed in (0, 1):
            scores = [_ssim(mri_image, degrade(mri_image, name, level, seed=seed)) for level in LEVELS[:3]]
            assert scores[0] > scores[1] > scores[2], (name, seed, scores)


def test_ssim_falls_with_the_level_on_rgb(rgb_image):
    for name in ("color_jitter", "iso_noise", "jpeg", "zoom_blur", "ghosting", "specular_reflection", "fog"):
        scores = [_ssim(rgb_image, degrade(rgb_image, name, level, seed=0)) for level in LEVELS[:3]]
        assert scores[0] > scores[1] > scores[2], (name, scores)


def test_continuous_severity(small_gray):
    clean = degrade(small_gray, "gaussian_blur", severity=0.0)
    assert np.array_equal(clean, small_gray)
    scores = [_ssim(small_gray, degrade(small_gray, "gaussian_noise", severity=s)) for s in (0.1, 0.4, 0.9)]
    assert scores[0] > scores[1] > scores[2]


def test_lq3_plus_adds_domain_artifacts(mri_image):
    out, record = degrade(mri_image, "gaussian_noise", "LQ-3+", modality="mri", seed=2, return_record=True)
    assert record[0]["name"] == "gaussian_noise"
    assert [r["stage"] for r in record[1:]] and all(r["stage"] == "domain" for r in record[1:])
    assert {r["name"] for r in record[1:]} <= set(modality_degradations("mri")["domain"])
    lq3 = degrade(mri_image, "gaussian_noise", "LQ-3", seed=2)
    assert not np.array_equal(out, lq3)
    # (not necessarily a lower SSIM: e.g. Gibbs truncation after noise low-passes the noise)


def test_random_composition_is_consistent_across_levels(small_gray):
    results = degrade_levels(small_gray, modality="ultrasound", seed=11)
    assert list(results) == list(LEVELS)
    names = {lv: [r["name"] for r in rec if r["stage"] == "general"] for lv, (_img, rec) in results.items()}
    assert names["LQ-1"] == names["LQ-2"] == names["LQ-3"] == names["LQ-3+"]
    plus = [r for r in results["LQ-3+"][1] if r["stage"] == "domain"]
    assert plus and {r["name"] for r in plus} <= set(modality_degradations("ultrasound")["domain"])
    json.dumps({lv: rec for lv, (_img, rec) in results.items()})
    img, rec = degrade_random(small_gray, "LQ-2", modality="ultrasound", seed=11)
    assert np.array_equal(img, results["LQ-2"][0]) and rec == results["LQ-2"][1]
    pool = set(modality_degradations("ultrasound")["general"]) | set(modality_degradations("ultrasound")["modality"])
    for seed in range(10):
        _img, rec = degrade_random(small_gray, "LQ-1", modality="ultrasound", seed=seed)
        assert 1 <= len(rec) <= 3 and {r["name"] for r in rec} <= pool


# ---------------------------------------------------------------------------------------------------------
# calibration


@pytest.mark.parametrize("name,target", [("gaussian_noise", 0.6), ("gaussian_blur", 0.85), ("jpeg", 0.9),
                                         ("contrast", 0.7)])
def test_ssim_calibration_hits_the_target(mri_image, name, target):
    result = calibrate_severity(mri_image, name, target, seed=0, tol=0.02)
    assert result.reached, result
    out = degrade(mri_image, name, severity=result.severity, seed=0)
    assert abs(_ssim(mri_image, out) - target) <= 0.02
    via_degrade = degrade(mri_image, name, target_ssim=target, seed=0)
    assert abs(_ssim(mri_image, via_degrade) - target) <= 0.02


def test_unreachable_ssim_target_is_reported(small_gray):
    result = calibrate_severity(small_gray, "vignette", 0.1, seed=0)
    assert not result.reached and result.severity == 1.0


# ---------------------------------------------------------------------------------------------------------
# 3D volumes


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    path = _shared_data() / "volumes" / "prostate_phantom" / "image.tif"
    if path.is_file():
        import tifffile

        return tifffile.imread(path)  # (13, 67, 82) uint16
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:8, :48, :56]
    return (1000 * (((yy - 24) ** 2 + (xx - 28) ** 2) < 300) + rng.integers(0, 50, zz.shape)).astype(np.uint16)


def test_volumes_keep_shape_dtype_and_range(volume):
    for name in ALL_TYPES:
        out = degrade(volume, name, "LQ-2", seed=0)
        assert out.shape == volume.shape and out.dtype == volume.dtype, name
        assert out.min() >= volume.min() and out.max() <= volume.max(), name
        assert not np.array_equal(out, volume), f"{name} did nothing to the volume"


def test_noise_differs_between_slices_but_device_defects_do_not():
    vol = np.full((4, 32, 32), 0.5, np.float32)
    vol[:, :, 16:] = 1.0
    noisy = degrade(vol, "gaussian_noise", "LQ-2", seed=0)
    assert not np.array_equal(noisy[0], noisy[1])
    dead = degrade(vol, "dead_pixels", "LQ-3", seed=0)
    assert np.array_equal(dead[0], dead[1])


# ---------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda img: degrade(img, "not_a_type"), "valid types"),
        (lambda img: degrade(img, "gamma", "LQ-7"), "valid levels"),
        (lambda img: degrade(img, "gamma", "LQ-3+"), "modality"),
        (lambda img: degrade(img, "gamma", "LQ-3+", modality="martian"), "valid modalities"),
        (lambda img: degrade_random(img, "LQ-2", modality="martian"), "valid modalities"),
        (lambda img: degrade(img, "gamma", severity=1.5), r"\[0, 1\]"),
        (lambda img: degrade(img, "gamma", "LQ-1", severity=0.5), "only one"),
        (lambda img: degrade(np.zeros((0, 5)), "gamma"), "empty"),
        (lambda img: degrade(np.full((16, 16), np.nan), "gamma"), "NaN"),
        (lambda img: degrade(np.zeros((2, 16, 16, 3), np.uint8), "gamma"), "got an array of shape"),
        (lambda img: degrade(np.zeros(16), "gamma"), "got an array of shape"),
        (lambda img: degrade(np.zeros((4, 4)), "gamma"), "too small"),
        (lambda img: degrade(np.zeros((16, 16), bool), "gamma"), "dtype"),
        (lambda img: degrade(img, "gamma", seed=-1), "seed"),
        (lambda img: calibrate_severity(img, "gamma", 1.5), "target SSIM"),
    ],
)
def test_bad_input_gives_a_clear_error(small_gray, call, match):
    with pytest.raises(DegradationError, match=match) as info:
        call(small_gray)
    assert isinstance(info.value, UserFacingError) and isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------------------
# CLI


def _run_cli(argv: list[str]) -> int:
    from napari_robustmedsam.cli import degrade as degrade_cli

    parser = argparse.ArgumentParser(prog="robustmedsam")
    degrade_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def tiny_images(mri_image) -> list[np.ndarray]:
    return [np.ascontiguousarray(mri_image[40:104, 40:104]), np.ascontiguousarray(mri_image[100:164, 60:124])]


def test_cli_degrade_writes_the_image_and_record(tmp_path, tiny_images):
    import imageio.v3 as iio

    src = tmp_path / "in.png"
    iio.imwrite(src, tiny_images[0])
    out, rec = tmp_path / "out.png", tmp_path / "rec.json"
    assert _run_cli(["degrade", str(src), "--type", "speckle_noise", "--level", "LQ-3", "--seed", "4",
                     "-o", str(out), "--record", str(rec)]) == 0
    written = np.asarray(iio.imread(out))
    assert np.array_equal(written, degrade(tiny_images[0], "speckle_noise", "LQ-3", seed=4))
    assert json.loads(rec.read_text())[0]["name"] == "speckle_noise"
    vol = tmp_path / "vol.npy"
    np.save(vol, np.stack([tiny_images[0]] * 3).astype(np.int16))
    assert _run_cli(["degrade", str(vol), "--type", "random", "--level", "LQ-3+", "--modality", "mri",
                     "-o", str(tmp_path / "vol_out.npy")]) == 0
    assert np.load(tmp_path / "vol_out.npy").shape == (3, 64, 64)
    with pytest.raises(DegradationError, match="valid types"):
        _run_cli(["degrade", str(src), "--type", "nope", "-o", str(tmp_path / "new.png")])  # out.png exists now


def test_cli_degrade_reads_dicom_and_nifti_and_keeps_their_geometry_and_hu(tmp_path, capsys):
    from medical_fixtures import synthetic_hu, write_dicom_series

    from napari_robustmedsam.degradations import modality_degradations
    from napari_robustmedsam.io import read_medical

    folder = tmp_path / "ct"
    volume = synthetic_hu()
    write_dicom_series(folder, volume)
    out, rec = tmp_path / "ct_lq3.nii.gz", tmp_path / "rec.json"
    assert _run_cli(["degrade", str(folder), "--type", "random", "--level", "LQ-3+", "-o", str(out),
                     "--record", str(rec)]) == 0
    assert "modality: ct (from the DICOM header" in capsys.readouterr().out
    assert {r["name"] for r in json.loads(rec.read_text())} & set(modality_degradations("ct")["domain"])
    arr, geo = read_medical(out)
    _, source = read_medical(folder)
    assert arr.shape == volume.shape and not np.array_equal(arr, volume)
    assert arr.min() < -500  # still in HU: air stays far below zero
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(geo, key), getattr(source, key), atol=1e-5)
    again = tmp_path / "again.nrrd"  # NIfTI in, NRRD out: the same grid
    assert _run_cli(["degrade", str(out), "--type", "gaussian_noise", "-o", str(again)]) == 0
    np.testing.assert_allclose(read_medical(again)[1].origin, source.origin, atol=1e-5)
    assert _run_cli(["degrade", str(out), "--type", "gaussian_noise", "-o", str(tmp_path / "pixels.npy")]) == 0
    assert "holds the pixels only" in capsys.readouterr().out
    with pytest.raises(DegradationError, match=r"\.nii\.gz"):  # refused before any work
        _run_cli(["degrade", str(folder), "--type", "gaussian_noise", "-o", str(tmp_path / "ct_lq3.dcm")])


def test_cli_degrade_folder_medseg_layout(tmp_path, tiny_images):
    import imageio.v3 as iio

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, img in enumerate(tiny_images):
        iio.imwrite(root / "images" / f"case{i}.png", img)
        iio.imwrite(root / "masks" / f"case{i}.png", (img > 100).astype(np.uint8) * 255)
    out = tmp_path / "out"
    assert _run_cli(["degrade-folder", str(root), "--modality", "mri", "-o", str(out), "--quiet"]) == 0
    for folder in ("clean", "masks", *LEVELS):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["case0.png", "case1.png"], folder
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modality"] == "mri" and manifest["levels"] == list(LEVELS)
    entry = manifest["images"]["case0.png"]
    assert set(entry["levels"]) == set(LEVELS) and isinstance(entry["seed"], int)
    again = degrade_levels(tiny_images[0], modality="mri", seed=entry["seed"])
    assert np.array_equal(np.asarray(iio.imread(out / "LQ-2" / "case0.png")), again["LQ-2"][0])
    assert np.array_equal(np.asarray(iio.imread(out / "clean" / "case0.png")), tiny_images[0])


def test_cli_gallery_renders_a_png(tmp_path, tiny_images):
    import imageio.v3 as iio

    src = tmp_path / "in.png"
    iio.imwrite(src, tiny_images[0])
    sheet = tmp_path / "sheet.png"
    assert _run_cli(["degrade", "--gallery", str(src), "--modality", "xray", "--types",
                     "grid_banding,poisson_noise", "-o", str(sheet)]) == 0
    picture = np.asarray(iio.imread(sheet))
    assert picture.shape[1] > picture.shape[0] > 300  # 2 rows x 5 columns (8-bit gray PNG for gray input)
    from napari_robustmedsam.degradations.gallery import gallery_types

    assert len(gallery_types("xray")) == 12 and len(gallery_types(None)) == len(ALL_TYPES)


# ---------------------------------------------------------------------------------------------------------
# fast paths (speed target: benchmarks/degradations.py) keep what they compute


def _smooth_rgb(rng: np.random.Generator, shape=(96, 112, 3)) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.random(shape), (3, 3, 0)).astype(np.float32)


def test_upsample_matches_elementwise_linear_resampling():
    from napari_robustmedsam.degradations._fields import _linear_taps, upsample

    def reference(field, shape):  # the original implementation: np.take per axis, first axis first
        out = np.asarray(field, dtype=np.float32)
        for axis, n_out in enumerate(shape):
            if out.shape[axis] == n_out:
                continue
            lo, hi, frac = _linear_taps(n_out, out.shape[axis])
            bshape = [1] * out.ndim
            bshape[axis] = n_out
            a, b = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
            out = a + (b - a) * frac.reshape(bshape)
        return out

    rng = np.random.default_rng(0)
    for small, shape in [((7, 9), (50, 41)), ((11, 13, 3), (33, 52, 3)), ((3, 6, 5), (7, 24, 20))]:
        field = rng.random(small, dtype=np.float32)
        out = upsample(field, shape)
        assert out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_allclose(out, reference(field, shape), atol=1e-6)


def test_reduced_resolution_gaussian_blur_is_close_to_the_exact_blur():
    from scipy import ndimage

    from napari_robustmedsam.degradations.blur import REDUCED_FROM, gaussian_blur

    x = np.clip(_smooth_rgb(np.random.default_rng(1), (128, 120, 3)) * 3 - 1, 0, 1).astype(np.float32)
    x[40:80, 30:90] = 1.0  # sharp edges: the worst case of the approximation
    for sigma in (REDUCED_FROM, 2.5, 5.4):
        exact = ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="reflect", truncate=3.0)
        fast = gaussian_blur(x, sigma)
        assert fast.shape == x.shape and fast.dtype == np.float32
        err = np.abs(fast - exact)[8:-8, 8:-8]
        assert err.mean() < 0.003 and err.max() < 0.04, (sigma, err.mean(), err.max())
        # RGB is blurred channel by channel
        np.testing.assert_allclose(gaussian_blur(np.ascontiguousarray(x[..., 1]), sigma), fast[..., 1], atol=1e-5)


def test_motion_blur_rgb_equals_per_channel():
    from napari_robustmedsam.degradations.blur import convolve_reflect, line_kernel

    x = _smooth_rgb(np.random.default_rng(2))
    kernel = line_kernel(17.5, 33.0)
    out = convolve_reflect(x, kernel)
    assert out.shape == x.shape and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[..., c], convolve_reflect(np.ascontiguousarray(x[..., c]), kernel), atol=1e-5)


@pytest.mark.parametrize("rgb", [False, True])
def test_stepwise_motion_2d_matches_torchio(rgb):
    """The numpy k-space motion of 2D images equals torchio's Motion (kept for volumes)."""
    from napari_robustmedsam.degradations.mri import StepwiseMotion, _TorchioDegradation

    x = _smooth_rgb(np.random.default_rng(3), (80, 96, 3))
    x = x if rgb else np.ascontiguousarray(x[..., 0])
    for seed in range(4):
        deg = StepwiseMotion.from_severity(0.9, np.random.default_rng(seed), x.shape[:2])
        fast = deg.apply(x, np.random.default_rng(0))
        slow = _TorchioDegradation.apply(deg, x, np.random.default_rng(0))
        assert fast.shape == x.shape and fast.dtype == np.float32
        np.testing.assert_allclose(fast, slow, atol=2e-4)


def test_poisson_noise_has_poisson_statistics():
    from napari_robustmedsam.degradations.noise import PoissonNoise

    peak = 8.0
    for level in (0.2, 0.45, 0.9):  # expected counts 1.6 (exact draws), 3.6 (exact), 7.2 (normal approximation)
        x = np.full((256, 256, 3), level, np.float32)
        counts = PoissonNoise(peak=peak).apply(x, np.random.default_rng(4)) * peak
        assert counts.dtype == np.float32 and counts.min() >= 0
        assert abs(counts.mean() - level * peak) < 0.05 and abs(counts.var() / (level * peak) - 1) < 0.03
        if level * peak < PoissonNoise.EXACT_BELOW:
            np.testing.assert_allclose(counts, np.rint(counts), atol=1e-4)  # whole photon counts
    mixed = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    out = PoissonNoise(peak=peak).apply(mixed, np.random.default_rng(5))
    assert np.array_equal(out, PoissonNoise(peak=peak).apply(mixed, np.random.default_rng(5)))


def test_exact_small_count_poisson_draws_follow_the_poisson_pmf():
    from scipy import stats

    from napari_robustmedsam.degradations.noise import _poisson_small

    rng = np.random.default_rng(6)
    for lam in (0.05, 1.6, 4.9):
        counts = _poisson_small(rng, np.full(400_000, lam, np.float32))
        assert counts.dtype == np.float32
        freq = np.bincount(counts.astype(np.int64), minlength=25)[:25] / counts.size
        np.testing.assert_allclose(freq, stats.poisson.pmf(np.arange(25), lam), atol=0.005)
    assert not _poisson_small(rng, np.zeros(1000, np.float32)).any()


def test_dicom_modality_codes_name_the_degradation_modality():
    from napari_robustmedsam.degradations.modality import MODALITIES, DICOM_MODALITIES, modality_from_dicom

    assert modality_from_dicom("MR") == "mri" and modality_from_dicom(" ct ") == "ct"
    assert modality_from_dicom("IO") == "dental_xray" and modality_from_dicom("DX") == "xray"
    assert modality_from_dicom("PT") is None and modality_from_dicom(None) is None  # PET: no set describes it
    assert set(DICOM_MODALITIES.values()) <= set(MODALITIES)

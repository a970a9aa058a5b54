"""MRI acquisition artifacts. Motion, ghosting, spikes and the bias field use torchio's physics-based
transforms (k-space segments / planes / spikes, polynomial coil field); Gibbs ringing is k-space
truncation. 2D images (H, W) are passed to torchio as a one-voxel-thick slab (H, 1, W), which keeps
SimpleITK's resampling fast and puts torchio's k-space segments along the image columns; 3D volumes
(Z, Y, X) are passed as they are. Step-wise motion of 2D gray and RGB images runs torchio's Motion
computation in numpy instead (``motion_2d``: all channels at once, same result). torchio runs
single-threaded here: on a shared CPU that is faster than thread contention for single images."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import numpy as np
import scipy.fft

from ._fields import upsample
from .base import Degradation, lerp, register, size_scale

if TYPE_CHECKING:  # torch / torchio are imported lazily: listing types or a CLI run should not pay for them
    import torch
    import torchio as tio


# torchio tensor axes (after the channel axis) holding the image rows / columns
ROW_AXIS = {False: 0, True: 1}  # 2D slab (H, 1, W) / volume (Z, Y, X)
COL_AXIS = 2


def _to_tio(x: np.ndarray, volume: bool) -> torch.Tensor:
    """(H, W) -> (1, H, 1, W); (H, W, C) -> (C, H, 1, W); volume (Z, Y, X) -> (1, Z, Y, X)."""
    import torch

    if volume:
        t = x[None]
    elif x.ndim == 2:
        t = x[None, :, None, :]
    else:
        t = np.moveaxis(x, -1, 0)[:, :, None, :]
    return torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))


def _from_tio(t: torch.Tensor, like: np.ndarray, volume: bool) -> np.ndarray:
    a = t.detach().cpu().numpy().astype(np.float32, copy=False)
    if volume:
        return a[0]
    if like.ndim == 2:
        return a[0, :, 0, :]
    return np.moveaxis(a[:, :, 0, :], 0, -1)


def _rigid_warp(planes: np.ndarray, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    """torchio Motion's resampling of a 2D slab, for (C, H, W) float32 planes at once: output pixel
    (i, k) takes the input at R(i, k) + (-shift_rows, shift_cols), R the in-plane rotation by `degrees`
    about pixel (0, 0) (torchio composes its Euler transform without the centre); linear interpolation,
    edge pixels extended by half a pixel and the channel minimum outside, as SimpleITK's resampler."""
    n, h, w = planes.shape
    c, s = np.float32(np.cos(np.radians(degrees))), np.float32(np.sin(np.radians(degrees)))
    ii = np.arange(h, dtype=np.float32)[:, None]
    kk = np.arange(w, dtype=np.float32)[None, :]
    r = (c * ii + np.float32(-shift[0])) - s * kk
    q = (s * ii + np.float32(shift[1])) + c * kk
    outside = (r < -0.5) | (r >= h - 0.5) | (q < -0.5) | (q >= w - 0.5)
    np.clip(r, 0, h - 1, out=r)
    np.clip(q, 0, w - 1, out=q)
    r0 = np.minimum(r.astype(np.intp), h - 2)
    q0 = np.minimum(q.astype(np.intp), w - 2)
    fr, fq = (r - r0).ravel(), (q - q0).ravel()
    idx = (r0 * w + q0).ravel()
    flat = planes.reshape(n, h * w)
    top, right = np.take(flat, idx, axis=1), np.take(flat, idx + 1, axis=1)
    right -= top
    right *= fq
    top += right
    bottom, corner = np.take(flat, idx + w, axis=1), np.take(flat, idx + (w + 1), axis=1)
    corner -= bottom
    corner *= fq
    bottom += corner
    bottom -= top
    bottom *= fr
    top += bottom
    out = top.reshape(n, h, w)
    if outside.any():
        out[:, outside] = flat.min(axis=1)[:, None]
    return out


def _segment_masks(times: np.ndarray, n_poses: int, w: int) -> np.ndarray:
    """(n_poses, w) 0/1 masks over the fft-shifted column frequencies: which pose fills which k-space
    segment, with torchio Motion's ordering (the pose acquired at t > 0.5 swaps with the first)."""
    order = list(range(n_poses))
    index = int(np.where(times > 0.5)[0].min()) if np.any(times > 0.5) else n_poses - 1
    order[0], order[index] = order[index], order[0]
    bounds = [int(v) for v in (w * times).astype(int)] + [w]
    masks = np.zeros((n_poses, w))
    ini = 0
    for pose, fin in zip(order, bounds):
        masks[pose, ini:fin] = 1.0
        ini = fin
    return masks


def motion_2d(x: np.ndarray, degrees, translation, times) -> np.ndarray:
    """torchio Motion on a 2D (H, W) or (H, W, C) image, all channels at once, in numpy.

    torchio fills the (fft-shifted) k-space columns [W t_j, W t_j+1) from pose j and returns the real part
    of the inverse FFT. The segments only split the column frequencies, so the row FFTs cancel and the
    result is, per pose, a 1-D FFT along the rows of pixels, masked, summed and inverted; taking the real
    part equals masking with the mask symmetrised between +f and -f, which makes real FFTs exact."""
    planes = np.ascontiguousarray(x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0), dtype=np.float32)
    w = planes.shape[2]
    shifts = np.asarray(translation, dtype=float).reshape(-1, 2)
    angles = np.asarray(degrees, dtype=float)
    masks = _segment_masks(np.asarray(times, dtype=float), len(angles) + 1, w)
    spectrum = None
    for pose in range(len(angles) + 1):
        m = np.fft.ifftshift(masks[pose])
        half = (0.5 * (m + np.roll(m[::-1], 1)))[: w // 2 + 1].astype(np.float32)
        if not half.any():
            continue
        moved = planes if pose == 0 else _rigid_warp(planes, angles[pose - 1], shifts[pose - 1])
        spec = scipy.fft.rfft(moved, axis=-1)
        spec *= half
        spectrum = spec if spectrum is None else spectrum.__iadd__(spec)
    if spectrum is None:  # pragma: no cover - only with hand-made, unsorted times that leave k-space empty
        return np.zeros_like(x, dtype=np.float32)
    out = scipy.fft.irfft(spectrum, n=w, axis=-1).astype(np.float32, copy=False)
    return out[0] if x.ndim == 2 else np.moveaxis(out, 0, -1)


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    import SimpleITK as sitk
    import torch

    torch_threads = torch.get_num_threads()
    sitk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_threads)


class _TorchioDegradation(Degradation):
    """Runs a torchio transform built by ``_transform(volume)`` on 2D images (slab) or 3D volumes."""

    volumetric = True
    heavy = True
    sources = ("pge-sam",)

    def _transform(self, volume: bool) -> tio.Transform:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, x, rng):
        with _single_threaded():
            return _from_tio(self._transform(False)(_to_tio(x, False)), x, False)

    def apply_volume(self, x, rng):
        with _single_threaded():
            return _from_tio(self._transform(True)(_to_tio(x, True)), x, True)


@register
@dataclass
class StepwiseMotion(_TorchioDegradation):
    """Step-wise rigid motion during an MRI acquisition (torchio Motion): the subject jumps to a new pose
    at a few moments, so k-space is filled by segments from different poses, giving ghosts and blurring
    along the phase-encoding direction. RobustMedSAM applies it to MRI and CT.

    degrees, translation: per step, in-plane rotation (deg) and (rows, cols) translation (px); times:
    fraction of k-space acquired before each step. Volumes move in-plane the same way (torchio); 2D gray
    and RGB images use ``motion_2d``, the same computation in numpy for all channels at once (equal to
    torchio's output within float32 rounding, about 3x faster on RGB).
    """

    degrees: list[float] = field(default_factory=lambda: [4.0, -3.0])
    translation: list[list[float]] = field(default_factory=lambda: [[4.0, 2.0], [-3.0, 1.0]])
    times: list[float] = field(default_factory=lambda: [0.35, 0.7])
    name = "stepwise_motion"
    family = "domain"
    sources = ("robustmedsam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        steps = int(rng.integers(2, 4))
        rot_dir = rng.uniform(-1.0, 1.0, steps)
        shift_dir = rng.uniform(-1.0, 1.0, (steps, 2))
        times = np.sort(rng.uniform(0.15, 0.85, steps))
        deg = lerp(0.0, 3.0, severity)
        shift = lerp(0.0, 8.0, severity) * size_scale(shape)
        return cls(
            degrees=[round(float(v) * deg, 3) for v in rot_dir],
            translation=[[round(float(a) * shift, 3), round(float(b) * shift, 3)] for a, b in shift_dir],
            times=[round(float(t), 4) for t in times],
        )

    def apply(self, x, rng):
        return motion_2d(x, self.degrees, self.translation, self.times)

    def _transform(self, volume):
        angles = np.asarray(self.degrees, dtype=float)
        shifts = np.asarray(self.translation, dtype=float).reshape(-1, 2)
        deg = np.zeros((len(angles), 3))
        tr = np.zeros((len(angles), 3))
        # in-plane: rotate about the axis that is not a row/column axis; translate along rows / columns
        deg[:, 0 if volume else 1] = angles
        tr[:, ROW_AXIS[volume]] = shifts[:, 0]
        tr[:, COL_AXIS] = shifts[:, 1]
        import torchio as tio

        return tio.Motion(
            degrees=deg, translation=tr, times=np.asarray(self.times, dtype=float), image_interpolation="linear"
        )


@register
@dataclass
class MRIGhosting(_TorchioDegradation):
    """MRI ghosting (torchio Ghosting): periodic motion (breathing, heartbeat, pulsatile flow) modulates
    k-space lines and creates shifted copies of the anatomy along the phase-encoding direction.

    num_ghosts: number of ghosts; axis: phase-encoding axis, 0 = along rows (vertical ghosts), 1 = along
    columns; intensity: artifact strength (0 = none, 1 = strong, up to 2); restore: fraction of central
    k-space kept.
    """

    num_ghosts: int = 4
    axis: int = 0
    intensity: float = 0.8
    restore: float = 0.02
    name = "mri_ghosting"
    family = "domain"

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(
            num_ghosts=int(rng.integers(2, 6)),
            axis=int(rng.integers(0, 2)),
            intensity=round(lerp(0.0, 1.6, severity), 4),
            restore=0.02,
        )

    def _transform(self, volume):
        axis = ROW_AXIS[volume] if int(self.axis) == 0 else COL_AXIS
        import torchio as tio

        return tio.Ghosting(
            num_ghosts=int(self.num_ghosts), axis=axis, intensity=float(self.intensity),
            restore=float(self.restore),
        )


@register
@dataclass
class MRISpike(_TorchioDegradation):
    """MRI spike / herringbone artifact (torchio Spike): a spurious spike in k-space from an electrical
    discharge makes stripes over the whole image.

    positions: per spike, (row, col) position in the centred k-space as fractions (0.5 = centre);
    volumes get the spike on their central k-space plane. intensity: spike magnitude relative to the
    k-space maximum.
    """

    positions: list[list[float]] = field(default_factory=lambda: [[0.55, 0.6]])
    intensity: float = 0.15
    name = "mri_spike"
    family = "domain"

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        offset = rng.uniform(0.03, 0.15, 2) * rng.choice([-1.0, 1.0], 2)
        pos = [round(0.5 + float(offset[0]), 4), round(0.5 + float(offset[1]), 4)]
        return cls(positions=[pos], intensity=round(lerp(0.0, 0.6, severity), 4))

    def _transform(self, volume):
        rc = np.asarray(self.positions, dtype=float).reshape(-1, 2)
        pos = np.zeros((len(rc), 3))
        if volume:  # (Z, Y, X): central Z plane
            pos[:, 0], pos[:, 1], pos[:, 2] = 0.5, rc[:, 0], rc[:, 1]
        else:  # slab (H, 1, W)
            pos[:, 0], pos[:, 1], pos[:, 2] = rc[:, 0], 0.0, rc[:, 1]
        import torchio as tio

        return tio.Spike(spikes_positions=pos, intensity=float(self.intensity))


@register
@dataclass
class BiasField(Degradation):
    """Bias field: smooth multiplicative intensity inhomogeneity from RF-coil sensitivity / B1
    non-uniformity (MRI) or non-uniform beam propagation (ultrasound). torchio's polynomial field,
    computed on a coarse grid and interpolated (it is smooth), normalised to mean 1.

    coefficients: polynomial coefficients (torchio order-3 layout, 20 values; the last 10 involve the
    slice axis and only act on volumes); order: polynomial order. At severity s the log-field spans
    1.2 * s over the central 60 % of a 2D image (brightest / darkest = e^(1.2 s) there); the field is
    normalised to mean 1 and limited to [0.5, 2].
    """

    coefficients: list[float] = field(default_factory=lambda: [0.0] * 20)
    order: int = 3
    name = "bias_field"
    family = "domain"
    volumetric = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        order = 3
        n = (order + 1) * (order + 2) * (order + 3) // 6
        directions = rng.uniform(-1.0, 1.0, n)
        # scale the random polynomial so that its log-range (brightest / darkest) over the central 60 % of
        # the image, where the anatomy usually is, follows the severity
        log_field = np.log(cls(coefficients=list(directions), order=order)._field((1, 32, 32)))[0, 6:26, 6:26]
        span = max(float(log_field.max() - log_field.min()), 1e-6)
        strength = lerp(0.0, 1.2, severity) / span
        return cls(coefficients=[round(float(c) * strength, 5) for c in directions], order=order)

    def _field(self, shape: tuple[int, ...]) -> np.ndarray:
        coarse = tuple(max(2, min(s, 32)) if s > 1 else 1 for s in shape)
        from torchio.transforms.augmentation.intensity.random_bias_field import BiasField as _TioBiasField

        data = np.zeros((1, *coarse), dtype=np.float32)
        low = _TioBiasField.generate_bias_field(data, int(self.order), list(self.coefficients))
        full = upsample(np.asarray(low, dtype=np.float32), shape)
        return np.clip(full / np.float32(full.mean()), 0.5, 2.0)

    def apply(self, x, rng):
        f = self._field((1, x.shape[0], x.shape[1]))[0]
        return x * (f[..., None] if x.ndim == 3 else f)

    def apply_volume(self, x, rng):
        return x * self._field(x.shape)


@register
@dataclass
class GibbsRinging(Degradation):
    """Gibbs ringing (truncation artifact): k-space sampled only up to a limited frequency makes
    oscillations parallel to sharp edges (e.g. at the skull or cartilage).

    keep: fraction of the k-space extent kept along each in-plane axis (1 = none).
    """

    keep: float = 0.3
    name = "gibbs_ringing"
    family = "domain"
    slice_consistent = True
    sources = ("pge-sam",)

    @classmethod
    def from_severity(cls, severity, rng, shape=(512, 512)):
        return cls(keep=round(1.0 - 0.93 * severity**0.45, 4))

    def apply(self, x, rng):
        if self.keep >= 1.0:
            return x
        h, w = x.shape[:2]
        spectrum = scipy.fft.rfft2(x, axes=(0, 1), workers=1)
        fy = np.abs(scipy.fft.fftfreq(h))[:, None]
        fx = np.abs(scipy.fft.rfftfreq(w))[None, :]
        cut = 0.5 * float(self.keep)
        mask = (fy <= cut) & (fx <= cut)
        spectrum *= mask[..., None] if x.ndim == 3 else mask
        return scipy.fft.irfft2(spectrum, s=(h, w), axes=(0, 1), workers=1).astype(np.float32)

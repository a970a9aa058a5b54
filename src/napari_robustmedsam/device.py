"""Device and precision choice: ``auto`` prefers CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import torch

from .errors import UserFacingError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a user choice into a usable device, with a clear error when it is not available."""
    if isinstance(device, torch.device):
        return device
    choice = (device or "auto").lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = choice.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserFacingError("device 'cuda' was asked for but no CUDA GPU is visible to torch; use --device cpu or auto")
    if kind == "mps" and not _mps_available():
        raise UserFacingError("device 'mps' was asked for but Apple MPS is not available; use --device cpu or auto")
    if kind not in ("cuda", "mps", "cpu"):
        raise UserFacingError(f"unknown device {device!r}; expected one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    return torch.device(choice)


def inference_dtype(device: torch.device, half: bool | None = None) -> torch.dtype:
    """fp16 on CUDA by default (SAM runs fine in half precision there); fp32 elsewhere.

    MPS stays fp32: it has no float64 and several SAM ops misbehave in fp16 there.
    """
    if half is None:
        half = device.type == "cuda"
    if half and device.type != "cuda":
        raise UserFacingError("half precision is only supported on CUDA; drop --half or use a CUDA device")
    return torch.float16 if half else torch.float32

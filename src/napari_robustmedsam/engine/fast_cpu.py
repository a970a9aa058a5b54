"""Running the image encoder fast: precision, memory format and kernel choices per device.

What the engine does (the speed-ups are measured in docs/benchmarks.md):

- Always (fp32, all devices): LiteMedSAM's TinyViT has 30 ``Conv2d_BN`` pairs; the batch norms are folded
  into their convolutions in a private copy of the encoder (inference only: running statistics are
  constants). This is exact up to fp32 rounding (max abs difference of the embeddings about 4e-6 for values
  up to about 0.6). ViT encoders have no batch norm and are used as they are (no copy).
- ``cpu_fast`` (CPU): additionally channels_last tensors for the convolution stages (same embeddings up to fp32
  rounding). ``None`` (the default) turns it on for encoders whose batch norms are folded (LiteMedSAM's TinyViT:
  the private copy exists anyway, and it measured faster with the same masks, docs/results/encoder-speed); a ViT
  encoder keeps running as it is unless ``cpu_fast=True`` (a second copy of a large encoder costs memory).
  bf16 autocast only when asked for (``precision="bf16"``): it is fast on CPUs
  with native bf16 (AMX-BF16 or AVX512-BF16) but changes masks noticeably; without native bf16 it is emulated
  and slower (a notice says so). ``compile=True`` additionally tries ``torch.compile`` (slow to compile on 2
  cores; off by default).
- CUDA: fp16 autocast for the encoder by default (``precision="auto"``), bf16 if asked for; outputs are
  returned as float32 either way. It is kept simple and guarded (no GPU on the project's machines).

Whatever runs, the outputs are float32 tensors on the model's device, and the precision actually used is
part of the cache signature (``"fp32"``, ``"bf16"``, ``"fp16"``), so a bf16 embedding is never served to an
fp32 request.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from functools import lru_cache

import torch
from torch import nn

from ..errors import UserFacingError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16 (bf16 matmuls in hardware); otherwise oneDNN emulates bf16 slowly."""
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


_MALLOC_TUNED: bool | None = None


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Opt-in, process-wide (glibc only): keep freed large blocks for reuse instead of unmapping them.

    PyTorch allocates every intermediate tensor with malloc; with glibc's defaults each block above the
    (dynamic) mmap threshold is mapped fresh and unmapped on free, so each decoder call page-faults on
    every 4 KiB of its 1-8 MB temporaries (about 7,000 faults per SAM decoder call, measured), which is
    expensive in a VM. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps that memory mapped
    (RSS stays at its peak instead of shrinking). Returns True when applied; a no-op elsewhere.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is not None:
        return _MALLOC_TUNED
    ok = False
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
            m_trim_threshold, m_mmap_threshold = -1, -3
            ok = bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(
                libc.mallopt(m_trim_threshold, int(trim_threshold))
            )
    except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
        ok = False
    _MALLOC_TUNED = ok
    return ok


def configure_cpu_memory() -> bool:
    """Default for CPU inference: :func:`tune_malloc`, unless ``ROBUSTMEDSAM_TUNE_MALLOC=0``.

    Why: on this project's machine (a VM) page faults, not arithmetic, dominated the LiteMedSAM encoder:
    1.4-1.6 s per slice with glibc's defaults, 0.75-0.9 s with freed blocks kept for reuse (docs/benchmarks.md).
    The price is that the process keeps its peak heap mapped (bounded by the largest working set, about
    0.5 GB for LiteMedSAM, measured in benchmarks/embed_memory.py).
    """
    import os

    if os.environ.get("ROBUSTMEDSAM_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return tune_malloc()


# ------------------------------------------------------------------------------------------------
# graph rewrites
# ------------------------------------------------------------------------------------------------
def _fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _is_conv_bn_pair(module: nn.Module) -> bool:
    """TinyViT's ``Conv2d_BN``: a Sequential of exactly (Conv2d ``c``, BatchNorm2d ``bn``)."""
    if not isinstance(module, nn.Sequential) or len(module) != 2:
        return False
    conv, bn = module[0], module[1]
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.affine
    )


def count_foldable_batchnorms(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if _is_conv_bn_pair(m))


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every (Conv2d, BatchNorm2d) pair by one Conv2d, in place; returns ``module``."""
    for name, child in list(module.named_children()):
        if _is_conv_bn_pair(child):
            setattr(module, name, _fuse_conv_bn(child[0], child[1]))
        else:
            fold_batchnorm(child)
    return module


# ------------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------------
class EncoderRunner:
    """``runner(batch) -> features``: ``model.encode`` with the chosen device/precision optimisations.

    ``model`` is a :class:`~napari_robustmedsam.models.segmenter.PromptableSegmenter`; the runner never
    modifies it (folding happens on a private copy of the image encoder, rebuilt when the weights change).
    """

    def __init__(
        self,
        model: nn.Module,
        precision: str = "auto",
        cpu_fast: bool | None = None,
        compile: bool = False,
        fold_bn: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise UserFacingError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.model = model
        if cpu_fast is None:
            cpu_fast = bool(fold_bn and count_foldable_batchnorms(model.image_encoder) > 0)
        self.cpu_fast = bool(cpu_fast)
        self.compile = compile
        self.fold_bn = fold_bn
        self.notices: list[str] = []
        self.device = next(model.parameters()).device
        self.precision = self._resolve_precision(precision)
        self.channels_last = bool(self.cpu_fast and self.device.type == "cpu")
        if self.device.type == "cpu":
            configure_cpu_memory()
        self._fast_model: nn.Module | None = None
        self._fast_key: tuple | None = None

    # ---- choices --------------------------------------------------------------------------------
    def _resolve_precision(self, precision: str) -> str:
        device = self.device
        param_dtype = next(self.model.parameters()).dtype
        if param_dtype == torch.float16:
            return "fp16"
        if param_dtype == torch.bfloat16:
            return "bf16"
        if device.type == "cuda":
            if precision in ("auto", "fp16"):
                return "fp16"
            return precision
        if device.type == "mps":
            if precision not in ("auto", "fp32"):
                raise UserFacingError("reduced precision is not supported on Apple MPS here; use precision fp32")
            return "fp32"
        # CPU
        if precision == "fp16":
            raise UserFacingError("fp16 on the CPU is slow and inaccurate; use fp32 (default) or bf16")
        if precision == "bf16":
            if not cpu_has_native_bf16():
                self.notices.append(
                    "this CPU has no native bf16 (AMX-BF16 / AVX512-BF16): bf16 is emulated and slower than fp32 here"
                )
            return "bf16"
        # "auto" stays fp32 on the CPU even with cpu_fast: on CPUs with native bf16, bf16 makes LiteMedSAM's encoder
        # much faster but visibly moves its box masks (docs/benchmarks.md, section 1b, has the figures). A speed
        # option must not change masks unasked: bf16 is there for whoever asks for it.
        return "fp32"

    @property
    def description(self) -> str:
        parts = [self.device.type, self.precision]
        if self.fold_bn and count_foldable_batchnorms(self.model.image_encoder):
            parts.append("BN folded")
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("torch.compile")
        return ", ".join(parts)

    # ---- model copy -----------------------------------------------------------------------------
    def _weights_key(self) -> tuple:
        from .signature import _versions

        return _versions(self.model.image_encoder)

    def _get_model(self) -> nn.Module:
        encoder = self.model.image_encoder
        needs_copy = (self.fold_bn and count_foldable_batchnorms(encoder) > 0) or self.channels_last or self.compile
        if not needs_copy:
            return self.model
        key = self._weights_key()
        if self._fast_model is not None and key == self._fast_key:
            return self._fast_model
        fast_encoder = copy.deepcopy(encoder).eval()
        if self.fold_bn:
            fold_batchnorm(fast_encoder)
        if self.channels_last:
            fast_encoder = fast_encoder.to(memory_format=torch.channels_last)
        for p in fast_encoder.parameters():
            p.requires_grad_(False)
        # A shallow twin of the segmenter: same prompt encoder / decoder objects, private encoder.
        twin = copy.copy(self.model)
        twin._modules = dict(self.model._modules)
        twin._modules["image_encoder"] = fast_encoder
        if self.compile:
            try:
                twin._modules["image_encoder"] = torch.compile(fast_encoder, dynamic=False)
            except Exception as err:  # noqa: BLE001
                self.notices.append(f"torch.compile is unavailable ({err}); running eagerly")
                self.compile = False
        self._fast_model, self._fast_key = twin, key
        return twin

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        param_dtype = next(self.model.parameters()).dtype
        if param_dtype == dtype:
            return contextlib.nullcontext()
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=dtype)
        if self.device.type == "cpu" and dtype == torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- run ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, keep_early: bool = False) -> dict[str, torch.Tensor]:
        model = self._get_model()
        param_dtype = next(self.model.parameters()).dtype
        x = images.to(device=self.device, dtype=param_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            features = model.encode(x, keep_early=True) if keep_early else model.encode(x)
        return {k: v.float().contiguous() for k, v in features.items()}

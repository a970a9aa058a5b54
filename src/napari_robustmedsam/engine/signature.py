"""Cache signatures: what an embedding depends on, so that a cache never serves a wrong one.

An embedding is a function of the pixels, the image encoder's weights, the preprocessing (and the
input/original size it implies), the tile layout and the precision it was computed in; a robust
decoder's image-level features depend on the decoder's weights too. :class:`Signature` records all
of these plus the package version and the cache format. Comparing a stored signature with the
wanted one gives ``"match"``, ``"version"`` (only the package version differs: reusable, with a
notice) or ``"mismatch"`` (recompute, never serve).

The data hash is taken over the pixels the model sees: a CT intensity window (:mod:`.windows`) is
applied before the encoder, so each window has its own signature and a cache never serves the
embedding of one window for another (a window change re-embeds; going back reuses the first entry).

Hashes are xxh3-128 (``xxhash``, several GB/s) over the raw bytes plus shape and dtype; model hashes
run over the state dict (names, shapes, dtypes, bytes), memoised per module and invalidated when any
parameter or buffer is modified in place (torch's tensor version counters).
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models.weights_hash import HASH_NAME, hash_state
from ..models.weights_hash import new_hasher as _hasher

try:  # checksums of stored bytes; without xxhash they are the full hash
    import xxhash
except ImportError:  # pragma: no cover - exercised only without xxhash
    pass

if TYPE_CHECKING:
    import torch

#: Bump when the on-disk layout changes incompatibly (a different format is recomputed, not reused).
CACHE_FORMAT = 1


def package_version() -> str:
    from .. import __version__

    return __version__


# ------------------------------------------------------------------------------------------------
# data hashes
# ------------------------------------------------------------------------------------------------
def _update_with_array(h, arr: np.ndarray) -> None:
    h.update(repr((tuple(int(s) for s in arr.shape), arr.dtype.str)).encode())
    arr = np.ascontiguousarray(arr)
    if arr.size:
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))


def hash_array(array: Any) -> str:
    """Hash of an array's values, shape and dtype (every byte is read: no sampling)."""
    h = _hasher()
    _update_with_array(h, np.asarray(array))
    return h.hexdigest()


#: The fields of a :class:`Signature` that describe the image itself; the others describe the model and settings.
IMAGE_FIELDS = ("data_hash", "data_shape", "data_dtype")


def image_fields(image: np.ndarray) -> dict:
    """The :data:`IMAGE_FIELDS` of an image: its pixels' hash, its shape and its dtype."""
    values = (hash_array(image), tuple(int(s) for s in image.shape), image.dtype.str)
    return dict(zip(IMAGE_FIELDS, values))


def hash_arrays(arrays) -> str:
    """Hash of a sequence of arrays (an image series), order-sensitive."""
    h = _hasher()
    for arr in arrays:
        _update_with_array(h, np.asarray(arr))
    return h.hexdigest()


def checksum_bytes(array: np.ndarray) -> str:
    """Checksum of stored bytes (corruption detection); cheap: xxh3-64 when available."""
    arr = np.ascontiguousarray(array)
    try:
        return xxhash.xxh3_64_hexdigest(memoryview(arr.reshape(-1).view(np.uint8)))
    except NameError:  # pragma: no cover
        return hash_array(arr)


def checksum_json(obj: Any) -> str:
    """Checksum of a JSON-able value in a canonical form (sorted keys, no spaces): metadata integrity."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return checksum_bytes(np.frombuffer(text.encode(), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------
# model hashes
# ------------------------------------------------------------------------------------------------
_MODULE_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (versions, hash)


def _versions(module: torch.nn.Module) -> tuple:
    """Identity, in-place version counter and storage of every parameter and buffer (cheap staleness key).

    Loading weights (in place), training steps, ``.to()`` and replacing a sub-module all change it.
    """
    out = []
    for t in module.parameters():
        out.append((id(t), t._version, t.data_ptr()))
    for t in module.buffers():
        out.append((id(t), t._version, t.data_ptr()))
    return tuple(out)


def hash_module(module: torch.nn.Module) -> str:
    """:func:`hash_state` of a module's state dict; memoised until a tensor changes."""
    try:
        versions = _versions(module)
        cached = _MODULE_HASHES.get(module)
        if cached is not None and cached[0] == versions:
            return cached[1]
    except TypeError:  # pragma: no cover - not weak-referenceable
        versions = None
    digest = hash_state(module.state_dict())
    if versions is not None:
        _MODULE_HASHES[module] = (versions, digest)
    return digest


def model_hashes(model: torch.nn.Module) -> tuple[str, str | None]:
    """(encoder hash, decoder hash or None). The decoder counts only when it adds image-level features.
    A model loaded without its encoder carries the hash its encoder's weights have."""
    encoder = getattr(model, "image_encoder", model)
    enc = getattr(encoder, "weights_hash", None) or hash_module(encoder)
    dec = None
    if getattr(model, "is_robust", False):
        dec = hash_module(model.mask_decoder)
    return enc, dec


# ------------------------------------------------------------------------------------------------
# signature
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signature:
    """Everything a cache entry depends on. ``kind``: ``"image"`` (2D, maybe tiled) or ``"volume"``."""

    kind: str
    data_hash: str
    data_shape: tuple[int, ...]
    data_dtype: str
    encoder_hash: str
    decoder_hash: str | None
    architecture: str
    preprocessing: str
    model_size: int
    precision: str  # compute precision of the encoder: "fp32", "bf16", "fp16"
    storage_dtype: str  # "float32" or "float16"
    tile_shape: tuple[int, int] | None = None
    halo: tuple[int, int] | None = None
    hash_name: str = HASH_NAME
    cache_format: int = CACHE_FORMAT
    package_version: str = field(default_factory=lambda: package_version())
    checkpoint_sha256: str | None = None  # informational (the weights are hashed directly)
    # "model": what the model's decoder reads (embedding + a robust decoder's image-level features);
    # "encoder": the encoder's outputs alone (embedding + early features), shared by every decoder on top of
    # this encoder, so that swapping in a fine-tuned decoder reuses the encoder's work (decoder_hash None)
    content: str = "model"

    # fields that never invalidate an entry
    _INFO_FIELDS = ("package_version", "checkpoint_sha256")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # tuples -> lists, plain JSON types

    @classmethod
    def from_json(cls, d: dict) -> "Signature":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("data_shape", "tile_shape", "halo"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def key_fields(self) -> dict:
        d = self.to_json()
        for name in self._INFO_FIELDS:
            d.pop(name, None)
        return d

    def key(self) -> str:
        """Short content address of the entry (everything except the informational fields)."""
        h = _hasher()
        h.update(json.dumps(self.key_fields(), sort_keys=True).encode())
        return h.hexdigest()[:32]

    def compare(self, stored: "Signature | dict") -> tuple[str, list[str]]:
        """``("match" | "version" | "mismatch", differing field names)`` of ``stored`` against ``self``."""
        other = stored.to_json() if isinstance(stored, Signature) else dict(stored)
        mine = self.to_json()
        differing = sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))
        hard = [k for k in differing if k not in self._INFO_FIELDS]
        if hard:
            return "mismatch", hard
        if "package_version" in differing:
            return "version", differing
        return "match", differing

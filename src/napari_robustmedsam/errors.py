"""Errors that are shown to users as they are: each names the problem and what to do about it."""


class UserFacingError(Exception):
    """Base class for errors whose message is meant for the user (CLI prints it without a traceback)."""


class CheckpointError(UserFacingError):
    """A checkpoint file is missing, corrupt, unsafe, of an unknown layout or does not fit the model."""


class PromptError(UserFacingError, ValueError):
    """A prompt (point, box, mask) is invalid for the image it is applied to."""


class ImageInputError(UserFacingError, ValueError):
    """An input image or volume cannot be segmented as it is (NaN, wrong dims, unreadable file...)."""


class DegradationError(UserFacingError, ValueError):
    """An unknown degradation type or level, or an input a degradation cannot handle."""


class CacheError(UserFacingError):
    """The embedding cache cannot be used (unwritable, full, corrupt)."""


class NonFiniteError(UserFacingError, ValueError):
    """A model's embeddings, logits or scores hold NaN or infinite values (broken weights, a diverged training run,
    or a precision overflow): shown instead of an empty mask."""

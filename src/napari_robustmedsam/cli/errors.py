"""Re-export of the project's user-facing error for the CLI layer."""

from ..errors import UserFacingError

__all__ = ["UserFacingError"]
